"""The cross-category ablation table: STPM alone vs fused (published) vs fused
(validation-chosen), with the oracle for reference, one block per category and a mean.

The pipeline's `report` stage calls `ablation_report`; `dualstpm ablate-report` writes it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from dualstpm.ablation.selection import METRICS
from dualstpm.errors import RunError
from dualstpm.metrics import category_means
from dualstpm.rundir import ABLATION_DIR, SUMMARY_FILE

MODELS = {"stpm_alone": "stpm", "fused_published": "fused_published", "fused_chosen": "fused_chosen", "oracle": "oracle"}


def read_summary(run_dir: Path) -> dict:
    """`RUN/ablation/summary.json`; RunError naming the fix when `ablate` has not run, or when
    an earlier dualstpm wrote it (no `decision_view`)."""
    path = Path(run_dir) / ABLATION_DIR / SUMMARY_FILE
    if not path.is_file():
        raise RunError(f"{path} not found: run `dualstpm ablate --run {run_dir}` first")
    summary = json.loads(path.read_text())
    if "decision_view" not in summary:
        raise RunError(f"{path} has no decision_view: an earlier dualstpm wrote it; "
                       f"run `dualstpm ablate --run {run_dir}` again")
    return summary


def ablation_report(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """Rows (category, model, config, metrics...) for model in stpm, fused_published,
    fused_chosen and oracle (best on test, not a valid estimate), then `mean` rows
    (null where not every category has the metric: `metrics.category_means`)."""
    if not run_dirs:
        raise RunError("no run directories given: pass the runs that `dualstpm ablate` has processed")
    rows = []
    for run_dir in run_dirs:
        summary = read_summary(run_dir)
        for key, model in MODELS.items():
            figures = summary.get(key)
            if figures is not None:
                rows.append({"category": summary["category"], "model": model, "config": figures["config"],
                             **{m: figures[m] for m in METRICS}})
    table = pd.DataFrame(rows)
    means = category_means(table, METRICS)
    means.insert(2, "config", "")
    return pd.concat([table, means], ignore_index=True)


def report_metrics(table: pd.DataFrame) -> dict:
    """{category: {model: {metric: value}}}: the nested JSON `dvc metrics` and MLflow read."""
    nested: dict = {}
    for row in table.to_dict(orient="records"):
        nested.setdefault(row["category"], {})[row["model"]] = {
            m: None if pd.isna(row[m]) else float(row[m]) for m in METRICS
        }
    return nested
