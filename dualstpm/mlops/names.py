"""What the registry calls things: registered model names, aliases and registration tags.

One registered model per dataset and category, `dualstpm-<dataset>-<category>`, the
dataset being the data root folder the model was tested on (`tracking.dataset_name`).
Its alias `challenger` names the latest registered version, `champion` the one in use.
"""

from __future__ import annotations

from pathlib import Path

from dualstpm.errors import RunError
from dualstpm.mlops.tracking import TAG, dataset_name, tracking_errors

CHALLENGER = "challenger"
CHAMPION = "champion"
PROMOTION_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")  # tagged `metric.<name>` on each version
REGISTRATION_TAG = "dualstpm.registration"  # `incomplete` from a version's creation until its alias is set
#: `<RESCORED_TAG><data hash>`: JSON test metrics of a version re-tested on that data (its decision view),
#: tagged by the retrain flow (`mlops.retraining.rescore_champion`), read by the promotion rule
RESCORED_TAG = f"{TAG}rescored."
INCOMPLETE, COMPLETE = "incomplete", "complete"


def model_name(data_root: Path | str, category: str) -> str:
    """`dualstpm-<dataset>-<category>`: the registered model of `category` in `data_root`
    (the dataset is the data root folder's own name, `tracking.dataset_name`)."""
    return f"dualstpm-{dataset_name(data_root)}-{category}"


def registered_name(client, category: str, data_root: Path | str | None = None) -> str:
    """The registered model of `category`: of the data in `data_root` when given, else the
    one `register` made for `category` (registered models carry `dualstpm.category`).

    Raises RunError when there is none, or when several datasets have one (naming them:
    `--data-root` chooses)."""
    if data_root is not None:
        return model_name(data_root, category)
    with tracking_errors(client.tracking_uri, f"looking up the registered models of {category}"):
        found = client.search_registered_models(filter_string=f"tags.`{TAG}category` = '{category}'")
    if len(found) == 1:
        return found[0].name
    if not found:
        raise RunError(f"no registered model of category {category!r} in {client.tracking_uri}: register one with "
                       f"`dualstpm register --run RUN`, or name its data with --data-root DIR")
    roots = ", ".join(f"{m.name} ({m.tags.get(f'{TAG}data_root', '?')})" for m in found)
    raise RunError(f"category {category!r} has registered models for several datasets: {roots}; "
                   "choose one with --data-root DIR (the data it was tested on)")
