"""Which MLflow run describes the model in a run directory, checked by content.

DVC restores a cached stage when its params return to an earlier value, so the model in
`RUN/model/` can be one trained by an earlier fit than the one `RUN/mlflow_run.json`
names. Two records keep the link verifiable:

- the fit writes `RUN/model/lineage.json` (store and run id) beside the model files, a
  DVC output of the fit stage, so it travels with the model wherever DVC restores it;
- the fit logs the sha256 of the model files to its run (tag `dualstpm.model_sha256`).

Whoever reopens the run to add to it or to register from it (test, ablate, register)
calls :func:`check_model_of_run` first: the files' hash must be the one that run logged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from dualstpm.errors import RunError
from dualstpm.files import write_json
from dualstpm.paths import CALIBRATION_FILE, MODEL_SUBDIR, PARAMS_FILE, WEIGHTS_FILE  # not detector: a hash needs no torch
from dualstpm.tracking import TAG, CategoryRun, tracking_errors

LINEAGE_FILE = "lineage.json"
MODEL_HASH_TAG = f"{TAG}model_sha256"
HASHED_FILES = (WEIGHTS_FILE, PARAMS_FILE, CALIBRATION_FILE)  # what the fit writes; not ablate's fusion.json


def model_sha256(model_dir: Path) -> str:
    """sha256 (hex) over the fit's model files: each file's name and its own sha256, in order."""
    total = hashlib.sha256()
    for name in HASHED_FILES:
        digest = hashlib.sha256()
        with (Path(model_dir) / name).open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        total.update(f"{name}\0{digest.hexdigest()}\n".encode())
    return total.hexdigest()


def read_lineage(run_dir: Path) -> dict | None:
    """`RUN/model/lineage.json` ({"tracking_uri", "run_id"}); None when the model has none."""
    path = Path(run_dir) / MODEL_SUBDIR / LINEAGE_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return {"tracking_uri": str(data["tracking_uri"]), "run_id": str(data["run_id"])}
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path} is damaged ({exc}): train the model again (`dualstpm fit ... --overwrite`)") from None


def record_model(run: CategoryRun, log_hash: bool = True) -> None:
    """Make `run` the model's run: write `RUN/model/lineage.json` and (with `log_hash`) log
    the model files' hash to it. Raises TrackingError when the store fails."""
    write_json(run.run_dir / MODEL_SUBDIR / LINEAGE_FILE,
               {"tracking_uri": run.client.tracking_uri, "run_id": run.run_id})
    if log_hash:
        run.log(run.run_id, "logging the model's hash", tags={MODEL_HASH_TAG: model_sha256(run.run_dir / MODEL_SUBDIR)})


def check_model_of_run(run: CategoryRun, category: str) -> None:
    """Refuse (RunError, with the fix) when the model files of `run.run_dir` are not the
    ones `run` logged.

    A run without the hash tag (its fit lost the store before logging it, or the model
    predates lineage records) gets it now, unless `lineage.json` names another run.
    """
    model_dir = run.run_dir / MODEL_SUBDIR
    actual = model_sha256(model_dir)
    with tracking_errors(run.client.tracking_uri, f"reading run {run.run_id}"):
        logged = run.client.get_run(run.run_id).data.tags.get(MODEL_HASH_TAG)
    lineage = read_lineage(run.run_dir)
    trained_in = lineage["run_id"] if lineage else None
    if logged == actual:
        return
    if logged is None and trained_in in (None, run.run_id):
        record_model(run)
        return
    origin = (f"they were trained in run {trained_in} ({model_dir / LINEAGE_FILE}), e.g. restored from DVC's "
              "cache after a later fit" if trained_in not in (None, run.run_id) else "they changed after that fit")
    raise RunError(
        f"the model files in {model_dir} are not the model MLflow run {run.run_id} trained "
        f"(sha256 {actual[:12]}, the run logged {(logged or 'none')[:12]}): {origin}. Its params and metrics "
        f"would describe another model. Train it again so that run and files agree: under DVC "
        f"`dvc repro --force --single-item fit@{category}` then `dvc repro`; otherwise "
        f"`dualstpm fit --overwrite --out {run.run_dir} ...` then `dualstpm test --run {run.run_dir} ...`"
    )
