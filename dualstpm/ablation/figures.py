"""The ablation's figures: metric vs branch weight, and the six maps of a few test images.

Matplotlib's object API (no pyplot), so nothing depends on a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from dualstpm.data import decode_images
from dualstpm.errors import DataError
from dualstpm.files import atomic_file
from dualstpm.maps import MapSet
from dualstpm.ablation.grid import Candidate
from dualstpm.model.inference import MapViews

HEATMAP_FILE = "branch_weight_heatmap.png"
PANEL_FILE = "six_map_panel.png"
HEAT_ROWS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO",
             "image_f1_max": "image F1-max", "selection_score": "validation score"}
MAP_TITLES = ("A stride 4", "A stride 8", "A stride 16", "B stride 4", "B stride 8", "B stride 16")


def write_heatmap(table: pd.DataFrame, path: Path, category: str) -> Path | None:
    """One panel per (sweep mode, normalisation): metrics (rows) vs w_B / (w_A + w_B) (columns).

    Colours are scaled per row (each metric has its own range); the numbers are the values.
    None when the grid has no sweep.
    """
    sweep = table[table["group"] == "sweep"]
    panels = list(sweep.groupby(["mode", "normalize"], sort=False))
    if not panels:
        return None
    fig = Figure(figsize=(1.0 + 0.75 * sweep["branch_weight"].nunique(), 2.6 * len(panels)))
    axes = np.atleast_1d(fig.subplots(len(panels), 1))
    for ax, ((mode, normalize), rows) in zip(axes, panels, strict=True):
        rows = rows.sort_values("branch_weight")
        keys = [k for k in HEAT_ROWS if rows[k].notna().any()]
        values = rows[keys].to_numpy(dtype=float).T
        low, high = np.nanmin(values, axis=1, keepdims=True), np.nanmax(values, axis=1, keepdims=True)
        ax.imshow((values - low) / np.where(high > low, high - low, 1.0), cmap="viridis", aspect="auto", vmin=0, vmax=1)
        for (r, c), value in np.ndenumerate(values):
            ax.text(c, r, "n/a" if np.isnan(value) else f"{value:.3f}", ha="center", va="center", fontsize=7,
                    color="white" if (value - low[r, 0]) < 0.5 * (high[r, 0] - low[r, 0]) else "black")
        ax.set_xticks(range(len(rows)), [f"{w:g}" for w in rows["branch_weight"]])
        ax.set_yticks(range(len(keys)), [HEAT_ROWS[k] for k in keys])
        ax.set_title(f"{category}: mode {mode}, normalize {normalize}", fontsize=9)
        ax.set_xlabel("branch weight w_B / (w_A + w_B)   (0 = STPM only, 1 = reconstruction only)", fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path


def panel_indices(test: MapSet, count: int) -> list[int]:
    """One defective image per defect type in turn (sorted types, first files first), and
    one good image last: a stable, varied sample."""
    by_type: dict[str, list[int]] = {}
    for index, kind in enumerate(test.defect_types):
        by_type.setdefault(str(kind), []).append(index)
    good = by_type.pop("good", [])
    queues = [by_type[k] for k in sorted(by_type)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < count - bool(good) and any(depth < len(q) for q in queues):
        chosen.extend(q[depth] for q in queues if depth < len(q))
        depth += 1
    chosen = chosen[: count - bool(good)] + good[:1]
    return chosen[:count]


def write_panel(test: MapSet, views: MapViews, fused_specs: dict[str, Candidate], count: int, path: Path,
                max_pixels: int) -> Path | None:
    """Rows: test images. Columns: image, ground truth, the six maps, then each fused map (a
    memory view's map for a memory view).

    Each column has one colour scale over its rows (its minimum to its 99.5th
    percentile), so rows compare directly.
    """
    indices = panel_indices(test, count)
    if not indices:
        return None
    try:
        images = decode_images([Path(p) for p in test.paths[indices]], tuple(test.maps.shape[-2:]), "decoding panel images",
                               max_pixels)
    except DataError as exc:
        raise DataError(f"{exc}\nThe six-map panel reads the test images again; restore them or pass "
                        "--set ablation.panel_images=0") from None
    subset = test.raw[np.asarray(indices)]
    columns = [subset.six[:, b, level].astype(np.float32) for b in range(2) for level in range(3)]
    columns += [views.stack_maps(subset, spec) for spec in fused_specs.values()]
    titles = [*MAP_TITLES, *fused_specs]
    scales = [(float(c.min()), max(float(np.percentile(c, 99.5)), float(c.min()) + 1e-12)) for c in columns]
    n_cols = 2 + len(columns)
    fig = Figure(figsize=(1.6 * n_cols, 1.7 * len(indices) + 0.4))
    axes = np.asarray(fig.subplots(len(indices), n_cols)).reshape(len(indices), n_cols)
    for row, index in enumerate(indices):
        axes[row, 0].imshow(images[row].permute(1, 2, 0).numpy())
        axes[row, 0].set_ylabel(f"{test.defect_types[index]}\n{Path(str(test.paths[index])).name}", fontsize=7)
        mask = test.masks[index] if test.masks is not None else np.zeros(test.maps.shape[-2:], bool)
        axes[row, 1].imshow(mask, cmap="gray", vmin=0, vmax=1)
        for col, (low, high) in enumerate(scales, start=2):
            axes[row, col].imshow(columns[col - 2][row], cmap="jet", vmin=low, vmax=high)
    for col, title in enumerate(["image", "ground truth", *titles]):
        axes[0, col].set_title(title, fontsize=8)
    for ax in axes.reshape(-1):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=90)
    return path
