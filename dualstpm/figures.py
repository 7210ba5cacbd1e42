"""Figures of a test run: ROC and PRO curves (CSV + PNG) and a grid of heat-map overlays.

Written into `RUN/plots/` by `dualstpm test`, so the same files serve DVC (curves as
plots, one CSV per view so that each view is one series; overlays as an image folder)
and MLflow (logged as artifacts of the category's run):

    plots/roc/{fused,stpm,recon}.csv   image-level ROC: fpr, tpr
    plots/pro/{fused,stpm,recon}.csv   per-region overlap: fpr, pro (pixel-level categories only)
    plots/roc.png, plots/pro.png       the three views in one chart each, titled with the category
    plots/overlays/*.png               heat maps of the most telling test images (`dualstpm.overlays`),
                                       each captioned with why it is shown (`telling_images`)
    plots/overlays.png                 those overlays as one grid under a heading naming the category,
                                       the decision view and its threshold; ground truth outlined

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
from dualstpm.data import read_image, resize_map
from dualstpm.detector import Detector
from dualstpm.files import atomic_file, staged_dir
from dualstpm.model.fusion import VIEWS
from dualstpm.model.inference import RawMaps
from dualstpm.overlays import (
    GRID_CELL_WIDTH,
    decision_label,
    detector_heading,
    draw_overlay,
    overlay_grid,
    overlay_scale,
)
from dualstpm.rundir import OVERLAY_GRID

PRO_GRID = np.linspace(0.0, 1.0, 1001)  # the exact PRO curve has a point per pixel threshold
GRID_COLUMNS = 4


def curve_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float | None]], title: str, ylabel: str,
                 fpr_limit: float | None = None) -> Figure:
    """One chart of `curves` ({view: (false-positive rates, y values, area or None)}): x is the
    false-positive rate, y `ylabel`, the legend names each view with its area."""
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
    return fig


def roc_title(category: str) -> str:
    return f"{category}: image ROC (AUROC)"


def pro_title(category: str) -> str:
    return f"{category}: per-region overlap (AUPRO at {metrics.FPR_LIMIT:.0%} FPR)"


def write_roc(plots_dir: Path, labels: np.ndarray, scores: dict[str, np.ndarray], category: str) -> Figure | None:
    """Image-level ROC per view of the test images of `category` (the chart's title): the
    CSVs and `roc.png`; returns the chart, or None (nothing written) when the test split has
    one class only."""
    labels = np.asarray(labels, dtype=bool)
    if labels.all() or not labels.any():
        return None
    (plots_dir / "roc").mkdir(parents=True, exist_ok=True)
    curves = {}
    for view in VIEWS:
        fpr, tpr = metrics.roc_curve_points(labels, scores[view])
        pd.DataFrame({"fpr": fpr, "tpr": tpr}).to_csv(plots_dir / "roc" / f"{view}.csv", index=False)
        curves[view] = (fpr, tpr, metrics.image_auroc(labels, scores[view]))
    figure = curve_figure(curves, roc_title(category), "true-positive rate")
    figure.savefig(plots_dir / "roc.png", dpi=100)
    return figure


def write_pro(plots_dir: Path, masks: np.ndarray, maps: dict[str, np.ndarray], category: str) -> Figure | None:
    """Per-region-overlap curve per view (titled with `category`), resampled on a 0.001 FPR
    grid: the CSVs and `pro.png`; returns the chart, or None (nothing written) without regions."""
    if not masks.any() or masks.all():
        return None
    (plots_dir / "pro").mkdir(parents=True, exist_ok=True)
    curves = {}
    for view in VIEWS:
        fpr, pro = metrics.pro_curve(masks, maps[view])
        # fpr is non-decreasing; at repeated fpr values np.interp takes the last (highest) pro.
        grid_pro = np.interp(PRO_GRID, fpr, pro)
        pd.DataFrame({"fpr": PRO_GRID, "pro": grid_pro}).to_csv(plots_dir / "pro" / f"{view}.csv", index=False)
        curves[view] = (PRO_GRID, grid_pro, metrics.aupro(masks, maps[view]))
    figure = curve_figure(curves, pro_title(category), "PRO", fpr_limit=metrics.FPR_LIMIT)
    figure.savefig(plots_dir / "pro.png", dpi=100)
    return figure


def telling_images(labels: np.ndarray, scores: np.ndarray, threshold: float, count: int = 8) -> list[tuple[int, str]]:
    """The test images worth a look and why each is shown, as (index, reason), in this order:

    - the highest-scoring defects, ``top defect #k`` (``..., missed`` when not above the threshold);
    - the lowest-scoring defect: ``worst miss`` (not above `threshold`), else ``weakest defect, caught``;
    - the highest-scoring good part: ``worst false alarm`` (above `threshold`), else
      ``highest-scoring good part, not flagged``;
    - the lowest-scoring good part, ``quietest good part``.

    An image chosen twice is shown once, with the more telling reason (a lone defect is the
    worst miss or weakest defect, not the top one; a lone good part the worst false alarm or
    highest-scoring one, not the quietest). labels (N,) bool, scores (N,) image scores of the
    decision view, threshold in their units (defective: score > threshold); at most `count`.
    """
    order = np.argsort(-scores, kind="stable")
    defective = [int(i) for i in order if labels[i]]
    good = [int(i) for i in order if not labels[i]]
    reasons: dict[int, str] = {}
    for rank, index in enumerate(defective[: max(count - 3, 1)], start=1):
        reasons[index] = f"top defect #{rank}" + ("" if scores[index] > threshold else ", missed")
    if defective:
        last = defective[-1]
        reasons[last] = "worst miss" if scores[last] <= threshold else "weakest defect, caught"
    if good:
        first = good[0]
        reasons[first] = "worst false alarm" if scores[first] > threshold else "highest-scoring good part, not flagged"
        reasons.setdefault(good[-1], "quietest good part")
    return list(reasons.items())[:count]


def overlay_name(defect_type: str, path: Path) -> str:
    """The name a test image goes by in overlays: `<defect type>_<file stem>`."""
    return f"{defect_type}_{path.stem}"


def write_overlays(out_dir: Path, detector: Detector, category: str, raw: RawMaps, paths: Sequence[Path],
                   labels: np.ndarray,
                   scores: np.ndarray, names: Sequence[str], masks: np.ndarray | None) -> Path:
    """Overlays of the telling images in the detector's decision view, drawn from the raw
    maps already computed (no network runs): one PNG each in `out_dir/overlays/` and a grid
    of them, `out_dir/overlays.png` (returned).

    category: the test images' category (the grid's heading, with the decision view and its
    threshold); raw: the test images' :class:`RawMaps` (six maps (N, 2, 3, S, S), and the
    memory maps of a model with a memory bank), as the test computed and stored them; paths: the test images (N,), read at their own size; labels (N,) bool;
    scores (N,): the decision view's image scores, which choose the telling images (each
    captioned ``<reason>: <name>``, :func:`telling_images`) and are shown; names (N,);
    masks: (N, h, w) bool ground truth at any size, outlined in white, or None.
    """
    telling = telling_images(labels, scores, detector.threshold)
    chosen = [index for index, _ in telling]
    view_maps, _ = detector.inference.views.stack(raw[np.asarray(chosen, dtype=np.int64)], detector.decision_view)
    scale = overlay_scale(detector)
    folder = out_dir / "overlays"
    shutil.rmtree(folder, ignore_errors=True)  # another choice of images must not leave old ones
    folder.mkdir(parents=True)
    cells = []
    for (index, reason), view_map in zip(telling, view_maps, strict=True):
        original = read_image(Path(paths[index]))
        mask = masks[index] if masks is not None else None
        score = float(scores[index])
        args = (original, resize_map(view_map, original.shape[:2]), scale, score,
                decision_label(score, detector.threshold))
        title = f"{reason}: {names[index]}"
        with atomic_file(folder / f"{index:03d}_{names[index]}.png") as tmp:
            draw_overlay(*args, title=title, mask=mask).save(tmp)
        cells.append(draw_overlay(*args, title=title, mask=mask, width=GRID_CELL_WIDTH))
    heading = detector_heading(detector, category)
    grid_path = out_dir / OVERLAY_GRID
    with atomic_file(grid_path) as tmp:
        overlay_grid(cells, heading, GRID_COLUMNS).save(tmp)
    return grid_path


def write_test_figures(plots_dir: Path, detector: Detector, category: str, raw: RawMaps, paths: Sequence[Path],
                       labels: np.ndarray, scores: dict[str, np.ndarray], names: Sequence[str],
                       maps: dict[str, np.ndarray] | None = None, masks: np.ndarray | None = None) -> Path:
    """All figures of one test run on `category` into a fresh `plots_dir` (old files would
    mislead), built in a staging folder and swapped in whole (`files.staged_dir`). `raw`:
    the test images' :class:`RawMaps`, which the overlays are drawn from (`write_overlays`)."""
    plots_dir = Path(plots_dir)
    with staged_dir(plots_dir) as staging:
        write_roc(staging, labels, scores, category)
        if maps is not None and masks is not None:
            write_pro(staging, masks, maps, category)
        write_overlays(staging, detector, category, raw, paths, np.asarray(labels, dtype=bool),
                       scores[detector.decision_view], names, masks)
    return plots_dir

