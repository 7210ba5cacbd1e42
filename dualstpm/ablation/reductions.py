"""The score-reduction table: how the image score would rank parts under other reductions.

`dualstpm ablate` re-scores the stored maps of the model's trained fusion (`params.fusion`,
the fusion `dualstpm test` reports as `fused`) with each reduction of :data:`REDUCTIONS`:
the max, the top-k mean at three fractions and the smoothed max at three sigmas. The fused
maps do not change, so only image metrics are reported (test, and the selection set of
validation images plus real or synthetic defects, `evidence`, as `val_*`). The table is evidence only: the
model keeps the reduction it was calibrated with (`calibration.json`'s `score`); a default
is changed by editing `score.*` and refitting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from dualstpm.ablation.rescore import SplitScorer
from dualstpm.model.fusion import FusionSpec, ScoreSpec
from dualstpm.sizes import ImageSize, shortest_side

REDUCTIONS_FILE = "score_reductions.csv"
REDUCTIONS: tuple[ScoreSpec, ...] = (
    ScoreSpec("max"),
    *(ScoreSpec("topk_mean", topk=k) for k in (0.001, 0.01, 0.05)),
    *(ScoreSpec("smoothed_max", sigma=s) for s in (2.0, 4.0, 8.0)),
)


def table_reductions(image_size: ImageSize, model: ScoreSpec) -> list[ScoreSpec]:
    """:data:`REDUCTIONS` usable on a map at `image_size` (a smoothed max's blur reflect-pads
    by ceil(4 sigma) px, which must be below the map's shorter side, as `score.sigma` is
    checked), then the model's own reduction when the grid lacks it."""
    side = shortest_side(image_size)
    grid = [r for r in REDUCTIONS if r.reduce != "smoothed_max" or math.ceil(4 * r.sigma) < side]
    return grid if any(r.to_json() == model.to_json() for r in grid) else [*grid, model]


def reduction_table(spec: FusionSpec, splits: dict[str, SplitScorer], reductions: Sequence[ScoreSpec],
                    model: ScoreSpec) -> pd.DataFrame:
    """One row per reduction: name, reduce, topk, sigma, model (the model's own reduction),
    then `<split>_image_auroc` / `<split>_image_f1_max` (the test split's without prefix)."""
    rows = [{"name": r.label, "reduce": r.reduce, "topk": r.topk if r.reduce == "topk_mean" else None,
             "sigma": r.sigma if r.reduce == "smoothed_max" else None, "model": r.to_json() == model.to_json()}
            for r in reductions]
    for split, scorer in splits.items():
        prefix = "" if split == "test" else f"{split}_"
        for row, figures in zip(rows, scorer.reductions(spec, reductions), strict=True):
            row.update({f"{prefix}{k}": v for k, v in figures.items()})
    return pd.DataFrame(rows)


def reduction_summary(table: pd.DataFrame) -> dict:
    """What summary.json says about the table: rows, and the best on validation image AUROC
    (for the reader: nothing is applied)."""
    records = [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in table.to_dict("records")]
    val = table["val_image_auroc"] if "val_image_auroc" in table else None
    best = None if val is None or val.isna().all() else str(table["name"].iloc[int(val.fillna(-1).to_numpy().argmax())])
    return {"file": REDUCTIONS_FILE, "rows": records, "best_on_validation_image_auroc": best,
            "note": "reported only: the model keeps the reduction it was calibrated with (score in calibration.json)"}
