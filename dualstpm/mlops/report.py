"""The report stage: one AUC table over all categories, with their curves and overlays.

It reads what `dualstpm test` left in each run directory (`metrics.json`, `plots/`) and
writes one report folder, laid out for DVC (and read as plain files by everyone else):

    auc_table.csv               category, model, image_auroc, pixel_auroc, aupro, image_f1_max;
                                models: stpm, recon, fused (published fusion) and, once the
                                runs are ablated, fused_chosen (the fusion the ablation kept:
                                the validation-chosen one when its bootstrap margin adopted it,
                                else params.fusion); a `mean` row per model (2+ categories)
    metrics/<category>.json     the same figures as DVC metrics: `dvc metrics show` prints
    metrics/mean.json           one row per category
    ablation.csv                the cross-category ablation table (`ablation_report`), with
                                the oracle labelled as such
    plots/roc/<category>.csv    fpr, then the tpr of each model on one fpr grid: one DVC
                                plot per category with the three models as series
    plots/pro/<category>.csv    fpr, then the per-region overlap of each model
                                (categories with ground-truth masks only)
    dvc.yaml                    one DVC plot per category and curve, titled with the category
                                and the views (`dvc plots show` reads every dvc.yaml)
    overlays/<category>.png     the grid of heat-map overlays of the category in the model's
                                decision view (`ablation/overlays.png` once ablated, else the
                                test's `plots/overlays.png`)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from dualstpm.ablation import ablation_report, report_metrics
from dualstpm.errors import RunError
from dualstpm.figures import PRO_GRID
from dualstpm.files import staged_dir, write_json, write_text
from dualstpm.mlops.stages import metrics_table
from dualstpm.model.fusion import VIEWS
from dualstpm.rundir import ABLATION_DIR, AUC_TABLE, METRICS_FILE, OVERLAY_GRID, PLOTS_DIR, SUMMARY_FILE

REPORT_FOLDERS = ("metrics", "plots", "overlays")
ABLATION_TABLE = "ablation.csv"
CHOSEN = "fused_chosen"
DVC_PLOTS_FILE = "dvc.yaml"
# curve kind -> (its y column in RUN/plots/<kind>/<view>.csv, chart title, y axis label)
CURVES = {"roc": ("tpr", "image ROC", "true-positive rate"),
          "pro": ("pro", "per-region overlap (AUPRO to 30 % FPR)", "PRO")}
MEAN = "mean"


def read_results(run_dirs: Mapping[str, Path]) -> dict[str, dict]:
    """`metrics.json` of each category's run directory, in the given order."""
    results = {}
    for category, run_dir in run_dirs.items():
        path = Path(run_dir) / METRICS_FILE
        if not path.is_file():
            raise RunError(f"{path} does not exist: test the run first (dualstpm test --run {run_dir}).")
        results[category] = json.loads(path.read_text())
    return results


def _with_chosen(table: pd.DataFrame, ablation: pd.DataFrame, categories: list[str]) -> pd.DataFrame:
    """The AUC table plus each category's validation-chosen fusion, rows kept in category order."""
    chosen = ablation[(ablation["model"] == CHOSEN) & ablation["category"].isin(table["category"])]
    order = {c: i for i, c in enumerate([*categories, MEAN])}
    merged = pd.concat([table, chosen.drop(columns="config")], ignore_index=True)
    return merged.sort_values("category", key=lambda column: column.map(order), kind="stable").reset_index(drop=True)


def _ablated(run_dirs: Mapping[str, Path]) -> bool:
    """Whether the runs carry an ablation: all of them, or none (a mix is refused)."""
    missing = [c for c, d in run_dirs.items() if not (Path(d) / ABLATION_DIR / SUMMARY_FILE).is_file()]
    if missing and len(missing) < len(run_dirs):
        raise RunError(f"runs of {', '.join(missing)} have no ablation: run `dualstpm ablate --run RUN` on them "
                       "(the report compares every category the same way)")
    return not missing


