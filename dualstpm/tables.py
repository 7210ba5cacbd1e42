"""What the CLI and the Prefect flows print for a person: metric values, the AUC table and a
pipeline's summary, on one stdout console.

Below both (`dualstpm.cli`, `flows/`), so that a flow never imports the CLI. Importing it
stays light: pandas and the stages are imported only when a table is printed.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import pandas as pd

#: columns of a console that writes to a file or a pipe (a log, CI), where rich would take 80
REDIRECTED_WIDTH = 160


def console(*, stderr: bool = False) -> Console:
    """A rich console for a person, on stdout (or stderr). On a terminal it takes the
    terminal's width. Redirected to a file or a pipe it takes :data:`REDIRECTED_WIDTH`
    columns instead of rich's 80, so that a log's tables keep their names whole. A `COLUMNS`
    environment variable wins either way."""
    made = Console(stderr=stderr)
    if not made.is_terminal and "COLUMNS" not in os.environ:
        made.width = REDIRECTED_WIDTH
    return made


out = console()


def format_metric(value: float | None) -> str:
    """A metric for a table cell: four decimals, `n/a` when undefined (None or NaN)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.4f}"


def print_auc_table(table: pd.DataFrame, title: str) -> None:
    """The AUC table (`stages.metrics_table`: a row per category and model) on stdout."""
    from dualstpm.mlops.stages import TABLE_METRICS

    view = Table(title=title)
    for name in ("category", "model"):
        view.add_column(name, no_wrap=True)  # names whole; on a narrow terminal the headers wrap instead
    for name in ("image AUROC", "pixel AUROC", "AUPRO", "image F1-max"):
        view.add_column(name, justify="right")
    for row in table.to_dict(orient="records"):
        view.add_row(row["category"], row["model"], *(format_metric(row[m]) for m in TABLE_METRICS))
    out.print(view)


def print_pipeline_summary(summary: dict) -> None:
    """What a pipeline or retrain flow returned: the AUC table, each category's ablation
    outcome (what the model now decides with), then each promotion decision."""
    import pandas as pd

    print_auc_table(pd.DataFrame(summary["auc_table"]), f"AUC table ({summary['reports']})")
    for category, outcome in summary["ablations"].items():
        out.print(f"{category}: ablation {outcome}")
    for category, why in summary.get("skipped", {}).items():
        out.print(f"{category}: not retrained: {why}")
    for decision in summary["promotions"].values():
        verdict = "promoted" if decision.promoted else "not promoted"
        out.print(f"{decision.model_name}: version {decision.challenger_version} {verdict}; "
                  f"champion: version {decision.champion_version} ({decision.reason})")
