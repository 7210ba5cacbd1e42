"""The run directory as one contract: every file of a run and of its model directory, named
here and read or written through here.

A run directory (``dualstpm fit --out RUN``; ``runs/<category>`` under ``dvc repro``)::

    RUN/
      model/                      the model directory: what predict, serving and the exports load
        weights.safetensors       the four networks' weights (fit)
        discriminator.safetensors the discriminative stage, when fit.discriminator (fit)
        memory.safetensors        the memory bank of good patch features, when memory.enabled (fit)
        params.yaml               the params it was trained with (fit)
        calibration.json          thresholds and score normalisation (fit)
        lineage.json              the MLflow run that trained these files (fit)
        fusion.json               the ablation's applied (or declined) fusion (ablate)
      checkpoint.pt  history.csv  disc_history.csv                        (fit)
      metrics.json  auc_table.csv  data_files.json  plots/  maps/{test,val}.npz  (test)
      mlflow_run.json             which MLflow runs hold this run's history (fit, test)
      evaluations/<data hash>/    a later evaluation on changed data (test --new-evaluation)
      ablation/{table.csv,summary.json,...}  maps/val_synthetic.npz        (ablate)
      exports/<format>-<precision>/  exports made on demand (export, predict --backend)

`dvc.yaml`'s stage outputs are these names (:data:`STAGE_OUTPUTS`; a test holds the two
together). Only the standard library is imported at load, so the CLI can check a run
directory before torch loads; the readers import what they need when called.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dualstpm.errors import RunError

if TYPE_CHECKING:
    from torch import Tensor

# --------------------------------------------------------------------------- the model directory
MODEL_SUBDIR = "model"
WEIGHTS_FILE = "weights.safetensors"
DISC_WEIGHTS_FILE = "discriminator.safetensors"
MEMORY_FILE = "memory.safetensors"
PARAMS_FILE = "params.yaml"
CALIBRATION_FILE = "calibration.json"
LINEAGE_FILE = "lineage.json"
FUSION_FILE = "fusion.json"
#: what a fit writes and a trained model needs (ablate's fusion.json and the lineage are extra)
MODEL_FILES = (WEIGHTS_FILE, PARAMS_FILE, CALIBRATION_FILE)

# --------------------------------------------------------------------------- the run directory
CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.csv"
DISC_HISTORY_FILE = "disc_history.csv"
METRICS_FILE = "metrics.json"
AUC_TABLE = "auc_table.csv"
DATA_FILES = "data_files.json"  # beside each metrics.json: the tested category folder's files and their md5
RUN_RECORD = "mlflow_run.json"
PLOTS_DIR = "plots"
OVERLAY_GRID = "overlays.png"  # in plots/ (test) and ablation/ (redrawn with the applied fusion)
MAPS_DIR = "maps"
TEST_MAPS = "test.npz"
VAL_MAPS = "val.npz"
SYNTHETIC_MAPS = "val_synthetic.npz"
#: maps of the real defects in validation/<defect>/, written by test only when there are some (not a DVC output)
VAL_DEFECT_MAPS = "val_defects.npz"
EVALUATIONS_DIR = "evaluations"
ABLATION_DIR = "ablation"
ABLATION_TABLE_FILE = "table.csv"
SUMMARY_FILE = "summary.json"
EXPORTS_DIR = "exports"

# --------------------------------------------------------------------------- a predictions folder
PREDICTIONS_FILE = "predictions.csv"  # the table `dualstpm predict --out` writes (read by review, monitor)
OVERLAY_COLUMN = "overlay"  # its column naming each row's overlay file in the same folder
REGIONS_FILE = "regions.jsonl"  # beside it: one JSON line per defect region (docs/regions.md)
REVIEW_DIR = "review"  # PREDICTIONS_DIR/review/: the inspectors' verdicts (`dualstpm review`)
LOG_FILE = "verdicts.jsonl"  # in it: the review log

#: each DVC stage's outputs inside `runs/<category>/`, as `dvc.yaml` declares them
STAGE_OUTPUTS: Mapping[str, tuple[str, ...]] = {
    "fit": (*(f"{MODEL_SUBDIR}/{n}" for n in (*MODEL_FILES, LINEAGE_FILE)), CHECKPOINT_FILE, HISTORY_FILE),
    "test": (METRICS_FILE, AUC_TABLE, PLOTS_DIR, f"{MAPS_DIR}/{TEST_MAPS}", f"{MAPS_DIR}/{VAL_MAPS}"),
    "ablate": (ABLATION_DIR, f"{MODEL_SUBDIR}/{FUSION_FILE}", f"{MAPS_DIR}/{SYNTHETIC_MAPS}"),
}


@dataclass(frozen=True)
class RunDir:
    """The paths of one run directory (nothing is read or created by building one)."""

    path: Path

    def __init__(self, path: Path | str) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def model(self) -> Path:
        return self.path / MODEL_SUBDIR

    @property
    def weights(self) -> Path:
        return self.model / WEIGHTS_FILE

    @property
    def disc_weights(self) -> Path:
        return self.model / DISC_WEIGHTS_FILE

    @property
    def params(self) -> Path:
        return self.model / PARAMS_FILE

    @property
    def calibration(self) -> Path:
        return self.model / CALIBRATION_FILE

    @property
    def lineage(self) -> Path:
        return self.model / LINEAGE_FILE

    @property
    def fusion(self) -> Path:
        return self.model / FUSION_FILE

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def history(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def disc_history(self) -> Path:
        return self.path / DISC_HISTORY_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def run_record(self) -> Path:
        return self.path / RUN_RECORD

    @property
    def plots(self) -> Path:
        return self.path / PLOTS_DIR

    @property
    def maps(self) -> Path:
        return self.path / MAPS_DIR

    @property
    def test_maps(self) -> Path:
        return self.maps / TEST_MAPS

    @property
    def val_maps(self) -> Path:
        return self.maps / VAL_MAPS

    @property
    def synthetic_maps(self) -> Path:
        return self.maps / SYNTHETIC_MAPS

    @property
    def val_defect_maps(self) -> Path:
        return self.maps / VAL_DEFECT_MAPS

    @property
    def ablation(self) -> Path:
        return self.path / ABLATION_DIR

    @property
    def ablation_summary(self) -> Path:
        return self.ablation / SUMMARY_FILE

    def evaluation(self, data_hash: str) -> Path:
        """`RUN/evaluations/<data hash>/`: an evaluation on data that changed after the first."""
        return self.path / EVALUATIONS_DIR / data_hash.removesuffix(".dir")

    def export(self, fmt: str, precision: str) -> Path:
        """`RUN/exports/<format>-<precision>/`."""
        return self.path / EXPORTS_DIR / f"{fmt}-{precision}"


def review_dir(predictions_dir: Path | str) -> Path:
    """The review folder of a predictions folder: ``PREDICTIONS_DIR/review``."""
    return Path(predictions_dir) / REVIEW_DIR


def trained_model_dir(run_dir: Path | str) -> Path:
    """`RUN/model` when it holds weights, params and calibration; else RunError with the fix."""
    model_dir = RunDir(run_dir).model
    missing = [n for n in MODEL_FILES if not (model_dir / n).is_file()]
    if missing:
        raise RunError(
            f"{model_dir} is not a trained model (missing {', '.join(missing)}); "
            f"run `dualstpm fit --out {run_dir} ...` first"
        )
    return model_dir


# --------------------------------------------------------------------------- readers and writers
def read_json(path: Path, fix: str, error: type[Exception] = RunError) -> Any:
    """The JSON in `path`; `error` naming the file, the fault and `fix` when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as exc:
        raise error(f"{path} is damaged ({exc}): {fix}") from None


