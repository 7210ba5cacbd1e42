"""Evaluation metrics: image/pixel AUROC, AUPRO, F1-max, precision/recall (METHOD.md §6).

Everything here is exact (no threshold grids) and vectorised, so that numbers are
comparable with published MVTec AD results and a full category (tens of millions of
pixels) fits in memory: pixel metrics sort the good pixels' scores once (in the maps'
own dtype) instead of arg-sorting every pixel.

Conventions: a higher score means "more anomalous"; at a stored decision threshold a
score strictly ``> threshold`` is defective (as in `dualstpm predict`; the threshold is the
highest tolerated validation score), while curves and F1-max sweep ``>=`` like sklearn; label 1 / mask True means defective. Metrics that are undefined for the
data (one class only, no defect region) are ``None`` so that they serialise as JSON null.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_curve

GOOD = "good"
FPR_LIMIT = 0.3  # AUPRO integration limit of the MVTec AD benchmark

# 8-connectivity within one image and none across images: MVTec's official `compute_pro`
# labels each mask with np.ones((3, 3)); the empty outer planes keep images apart so the
# whole (N, H, W) stack can be labelled in one call.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# --------------------------------------------------------------------------- helpers


def _check_finite(values: np.ndarray, name: str) -> None:
    """NaN/inf would silently corrupt the sorted-count formulas, so refuse them."""
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _as_binary(labels: np.ndarray | Sequence, scores: np.ndarray | Sequence) -> tuple[np.ndarray, np.ndarray]:
    """Validated 1-D (bool labels, scores) pair."""
    labels = np.asarray(labels).reshape(-1).astype(bool, copy=False)
    scores = np.asarray(scores).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels ({labels.size}) and scores ({scores.size}) differ in length")
    _check_finite(scores, "scores")
    return labels, scores


def _auroc_from_split(neg_sorted: np.ndarray, pos: np.ndarray) -> float | None:
    """AUROC as the Mann-Whitney statistic P(pos > neg) + P(pos == neg) / 2.

    Counting with binary search in the sorted negatives is exact (integer sums, one
    division), equals sklearn's trapezoidal ROC area, and needs no per-pixel index array.
    """
    if neg_sorted.size == 0 or pos.size == 0:
        return None
    below = np.searchsorted(neg_sorted, pos, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(neg_sorted, pos, side="right").sum(dtype=np.int64)
    return float((below + below_or_tied) / (2.0 * pos.size * neg_sorted.size))


def _auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """AUROC of validated bool labels; None when one class is missing."""
    return _auroc_from_split(np.sort(scores[~labels]), scores[labels])


class PixelTruth:
    """Ground-truth masks prepared once for scoring many map stacks against them.

    The three views of a test and the fusion-weight ablation grid score dozens of map
    stacks against the same masks: the good/defect split and the connected-region
    labelling (the costly part of AUPRO) are done once here, not once per stack.
    """

    def __init__(self, masks: np.ndarray) -> None:
        self.masks = np.asarray(masks).astype(bool, copy=False)
        if self.masks.ndim != 3:
            raise ValueError(f"masks must be an (N, H, W) stack, got shape {self.masks.shape}")
        self.good = ~self.masks

    @cached_property
    def regions(self) -> tuple[np.ndarray, int]:
        """Connected-region id (1..R) of each defect pixel (C order), and R."""
        labelled, n_regions = ndimage.label(self.masks, structure=_REGION_STRUCTURE)
        return labelled[self.masks], int(n_regions)


def _truth(masks: np.ndarray | PixelTruth) -> PixelTruth:
    return masks if isinstance(masks, PixelTruth) else PixelTruth(masks)


@dataclass(frozen=True)
class _Pixels:
    """All test pixels split once into sorted good scores and defect scores.

    Shared by pixel AUROC and AUPRO so `evaluate` sorts the (large) good set only once.
    """

    good_sorted: np.ndarray  # ascending scores of mask-0 pixels
    defect: np.ndarray  # scores of mask-1 pixels, C order (matches labelled[masks])
    truth: PixelTruth  # the masks, with their regions labelled on first use

    @classmethod
    def of(cls, masks: np.ndarray | PixelTruth, maps: np.ndarray) -> _Pixels:
        truth = _truth(masks)
        maps = np.asarray(maps)
        if truth.masks.shape != maps.shape:
            raise ValueError(f"masks {truth.masks.shape} and maps {maps.shape} must be equal (N, H, W) shapes")
        _check_finite(maps, "maps")
        good = maps[truth.good]
        good.sort()
        return cls(good_sorted=good, defect=maps[truth.masks], truth=truth)

    def region_ids(self) -> tuple[np.ndarray, int]:
        """Connected-region id (1..R) of each defect pixel, and R."""
        return self.truth.regions

    @cached_property
    def defect_order(self) -> np.ndarray:
        """Stable ascending order of the defect scores, shared by AUROC and AUPRO."""
        return np.argsort(self.defect, kind="stable")

    @cached_property
    def defect_sorted(self) -> np.ndarray:
        # Sorted queries make binary search into the (large) sorted good scores cache-friendly:
        # about 15x faster than unsorted ones, with the same counts.
        return self.defect[self.defect_order]


def _pro_curve(px: _Pixels) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact (FPR, PRO) curve; None when there is no region or no good pixel.

    Walking thresholds downwards, FPR only moves at good scores and PRO only at defect
    scores, so the curve is fully described at each distinct defect score t by the point
    just before t is included (good > t, PRO so far) and just after (good >= t, PRO with
    t). Tied good and defect pixels thus form a single diagonal step, as in MVTec's
    official keep-last-of-tie rule; the points omitted lie inside horizontal runs and
    change neither the area nor the interpolation at the FPR limit.
    """
    n_good = px.good_sorted.size
    ids, n_regions = px.region_ids()
    if n_regions == 0 or n_good == 0:
        return None
    weight = 1.0 / (np.bincount(ids)[ids] * n_regions)  # each region sums to 1 / R
    order = px.defect_order[::-1]
    scores = px.defect[order]
    pro_cum = np.cumsum(weight[order])
    group_end = np.append(scores[1:] != scores[:-1], True)  # last pixel of each tie group
    thresholds = scores[group_end]
    pro_after = pro_cum[group_end]
    pro_after[-1] = 1.0  # every region is fully covered at the lowest defect score
    pro_before = np.concatenate(([0.0], pro_after[:-1]))
    good_above = n_good - np.searchsorted(px.good_sorted, thresholds, side="right")
    good_at_or_above = n_good - np.searchsorted(px.good_sorted, thresholds, side="left")
    fpr = np.concatenate(([0], np.column_stack((good_above, good_at_or_above)).ravel(), [n_good])) / n_good
    pro = np.concatenate(([0.0], np.column_stack((pro_before, pro_after)).ravel(), [1.0]))
    np.minimum(pro, 1.0, out=pro)  # cumsum rounding may overshoot 1 by an ulp
    distinct = np.concatenate(([True], (np.diff(fpr) != 0) | (np.diff(pro) != 0)))
    return fpr[distinct], pro[distinct]


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under (x, y) on [0, limit], interpolating y linearly at `limit`.

    Same rule as MVTec's `generic_util.trapezoid(x, y, x_max)`: keep all points with
    x <= limit (so a vertical jump at the limit counts fully) and close with the
    interpolated point on the segment that crosses the limit.
    """
    inside = int(np.searchsorted(x, limit, side="right"))
    xs, ys = x[:inside], y[:inside]
    if xs[-1] < limit:
        x0, y0, x1, y1 = xs[-1], ys[-1], x[inside], y[inside]
        xs = np.append(xs, limit)
        ys = np.append(ys, y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)


def _aupro_from_pixels(px: _Pixels, fpr_limit: float) -> float | None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    curve = _pro_curve(px)
    return None if curve is None else _area_up_to(*curve, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------- public API


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Image-level AUROC (equals sklearn's roc_auc_score); None when only one class is present."""
    return _auroc(*_as_binary(labels, scores))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float | None:
    """AUROC over every pixel of every image (masks bool (N,H,W), maps float (N,H,W)).

    Pass maps as float32: only the good pixels are copied (and sorted in place).
    None when the pixels hold only one class.
    """
    px = _Pixels.of(masks, maps)
    return _auroc_from_split(px.good_sorted, px.defect_sorted)


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-region-overlap curve (fpr, pro): non-decreasing fpr from (0, 0) to (1, 1).

    Regions are the 8-connected components of each image's mask; FPR is over all
    mask-0 pixels of all images. Raises ValueError when there is no region or no good pixel.
    """
    curve = _pro_curve(_Pixels.of(masks, maps))
    if curve is None:
        raise ValueError("PRO curve undefined: masks need at least one defect region and one good pixel")
    return curve


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float | None:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (MVTec AD definition).

    None when there is no defect region (or no good pixel).
    """
    return _aupro_from_pixels(_Pixels.of(masks, maps), fpr_limit)


