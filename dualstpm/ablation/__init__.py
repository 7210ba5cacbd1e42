"""The fusion-weight ablation: which of the six maps earn their place, per category.

`ablate(run_dir, params.ablation)` re-scores a tested run's stored maps under a grid of
fusions (`grid`), chooses one on validation images plus the category's real validation
defects when it has them, else synthetic ones (`evidence`, `selection`, `defects`), writes the table, summary and figures (`run`, `figures`) and, when asked,
hands the choice to the detector. `ablation_report(run_dirs)` compares categories.
"""

from dualstpm.ablation.grid import Config, build_grid
from dualstpm.ablation.report import ablation_report, read_summary, report_metrics
from dualstpm.ablation.run import AblationResult, ablate, describe_outcome

__all__ = [
    "AblationResult",
    "Config",
    "ablate",
    "ablation_report",
    "build_grid",
    "describe_outcome",
    "read_summary",
    "report_metrics",
]
