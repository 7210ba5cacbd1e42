"""The pipeline's stages as plain functions: the CLI, `dvc.yaml` and Prefect flows call these.

Each takes validated `Params` and paths, does one thing, and returns plain data.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dualstpm.config import Params
from dualstpm.data import load_category, make_synthetic_category, prepare_mvtec
from dualstpm.errors import DataError
from dualstpm.evaluation import test_run
from dualstpm.training import fit

TABLE_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")


def synthetic_kind(category: str) -> str:
    """Synthetic categories say their kind in their name: `*object*` -> object, else texture."""
    return "object" if "object" in category else "texture"


def prepare_data(params: Params) -> Path:
    """Make the configured categories available and return the data root.

    - `synthetic`: generate each missing category (deterministic, seeded by `seed`);
    - `folder`: check that each category exists in `data.root` in MVTec AD layout;
    - `mvtec`: download (or take the user's archive), verify and extract.
    """
    root = Path(params.data.root)
    source = params.data.source
    if source == "synthetic":
        for index, category in enumerate(params.data.categories):
            if not (root / category).is_dir():
                make_synthetic_category(root, category, synthetic_kind(category), seed=params.seed + index)
    elif source == "folder":
        if not root.is_dir():
            raise DataError(f"data.root {root} is not a folder: point data.root at an MVTec-layout data root")
        for category in params.data.categories:
            load_category(root, category)
    else:
        mvtec = params.data.mvtec
        prepare_mvtec(root, params.data.categories, url=mvtec.url, sha256=mvtec.sha256, archive=Path(mvtec.archive))
    return root


def fit_and_test(params: Params, data_root: Path, category: str, run_dir: Path) -> dict:
    """Train a fresh model for `category` into `run_dir` and test it; returns metrics.json's content."""
    fit(params, data_root, category, run_dir, overwrite=True)
    return test_run(run_dir, data_root, category)


def metrics_table(results: dict[str, dict]) -> pd.DataFrame:
    """One row per (category, view) with the headline metrics, plus a mean row per view."""
    rows = [
        {"category": category, "model": view, **{m: result[view][m] for m in TABLE_METRICS}}
        for category, result in results.items()
        for view in ("stpm", "recon", "fused")
    ]
    table = pd.DataFrame(rows)
    if len(results) > 1:
        means = table.groupby("model", sort=False)[list(TABLE_METRICS)].mean().reset_index()
        means.insert(0, "category", "mean")
        table = pd.concat([table, means], ignore_index=True)
    return table
