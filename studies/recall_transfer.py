"""Does recall on synthetic validation defects predict recall on real defects? (issue 22, recall target)

Run from the project root on tested and ablated run directories: `dualstpm fit`, `test`
and `ablate` make one (`runs/<category>`), and so does `studies.compare_anomalib --work-dir
WORK` (`WORK/dualstpm/<category>`)::

    python -m studies.recall_transfer RUN [RUN ...] --out studies/results/recall_transfer.json

Issue 22 asks for recall at the calibrated 1 % false-alarm rate at least PatchCore's, and
nothing in the product chooses for it: `ablate` chooses its fusion on image AUROC, pixel
AUROC and AUPRO of synthetic defects pasted on the selection images. Issue 22 item 6
allows synthetic evidence only where it predicts the real outcome across the datasets. So,
for every configuration of each run's ablation grid (the same grid, views and stored maps
as `dualstpm.ablation.run.ablate`), this study measures:

- **validation recall**: the threshold is set by the product's rule
  (`dualstpm.model.calibration.calibrate_threshold`, split conformal at
  `calibration.false_alarm_rate`) on the good selection images. Validation recall is the
  share of their synthetic defective copies scoring strictly above it. Only the selection
  part is read, as `ablate` reads it.
- **test recall**, for the record: the threshold is set by the same rule on the
  calibration part of the validation images, as the product sets it. Test recall is the
  share of the defective test images above it, `test_far` the share of the good test images.

Per run it reports:
- the Spearman rank correlation between the two over the grid, and, for comparison, the
  one between validation and test image AUROC (`ablation/table.csv`);
- the configuration that `ablate`'s `mean` metric picks on validation with recall added to
  it (`val_*` columns of `ablation/table.csv` only), beside the one it picks now.

Test figures never feed a choice here; they only say whether the validation figure
predicts them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from dualstpm.ablation.grid import build_grid
from dualstpm.ablation.run import with_default
from dualstpm.ablation.selection import (SELECTION_METRICS, best_row, mean_score, selection_part, selection_set, subset,
                                         synthetic_maps)
from dualstpm.data import validation_parts
from dualstpm.detector import read_model_dir
from dualstpm.files import write_json, write_text
from dualstpm.maps import MapSet
from dualstpm.model.calibration import calibrate_threshold
from dualstpm.model.fusion import FusionSpec
from dualstpm.model.inference import MapViews
from dualstpm.rundir import ABLATION_DIR, ABLATION_TABLE_FILE, MAPS_DIR, TEST_MAPS, VAL_MAPS


def recall_at_calibrated_threshold(good_calibration: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                                   false_alarm_rate: float) -> tuple[float, float | None]:
    """(recall, false-alarm rate) of `scores` (N,) with `labels` (N,; 1 = defective) at the
    threshold `calibrate_threshold(good_calibration, false_alarm_rate)`: the shares of the
    defective and of the good images scoring strictly above it (the rate None without good
    images). Raises ValueError without defective images."""
    labels = np.asarray(labels).astype(bool)
    if not labels.any():
        raise ValueError("no defective image: recall is undefined")
    threshold = calibrate_threshold(good_calibration, false_alarm_rate)
    above = np.asarray(scores, dtype=np.float64) > threshold
    return float(above[labels].mean()), (float(above[~labels].mean()) if (~labels).any() else None)


def mean_pick(table: pd.DataFrame, columns: list[str]) -> int:
    """Row position of the highest mean of `columns`, by `ablate`'s own rule (ties: the earliest row)."""
    return best_row(mean_score(table, columns))


