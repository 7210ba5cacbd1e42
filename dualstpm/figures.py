"""Figures of a test run: ROC and PRO curves (CSV + PNG) and a grid of heat-map overlays.

Written into `RUN/plots/` by `dualstpm test`, so the same files serve DVC (curves as
plots, one CSV per view so that each view is one series; overlays as an image folder)
and MLflow (logged as artifacts of the category's run):

    plots/roc/{fused,stpm,recon}.csv   image-level ROC: fpr, tpr
    plots/pro/{fused,stpm,recon}.csv   per-region overlap: fpr, pro (pixel-level categories only)
    plots/roc.png, plots/pro.png       the three views in one chart each
    plots/overlays/*.png               heat maps of the most telling test images
    plots/overlays.png                 those overlays as one grid, ground truth outlined

Matplotlib's object API is used (no pyplot), so nothing depends on a display or backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from dualstpm import metrics
from dualstpm.detector import Detector
from dualstpm.files import staged_dir
from dualstpm.fusion import VIEWS
from dualstpm.predict import overlay

PLOTS_DIR = "plots"
PRO_GRID = np.linspace(0.0, 1.0, 1001)  # the exact PRO curve has a point per pixel threshold
GRID_COLUMNS = 4


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


def write_overlays(plots_dir: Path, detector: Detector, images: torch.Tensor, labels: np.ndarray,
                   scores: np.ndarray, names: Sequence[str], masks: np.ndarray | None) -> list[Path]:
    """Fused heat-map overlays of the telling images (one PNG each) and a grid of them."""
    chosen = telling_images(labels, scores)
    fused = detector.score(images[chosen], views=("fused",)).maps["fused"].cpu().numpy()
    out_dir = plots_dir / "overlays"
    out_dir.mkdir(parents=True, exist_ok=True)
    threshold = detector.threshold
    rows = -(-len(chosen) // GRID_COLUMNS)
    fig = Figure(figsize=(3 * GRID_COLUMNS, 3.3 * rows))
    axes = np.atleast_1d(fig.subplots(rows, GRID_COLUMNS)).reshape(-1)
    written = []
    for ax, index, anomaly_map in zip(axes, chosen, fused, strict=False):
        picture = overlay(images[index].permute(1, 2, 0).cpu().numpy(), anomaly_map, threshold)
        path = out_dir / f"{index:03d}_{names[index]}.png"
        picture.save(path)
        written.append(path)
        ax.imshow(np.asarray(picture))
        if masks is not None and masks[index].any():
            ax.contour(masks[index], levels=[0.5], colors="white", linewidths=0.8)
        verdict = "defective" if scores[index] > threshold else "good"
        ax.set_title(f"{names[index]}\nscore {scores[index]:.4g} -> {verdict}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(f"fused anomaly maps (red at or above the threshold {threshold:.4g}; white: ground truth)", fontsize=9)
    fig.tight_layout()
    fig.savefig(plots_dir / "overlays.png", dpi=90)
    return written


def write_test_figures(plots_dir: Path, detector: Detector, images: torch.Tensor, labels: np.ndarray,
                       scores: dict[str, np.ndarray], names: Sequence[str],
                       maps: dict[str, np.ndarray] | None = None, masks: np.ndarray | None = None) -> Path:
    """All figures of one test run into a fresh `plots_dir` (old files would mislead), built
    in a staging folder and swapped in whole (`files.staged_dir`)."""
    plots_dir = Path(plots_dir)
    with staged_dir(plots_dir) as staging:
        write_roc(staging, labels, scores)
        if maps is not None and masks is not None:
            write_pro(staging, masks, maps)
        write_overlays(staging, detector, images, np.asarray(labels, dtype=bool), scores["fused"], names, masks)
    return plots_dir

