"""Retraining that learns from reviewed feedback: what to retrain, and what promotion weighs.

The Prefect `retrain` flow (flows/retrain.py) uses these around the pipeline's stages:

1. :func:`unchanged_categories`: a category whose data is the data its registered model
   (the champion, or the latest challenger) was already tested on is skipped, with the
   reason: retraining it would only reproduce that model. Any change to the category folder
   changes its hash (`mlops.hashing.data_hash`): `dualstpm feedback apply` adding reviewed parts,
   new images, a replaced mask.
2. The retrained categories are fitted, tested and ablated as by the pipeline; the reviewed
   defects in ``validation/<defect_type>/`` are their validation evidence there
   (`dualstpm.real_defects`), never their training data.
3. :func:`promotion_evidence`, after the challenger is registered: a champion tested on
   other data than the challenger (the data before the feedback) is re-tested on the
   challenger's data (:func:`rescore_champion`: its registered model, downloaded, through
   the same `evaluate_detector` as `dualstpm test`), and the figures are tagged on the
   champion version (`mlops.names.RESCORED_TAG`), so `promote` compares both on the same
   evaluation data. Both models also score the parts the inspector marked good although
   the old model had flagged them (:func:`reviewed_false_alarms`), and the share of those
   still above each model's threshold is measured (:func:`false_alarm_share`). All of it
   is tagged on the challenger with the decision (`promotion.evidence`).

The promotion decision itself stays the registry's rule (`mlops.promote.decide`) on the test metric (the test
split of the same data version): the reviewed parts are in that data version, but the
challenger learnt from them (good parts in train/good) or selected on them (defects), so
their figures are evidence beside the decision, not its measure.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dualstpm.config import Params
from dualstpm.data import read_image
from dualstpm.detector import Detector
from dualstpm.errors import ConfigError, RunError
from dualstpm.evaluation import evaluate_detector
from dualstpm.feedback import GOOD, read_provenance
from dualstpm.files import json_text
from dualstpm.mlops.hashing import data_hash
from dualstpm.mlops.names import CHALLENGER, CHAMPION, PROMOTION_METRICS, RESCORED_TAG, model_name
from dualstpm.mlops.promote import aliased_version
from dualstpm.mlops.tracking import TAG, Store, connect, tracking_errors
from dualstpm.model.inference import Scorer
from dualstpm.paths import category_dir
from dualstpm.predict import score_images
from dualstpm.rundir import MODEL_SUBDIR

DEFECTIVE = "defective"


def unchanged_categories(store: Store, data_root: Path, categories: Iterable[str]) -> dict[str, str]:
    """{category: why it is not retrained} for each of `categories` whose registered model
    (`mlops.names.model_name`) has a champion or a latest challenger tested on the category's
    data as it is now. Categories without a registered model, or whose folder is missing
    (the data check reports it), are retrained. Raises TrackingError when `store` does not answer."""
    client = connect(store, create=False)
    skipped = {}
    for category in categories:
        name = model_name(data_root, category)
        with tracking_errors(client.tracking_uri, f"reading {name}'s versions"):
            versions = {alias: aliased_version(client, name, alias) for alias in (CHAMPION, CHALLENGER)}
        if not any(versions.values()):
            continue
        try:
            now = data_hash(data_root, category)
        except ConfigError:
            continue
        for alias, version in versions.items():
            if version is not None and version.tags.get(f"{TAG}data_hash") == now:
                skipped[category] = (f"data unchanged: {name} version {version.version} ({alias}) was tested on this "
                                     f"data ({now}); add data (e.g. `dualstpm feedback apply`) or retrain all "
                                     "categories (`python -m flows.retrain --all`)")
                break
    return skipped


def reviewed_false_alarms(category: Path) -> tuple[list[Path], list[str]]:
    """(the parts the inspector marked good that the model had flagged defective, as they lie
    in `category` now; the provenance paths of such parts no longer there) from
    ``feedback.jsonl`` (`feedback.read_provenance`; DataError for a bad line)."""
    found: list[Path] = []
    missing: list[str] = []
    for entry in read_provenance(category):
        if entry["verdict"] != GOOD or entry.get("model_label") != DEFECTIVE:
            continue
        path = Path(category) / entry["path"]
        if path.is_file():
            found.append(path)
        else:
            missing.append(entry["path"])
    return found, missing


def false_alarm_share(scorer: Scorer, images: Sequence[Path], max_pixels: int) -> dict[str, Any]:
    """How many of `images` (parts known to be good) `scorer` flags: those whose score is
    above its threshold (the decision rule). {"images", "above_threshold", "share" (None
    without images)}. Raises DataError for an unreadable image or one above `max_pixels` pixels."""
    predictions = score_images(scorer, [read_image(path, max_pixels) for path in images]) if images else []
    flagged = sum(p.score > p.threshold for p in predictions)
    return {"images": len(images), "above_threshold": flagged, "share": flagged / len(images) if images else None}


def registered_detector(client, name: str, version: str, into: Path) -> Detector:
    """The model of registered version `version` of `name`, downloaded into `into` and loaded
    (the pyfunc's `model` artifact: what serving loads). Raises RunError when the version
    carries no model directory."""
    import mlflow

    with tracking_errors(client.tracking_uri, f"downloading {name} version {version}"):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(into),
                                                         tracking_uri=client.tracking_uri,
                                                         registry_uri=client.tracking_uri))
    if not (local / "artifacts" / MODEL_SUBDIR).is_dir():
        raise RunError(f"{name} version {version} holds no artifacts/{MODEL_SUBDIR}/ (downloaded to {local}): it was "
                       "not registered by `dualstpm register`; re-test and promote it by hand")
    return Detector.load(local / "artifacts")


def rescore_champion(client, name: str, champion, detector: Detector, data_root: Path, category: str,
                     evaluation_hash: str) -> dict[str, Any]:
    """Test the champion's `detector` on `category` in `data_root` (data `evaluation_hash`:
    the challenger's) as `dualstpm test` does, tag the figures of its decision view on the
    champion version (`RESCORED_TAG` + hash, read by `mlops.promote.promote`) and return them."""
    result = evaluate_detector(detector, data_root, category)
    row = result[result["default"]]
    figures = {**{m: row.get(m) for m in PROMOTION_METRICS}, "view": result["default"],
               "n_test_images": result["n_test_images"],
               "rescored_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "why": "the champion re-tested on the challenger's evaluation data by the retrain flow"}
    with tracking_errors(client.tracking_uri, f"tagging {name} version {champion.version}'s re-test"):
        client.set_model_version_tag(name, str(champion.version), f"{RESCORED_TAG}{evaluation_hash}",
                                     json_text(figures, indent=None))
    return figures


def promotion_evidence(params: Params, store: Store, data_root: Path, category: str, run_dir: Path) -> dict[str, Any]:
    """What the retrain flow hands `mlops.promote.promote` (its `evidence`) for the challenger just
    registered from `run_dir`: the evaluation data's hash, the champion's version and, when it
    was tested on other data, its re-test on this data (:func:`rescore_champion`, tagged on
    it), and the reviewed false alarms (:func:`reviewed_false_alarms`) scored by the champion
    (`old`) and the challenger (`new`). Raises RunError without a registered challenger."""
    client = connect(store, create=False)
    name = model_name(data_root, category)
    with tracking_errors(client.tracking_uri, f"reading {name}'s versions"):
        challenger, champion = aliased_version(client, name, CHALLENGER), aliased_version(client, name, CHAMPION)
    if challenger is None:
        raise RunError(f"{name} has no '{CHALLENGER}' version: register the retrained run first")
    evaluation_hash = challenger.tags.get(f"{TAG}data_hash", "")
    reviewed, missing = reviewed_false_alarms(category_dir(Path(data_root), category))
    max_pixels = params.data.max_image_pixels
    evidence: dict[str, Any] = {"data_hash": evaluation_hash, "champion_version": None, "champion_rescored": None}
    old = None
    with tempfile.TemporaryDirectory(prefix="dualstpm-champion-") as folder:
        if champion is not None and str(champion.version) != str(challenger.version):
            evidence["champion_version"] = str(champion.version)
            detector = registered_detector(client, name, str(champion.version), Path(folder))
            if champion.tags.get(f"{TAG}data_hash") != evaluation_hash:
                saved = champion.tags.get(f"{RESCORED_TAG}{evaluation_hash}")
                evidence["champion_rescored"] = (json.loads(saved) if saved is not None else rescore_champion(
                    client, name, champion, detector, data_root, category, evaluation_hash))
            old = false_alarm_share(detector, reviewed, max_pixels)
        new = false_alarm_share(Detector.load(run_dir), reviewed, max_pixels)
    evidence["reviewed_false_alarms"] = {
        "what": "parts the inspector marked good that the model then in use had flagged (feedback.jsonl): the "
                "share still scoring above each model's threshold",
        "old": old, "new": new, "missing": missing}
    return evidence


def describe_false_alarms(evidence: dict[str, Any]) -> str | None:
    """One line on the reviewed false alarms of `promotion_evidence`, or None without any."""
    alarms = evidence.get("reviewed_false_alarms") or {}
    new, old = alarms.get("new") or {}, alarms.get("old")
    if not new.get("images"):
        return None
    line = f"reviewed false alarms still flagged: {new['above_threshold']}/{new['images']} by the challenger"
    if old is not None:
        line += f", {old['above_threshold']}/{old['images']} by the champion (version {evidence['champion_version']})"
    return line