def transfer(run_dir: Path) -> dict:
    """The grid's validation and test recall of one tested, ablated run (see the module docstring)."""
    _, params, calibration = read_model_dir(run_dir)
    test, val = MapSet.load(run_dir / MAPS_DIR / TEST_MAPS), MapSet.load(run_dir / MAPS_DIR / VAL_MAPS)
    parts = validation_parts(len(val), params.calibration.split, params.seed)
    selection = selection_set(*selection_part(val, synthetic_maps(run_dir, val, params.ablation), parts.selection))
    calibration_part = subset(val, parts.calibration)
    published = FusionSpec.from_params(params.fusion)
    views = MapViews(published, calibration.map_stats, score=calibration.score, memory=calibration.memory_stats)
    configs, default = with_default(build_grid(params.ablation, params.fusion.sigma,
                                               memory=calibration.memory_stats is not None), published)
    rate = params.calibration.false_alarm_rate
    selection_labels = selection.labels.astype(bool)
    rows = []
    for config in configs:
        _, selection_scores = views.stack(selection.raw, config.spec)
        _, calibration_scores = views.stack(calibration_part.raw, config.spec)
        _, test_scores = views.stack(test.raw, config.spec)
        selection_scores = np.asarray(selection_scores, dtype=np.float64)
        val_recall, _ = recall_at_calibrated_threshold(selection_scores[~selection_labels], selection_scores,
                                                       selection_labels, rate)
        test_recall, test_far = recall_at_calibrated_threshold(np.asarray(calibration_scores, dtype=np.float64),
                                                               test_scores, test.labels, rate)
        rows.append({"name": config.name, "val_recall": val_recall, "test_recall": test_recall, "test_far": test_far})
    grid = pd.DataFrame(rows)
    table = pd.read_csv(run_dir / ABLATION_DIR / ABLATION_TABLE_FILE)
    if list(table["name"]) != list(grid["name"]):
        raise ValueError(f"{run_dir / ABLATION_DIR / ABLATION_TABLE_FILE} lists another grid: run `dualstpm ablate` "
                         "again with the run's params")
    table["val_recall"] = grid["val_recall"]
    now = [f"val_{m}" for m in SELECTION_METRICS["mean"]]
    picks = {"mean": mean_pick(table, now), "mean_with_recall": mean_pick(table, [*now, "val_recall"])}
    rho = spearmanr(grid["val_recall"], grid["test_recall"])
    rho_image = spearmanr(table["val_image_auroc"], table["image_auroc"])  # the same for the metric `ablate` uses
    return {
        "run": str(run_dir), "category": str(test.meta.get("category", run_dir.name)),
        "false_alarm_rate": rate, "selection_good": int((~selection_labels).sum()),
        "selection_defective": int(selection_labels.sum()), "calibration_images": len(parts.calibration),
        "configurations": len(grid), "default": configs[default].name,
        "spearman": float(rho.statistic), "spearman_p": float(rho.pvalue),
        "spearman_image_auroc": float(rho_image.statistic),
        "val_recall_distinct": int(grid["val_recall"].nunique()),
        "picks": {k: {"name": str(table["name"][i]), "val_recall": float(table["val_recall"][i]),
                      "test_recall": float(grid["test_recall"][i])} for k, i in picks.items()},
        "grid": grid.to_dict(orient="records"),
    }


def markdown(results: list[dict]) -> str:
    lines = ["| dataset | good / synthetic selection images | configurations | distinct validation recalls | "
             "Spearman (val, test recall) | the same for image AUROC | pick now | pick with recall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['category']} | {r['selection_good']} / {r['selection_defective']} | {r['configurations']} | "
                     f"{r['val_recall_distinct']} | {r['spearman']:.3f} (p {r['spearman_p']:.1g}) | "
                     f"{r['spearman_image_auroc']:.3f} | {r['picks']['mean']['name']} | "
                     f"{r['picks']['mean_with_recall']['name']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="tested and ablated run directories")
    parser.add_argument("--out", type=Path, required=True, help="JSON result; a markdown table goes next to it (.md)")
    args = parser.parse_args(argv)
    results = [transfer(run) for run in args.runs]
    write_json(args.out, {"results": results})
    write_text(args.out.with_suffix(".md"), markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