def read_optional_json(path: Path, fix: str, error: type[Exception] = RunError) -> Any | None:
    """:func:`read_json`, or None when the file does not exist."""
    return read_json(path, fix, error) if Path(path).is_file() else None


def read_lineage(run_dir: Path | str) -> dict[str, str] | None:
    """`RUN/model/lineage.json` ({"tracking_uri", "run_id"}: the MLflow run that trained the
    model files); None when the model has none. Raises RunError for a damaged file."""
    path = RunDir(run_dir).lineage
    fix = "train the model again (`dualstpm fit ... --overwrite`)"
    data = read_optional_json(path, fix)
    if data is None:
        return None
    try:
        return {"tracking_uri": str(data["tracking_uri"]), "run_id": str(data["run_id"])}
    except (KeyError, TypeError) as exc:
        raise RunError(f"{path} is damaged ({exc}): {fix}") from None


def read_weights(path: Path) -> dict[str, Tensor]:
    """The tensors of a safetensors file, on the CPU (never unpickled)."""
    from safetensors.torch import load_file

    return load_file(str(path))


def weights_bytes(state: Mapping[str, Tensor]) -> bytes:
    """A state dict as safetensors bytes (CPU, contiguous); written with `files.write_bytes`, so
    the file follows the umask (safetensors' `save_file` would make it 0600)."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def write_model_dir(run_dir: Path | str, weights: bytes, params_yaml: str, calibration: Mapping[str, Any],
                    disc_weights: bytes | None = None, memory_bank: bytes | None = None) -> Path:
    """Write `RUN/model/` atomically (`files.staged_dir`: built in a hidden sibling and swapped
    in whole): weights, optional discriminator weights and memory bank, params and
    calibration. Returns the model directory."""
    from dualstpm.files import staged_dir, write_bytes, write_json, write_text

    final = RunDir(run_dir).model
    with staged_dir(final) as staging:
        write_bytes(staging / WEIGHTS_FILE, weights)
        if disc_weights is not None:
            write_bytes(staging / DISC_WEIGHTS_FILE, disc_weights)
        if memory_bank is not None:
            write_bytes(staging / MEMORY_FILE, memory_bank)
        write_text(staging / PARAMS_FILE, params_yaml)
        write_json(staging / CALIBRATION_FILE, calibration)
    return final