def _step_at(fpr: np.ndarray, tpr: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """A ROC curve is a staircase: its tpr at each grid fpr is that of the last point at or left of it."""
    return tpr[np.searchsorted(fpr, grid, side="right") - 1]


def _curves(run_plots: Path, kind: str, column: str) -> pd.DataFrame | None:
    """One frame per category: `fpr` on PRO_GRID plus one column per model, or None when absent."""
    folder = run_plots / kind
    if not folder.is_dir():
        return None
    frame = pd.DataFrame({"fpr": PRO_GRID})
    for view in VIEWS:
        curve = pd.read_csv(folder / f"{view}.csv")
        frame[view] = _step_at(curve["fpr"].to_numpy(), curve[column].to_numpy(), PRO_GRID)
    return frame


def _write_category_figures(category: str, run_dir: Path, out: Path) -> list[str]:
    """Curves and overlay grid of one category into the report; returns the curve kinds written."""
    run_plots = Path(run_dir) / PLOTS_DIR
    written = []
    for kind, (column, _, _) in CURVES.items():
        frame = _curves(run_plots, kind, column)
        if frame is not None:
            (out / "plots" / kind).mkdir(parents=True, exist_ok=True)
            frame.to_csv(out / "plots" / kind / f"{category}.csv", index=False)
            written.append(kind)
    redrawn = Path(run_dir) / ABLATION_DIR / OVERLAY_GRID  # the decision view after the ablation's choice
    grid = redrawn if redrawn.is_file() else run_plots / OVERLAY_GRID
    if grid.is_file():
        (out / "overlays").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grid, out / "overlays" / f"{category}.png")
    return written


def write_dvc_plots(out_dir: Path, curves: Mapping[str, list[str]]) -> Path:
    """`out_dir/dvc.yaml`: one DVC plot per category and curve kind ({category: kinds}),
    titled with the category and listing the views drawn, for `dvc plots show`."""
    plots = []
    for category, kinds in curves.items():
        for kind in kinds:
            _, title, y_label = CURVES[kind]
            plots.append({f"{category} {kind}": {
                "template": "linear", "x": "fpr", "y": {f"plots/{kind}/{category}.csv": list(VIEWS)},
                "title": f"{category}: {title}, views {', '.join(VIEWS)}",
                "x_label": "false-positive rate", "y_label": y_label,
            }})
    header = "# Written by `dualstpm report`: the per-category curves for `dvc plots show`.\n"
    return write_text(Path(out_dir) / DVC_PLOTS_FILE, header + yaml.safe_dump({"plots": plots}, sort_keys=False))


def write_report(run_dirs: Mapping[str, Path], out_dir: Path) -> pd.DataFrame:
    """Write the report of the tested `run_dirs` ({category: run dir}) to `out_dir`; returns the AUC table.

    The report is built in a staging folder and swapped in whole (`files.staged_dir`): a
    crash leaves the previous report, never half of one, and a category no longer reported
    does not linger. Anything else in `out_dir`, such as the `.gitignore` DVC keeps there,
    is carried over.
    """
    if not run_dirs:
        raise RunError("no categories to report on: every category failed or none was given.")
    table = metrics_table(read_results(run_dirs))
    ablation = ablation_report(list(run_dirs.values())) if _ablated(run_dirs) else None
    if ablation is not None:
        table = _with_chosen(table, ablation, list(run_dirs))
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as staging:
        _carry_over(out_dir, staging)
        (staging / "metrics").mkdir()
        if ablation is not None:
            ablation.to_csv(staging / ABLATION_TABLE, index=False)
        for category, figures in report_metrics(table).items():
            write_json(staging / "metrics" / f"{category}.json", figures)
        curves = {category: _write_category_figures(category, Path(run_dir), staging)
                  for category, run_dir in run_dirs.items()}
        write_dvc_plots(staging, curves)
        table.to_csv(staging / AUC_TABLE, index=False)
    return table


def _carry_over(out_dir: Path, staging: Path) -> None:
    """Copy what in `out_dir` is not the report's own (e.g. DVC's `.gitignore`) into `staging`."""
    own = {*REPORT_FOLDERS, ABLATION_TABLE, AUC_TABLE, DVC_PLOTS_FILE}
    for entry in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
        if entry.name in own:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, staging / entry.name, symlinks=True)
        else:
            shutil.copy2(entry, staging / entry.name, follow_symlinks=False)
