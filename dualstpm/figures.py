"""Figures of a test run: ROC and PRO curves (CSV + PNG) and a grid of heat-map overlays.

Written into `RUN/plots/` by `dualstpm test`, so the same files serve DVC (curves as
plots, one CSV per view so that each view is one series; overlays as an image folder)
and MLflow (logged as artifacts of the category's run):

    plots/roc/{fused,stpm,recon}.csv   image-level ROC: fpr, tpr
    plots/pro/{fused,stpm,recon}.csv   per-region overlap: fpr, pro (pixel-level categories only)
    plots/roc.png, plots/pro.png       the three views in one chart each
    plots/overlays/*.png               heat maps of the most telling test images (`dualstpm.overlays`)
    plots/overlays.png                 those overlays as one grid, ground truth outlined

Matplotlib's object API is used (no pyplot), so nothing depends on a display or backend.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dualstpm import metrics
from dualstpm.data import read_image
from dualstpm.detector import Detector
from dualstpm.files import atomic_file, staged_dir
from dualstpm.fusion import VIEWS
from dualstpm.overlays import GRID_CELL_WIDTH, draw_overlay, fusion_label, overlay_grid, overlay_scale
from dualstpm.predict import score_images

PLOTS_DIR = "plots"
PRO_GRID = np.linspace(0.0, 1.0, 1001)  # the exact PRO curve has a point per pixel threshold
GRID_COLUMNS = 4
OVERLAY_GRID = "overlays.png"


def _curve_chart(path: Path, curves: dict[str, tuple[np.ndarray, np.ndarray, float | None]],
                 title: str, ylabel: str, fpr_limit: float | None = None) -> None:
    fig = Figure(figsize=(5, 4.5))
    ax = fig.subplots()
    for view, (x, y, area) in curves.items():
        label = view if area is None else f"{view} ({area:.3f})"
        ax.plot(x, y, label=label)
    if fpr_limit is not None:
        ax.axvline(fpr_limit, color="grey", linestyle=":", label=f"AUPRO limit ({fpr_limit:.0%} FPR)")
    else:
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.set(xlabel="false-positive rate", ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def write_roc(plots_dir: Path, labels: np.ndarray, scores: dict[str, np.ndarray]) -> bool:
    """Image-level ROC per view; False (nothing written) when the test split has one class only."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return False
    (plots_dir / "roc").mkdir(parents=True, exist_ok=True)
    curves = {}
    for view in VIEWS:
        fpr, tpr = metrics.roc_curve_points(labels, scores[view])
        pd.DataFrame({"fpr": fpr, "tpr": tpr}).to_csv(plots_dir / "roc" / f"{view}.csv", index=False)
        curves[view] = (fpr, tpr, metrics.image_auroc(labels, scores[view]))
    _curve_chart(plots_dir / "roc.png", curves, "image ROC (AUROC)", "true-positive rate")
    return True


def write_pro(plots_dir: Path, masks: np.ndarray, maps: dict[str, np.ndarray]) -> bool:
    """Per-region-overlap curve per view, resampled on a 0.001 FPR grid; False without regions."""
    if not masks.any() or masks.all():
        return False
    (plots_dir / "pro").mkdir(parents=True, exist_ok=True)
    curves = {}
    for view in VIEWS:
        fpr, pro = metrics.pro_curve(masks, maps[view])
        # fpr is non-decreasing; at repeated fpr values np.interp takes the last (highest) pro.
        grid_pro = np.interp(PRO_GRID, fpr, pro)
        pd.DataFrame({"fpr": PRO_GRID, "pro": grid_pro}).to_csv(plots_dir / "pro" / f"{view}.csv", index=False)
        curves[view] = (PRO_GRID, grid_pro, metrics.aupro(masks, maps[view]))
    _curve_chart(plots_dir / "pro.png", curves, "per-region overlap (AUPRO at 30 % FPR)", "PRO",
                 fpr_limit=metrics.FPR_LIMIT)
    return True


def telling_images(labels: np.ndarray, scores: np.ndarray, count: int = 8) -> list[int]:
    """Indices worth a look, in this order: the clearest detections, the worst-missed
    defect, the worst false alarm, then the quietest good part (duplicates dropped)."""
    order = np.argsort(-scores, kind="stable")
    defective = [int(i) for i in order if labels[i]]
    good = [int(i) for i in order if not labels[i]]
    wanted = defective[: max(count - 3, 1)] + defective[-1:] + good[:1] + good[-1:]
    chosen: list[int] = []
    for index in wanted:
        if index not in chosen:
            chosen.append(index)
    return chosen[:count]


def overlay_name(defect_type: str, path: Path) -> str:
    """The name a test image goes by in overlays: `<defect type>_<file stem>`."""
    return f"{defect_type}_{path.stem}"


def write_overlays(out_dir: Path, detector: Detector, paths: Sequence[Path], labels: np.ndarray,
                   scores: np.ndarray, names: Sequence[str], masks: np.ndarray | None) -> Path:
    """Overlays of the telling images in the detector's decision view: one PNG each in
    `out_dir/overlays/` and a grid of them, `out_dir/overlays.png` (returned).

    paths: the test images (N,), read at their own size; labels (N,) bool; scores (N,):
    the decision view's image scores, which choose the telling images; names (N,);
    masks: (N, h, w) bool ground truth at any size, outlined in white, or None.
    """
    chosen = telling_images(labels, scores)
    originals = [read_image(Path(paths[i])) for i in chosen]
    scale = overlay_scale(detector)
    folder = out_dir / "overlays"
    shutil.rmtree(folder, ignore_errors=True)  # another choice of images must not leave old ones
    folder.mkdir(parents=True)
    cells = []
    for index, original, result in zip(chosen, originals, score_images(detector, originals), strict=True):
        mask = masks[index] if masks is not None else None
        args = (original, result.anomaly_map, scale, result.score, result.label)
        with atomic_file(folder / f"{index:03d}_{names[index]}.png") as tmp:
            draw_overlay(*args, title=names[index], mask=mask).save(tmp)
        cells.append(draw_overlay(*args, title=names[index], mask=mask, width=GRID_CELL_WIDTH))
    heading = (f"{detector.calibration.category}: {detector.decision_view} anomaly maps, fusion {fusion_label(detector)} "
               "(white outline: ground truth)")
    grid_path = out_dir / OVERLAY_GRID
    with atomic_file(grid_path) as tmp:
        overlay_grid(cells, heading, GRID_COLUMNS).save(tmp)
    return grid_path


def write_test_figures(plots_dir: Path, detector: Detector, paths: Sequence[Path], labels: np.ndarray,
                       scores: dict[str, np.ndarray], names: Sequence[str],
                       maps: dict[str, np.ndarray] | None = None, masks: np.ndarray | None = None) -> Path:
    """All figures of one test run into a fresh `plots_dir` (old files would mislead), built
    in a staging folder and swapped in whole (`files.staged_dir`)."""
    plots_dir = Path(plots_dir)
    with staged_dir(plots_dir) as staging:
        write_roc(staging, labels, scores)
        if maps is not None and masks is not None:
            write_pro(staging, masks, maps)
        write_overlays(staging, detector, paths, np.asarray(labels, dtype=bool), scores[detector.decision_view], names,
                       masks)
    return plots_dir