def pixel_metrics(masks: np.ndarray | PixelTruth, maps: np.ndarray,
                  fpr_limit: float = FPR_LIMIT) -> tuple[float | None, float | None]:
    """(pixel AUROC, AUPRO) of one map stack, sorting the good pixels once for both.

    Pass a :class:`PixelTruth` to score many stacks against the same masks.
    """
    px = _Pixels.of(masks, maps)
    return _auroc_from_split(px.good_sorted, px.defect_sorted), _aupro_from_pixels(px, fpr_limit)


def roc_curve_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the image-level ROC curve, for plots. Needs both classes."""
    labels, scores = _as_binary(labels, scores)
    if labels.all() or not labels.any():
        raise ValueError("ROC curve needs both defective and good samples")
    fpr, tpr, _ = roc_curve(labels, scores)
    return fpr, tpr


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float] | None:
    """Best F1 over all thresholds and the threshold (score >= threshold) achieving it.

    None when there is no defective sample (F1 undefined).
    """
    labels, scores = _as_binary(labels, scores)
    if not labels.any():
        return None
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # The final (precision 1, recall 0) point has no threshold; drop it.
    precision, recall = precision[:-1], recall[:-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def precision_recall_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float | None, float | None]:
    """(precision, recall) when score > threshold is flagged defective (the decision rule).

    Precision is None (undefined, not 0) when nothing is flagged, and recall is None when
    there is no defective sample: 0/0 is no measurement, and a 0.0 would read as a failure.
    """
    labels, scores = _as_binary(labels, scores)
    flagged = scores > threshold
    hits = np.count_nonzero(flagged & labels)
    n_flagged, n_defective = np.count_nonzero(flagged), np.count_nonzero(labels)
    precision = float(hits / n_flagged) if n_flagged else None
    recall = float(hits / n_defective) if n_defective else None
    return precision, recall


#: a ground-truth region is small below this share of its frame's pixels (issue 23: 0.1 %)
SMALL_REGION_SHARE = 0.001


def small_region_recall(masks: np.ndarray | PixelTruth, maps: np.ndarray, pixel_threshold: float,
                        max_share: float = SMALL_REGION_SHARE) -> dict:
    """How many small defects the defect regions find: the share of ground-truth regions smaller
    than `max_share` of the frame (area < max_share * H * W pixels, 8-connected within each
    image, at the maps' resolution) that any predicted region touches, i.e. where at least one
    of the region's pixels is above `pixel_threshold`.

    masks: (N, H, W) bool ground truth; maps: (N, H, W) the decision view's maps. Returns
    `max_area_share`, `max_area_px` (the bound in pixels), `small_regions`, `touched` and
    `recall` (None without a small region).
    """
    truth = _truth(masks)
    ids, n_regions = truth.regions
    bound = max_share * truth.masks.shape[1] * truth.masks.shape[2]
    if n_regions == 0:
        return {"max_area_share": max_share, "max_area_px": bound, "small_regions": 0, "touched": 0, "recall": None}
    areas = np.bincount(ids, minlength=n_regions + 1)
    above = np.bincount(ids, weights=(np.asarray(maps)[truth.masks] > pixel_threshold), minlength=n_regions + 1)
    small = (areas > 0) & (areas < bound)
    touched = int(np.count_nonzero(small & (above > 0)))
    n_small = int(np.count_nonzero(small))
    return {"max_area_share": max_share, "max_area_px": bound, "small_regions": n_small, "touched": touched,
            "recall": touched / n_small if n_small else None}


def per_defect_auroc(defect_types: Sequence[str], scores: np.ndarray) -> dict[str, float]:
    """Image AUROC of each defect type against the `good` images, keyed by sorted type.

    Empty when there are no good images (nothing to compare against).
    """
    types = np.asarray(defect_types, dtype=object).reshape(-1)
    labels, scores = _as_binary(types != GOOD, scores)
    good_sorted = np.sort(scores[~labels])
    result = {}
    for name in sorted(set(types[labels])):
        auc = _auroc_from_split(good_sorted, scores[types == name])
        if auc is not None:
            result[str(name)] = auc
    return result


def evaluate(
    labels: np.ndarray,
    defect_types: Sequence[str],
    scores: np.ndarray,
    maps: np.ndarray | None,
    masks: np.ndarray | PixelTruth | None,
    threshold: float,
) -> dict:
    """All §6 metrics of one category as a JSON-ready dict (plain floats, None for undefined).

    Pixel metrics (pixel_auroc, aupro) are None when `maps` or `masks` is None.
    """
    if len(defect_types) != np.asarray(labels).size:
        raise ValueError(f"{len(defect_types)} defect types for {np.asarray(labels).size} labels")
    pixel, pro = None, None
    if maps is not None and masks is not None:
        pixel, pro = pixel_metrics(masks, maps)
    best = f1_max(labels, scores)
    precision, recall = precision_recall_at(labels, scores, threshold)
    return {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel,
        "aupro": pro,
        "image_f1_max": None if best is None else best[0],
        "f1_threshold": None if best is None else best[1],
        "precision": precision,
        "recall": recall,
        "threshold": float(threshold),
        "per_defect": per_defect_auroc(defect_types, scores),
    }


def category_means(table: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One ``mean`` row per model (in first-seen order) over a table of per-category rows.

    `table` has columns ``category``, ``model`` and `metrics`. A metric's mean is null
    unless every category of the table has it for that model (e.g. pixel metrics when one
    category has no ground truth, or a model missing from a category's rows): a mean over
    a subset would not compare with the other means or with a published mean over all
    categories. The category rows show which ones lack it.
    """
    values = table[list(metrics)].astype(float)
    groups = values.groupby(table["model"], sort=False)
    means = groups.agg(lambda column: column.mean(skipna=False))
    means[groups.size() < table["category"].nunique()] = np.nan  # a category without this model
    means = means.reset_index()
    means.insert(0, "category", "mean")
    return means
