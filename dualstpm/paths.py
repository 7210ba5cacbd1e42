"""The paths a command is given, checked before anything heavy is imported.

Only the standard library is used here, so the CLI can refuse a missing data root, run
directory or image path in a fraction of a second, before torch, timm, MLflow or Prefect
load. The library's readers use the same checks, so every front gives the same message.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path

from dualstpm.errors import DataError, RunError

MODEL_SUBDIR = "model"
WEIGHTS_FILE = "weights.safetensors"
PARAMS_FILE = "params.yaml"
CALIBRATION_FILE = "calibration.json"
PREDICTIONS_FILE = "predictions.csv"  # the table `dualstpm predict --out` writes (read by review, monitor)
OVERLAY_COLUMN = "overlay"  # its column naming each row's overlay file in the same folder
REGIONS_FILE = "regions.jsonl"  # beside it: one JSON line per defect region (docs/regions.md)
_GLOB_CHARS = frozenset("*?[")


def category_dir(data_root: Path, category: str) -> Path:
    """`data_root/category`; raises DataError naming the folder and the categories there are."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise DataError(
            f"data root {data_root.absolute()} does not exist or is not a folder: "
            "point the data root at the folder that holds the category folders."
        )
    root = data_root / category
    if not root.is_dir():
        found = sorted(p.name for p in data_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataError(
            f"category folder {root.absolute()} not found. Categories in "
            f"{data_root.absolute()}: {', '.join(found) or 'none'}. Fix the category name or the data root."
        )
    return root


def trained_model_dir(run_dir: Path) -> Path:
    """`run_dir/model` when it holds weights, params and calibration; else RunError with the fix."""
    model_dir = Path(run_dir) / MODEL_SUBDIR
    missing = [n for n in (WEIGHTS_FILE, PARAMS_FILE, CALIBRATION_FILE) if not (model_dir / n).is_file()]
    if missing:
        raise RunError(
            f"{model_dir} is not a trained model (missing {', '.join(missing)}); "
            f"run `dualstpm fit --out {run_dir} ...` first"
        )
    return model_dir


def expand_paths(paths: Sequence[Path | str]) -> list[Path]:
    """Paths as given, each glob pattern (`'imgs/*.png'`, `'**/*.jpg'`) expanded in sorted order.

    A path that exists is taken literally, even with `*`, `?` or `[` in its name; a pattern
    is expanded only when no such file exists (as a shell would, for quoted patterns).
    Raises DataError naming a path that does not exist or a pattern that matches nothing.
    """
    expanded: list[Path] = []
    for raw in map(str, paths):
        if Path(raw).exists():
            expanded.append(Path(raw))
        elif _GLOB_CHARS & set(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                raise DataError(f"the pattern {raw!r} matches no file: check the folder and the pattern")
            expanded.extend(map(Path, matches))
        else:
            raise DataError(f"{raw} does not exist: pass image files, folders of images or a quoted pattern such as 'imgs/*.png'")
    return expanded
