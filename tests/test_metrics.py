"""Tests of dualstpm.metrics: hand-derived AUPRO cases, brute-force and sklearn references."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc, roc_auc_score

from dualstpm import metrics

# --------------------------------------------------------------------------- references


def _regions(masks: np.ndarray) -> list[np.ndarray]:
    """One full-size bool array per 8-connected region, labelled image by image (MVTec style)."""
    out = []
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            region = np.zeros_like(masks, dtype=bool)
            region[i] = labelled == k
            out.append(region)
    return out


def _reference_curve(masks: np.ndarray, maps: np.ndarray, tie_aware: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) straight from the definition, one threshold at a time.

    tie_aware=False walks pixels one by one in raster order of descending score, i.e. the
    bug of treating every pixel as its own threshold.
    """
    good, regions = ~masks, _regions(masks)
    if tie_aware:
        positives = [maps >= t for t in np.unique(maps)[::-1]]
    else:
        order = np.argsort(-maps.ravel(), kind="stable")
        positives = []
        for k in range(1, order.size + 1):
            flagged = np.zeros(maps.size, dtype=bool)
            flagged[order[:k]] = True
            positives.append(flagged.reshape(maps.shape))
    fpr = [0.0] + [(p & good).sum() / good.sum() for p in positives]
    pro = [0.0] + [np.mean([(p & r).sum() / r.sum() for r in regions]) for p in positives]
    return np.array(fpr), np.array(pro)


def _reference_area(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Segment by segment: integrate each linear piece restricted to [0, limit]."""
    area = 0.0
    for x0, y0, x1, y1 in zip(fpr[:-1], pro[:-1], fpr[1:], pro[1:]):
        if x1 <= x0 or x0 >= limit:
            continue  # vertical step (no area) or beyond the limit
        x_end = min(x1, limit)
        y_end = y0 + (y1 - y0) * (x_end - x0) / (x1 - x0)
        area += (x_end - x0) * (y0 + y_end) / 2
    return area / limit


def _random_masks(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Random blobby masks; image 0 stays defect-free like a `good` test image."""
    masks = ndimage.binary_dilation(rng.random(shape) < 0.04, structure=np.ones((1, 3, 3)))
    masks[0] = False
    return masks


# --------------------------------------------------------------------------- AUPRO by hand


def test_aupro_perfect_separation_is_one() -> None:
    # Every defect pixel (0.9) outranks every good pixel (<= 0.5): the curve goes
    # (0,0) -> (0,1) at t=0.9 -> (1,1), so the area on [0, 0.3] is 0.3 * 1 -> 0.3/0.3 = 1.
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 0, 0] = True
    maps = np.where(masks, 0.9, np.linspace(0.0, 0.5, 32).reshape(2, 4, 4))
    assert metrics.aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)


def test_aupro_is_averaged_over_regions_not_pixels() -> None:
    # Region 1: 2 pixels in image 0, score 0.9. Region 2: 5 pixels in image 1, score 0.1.
    # All 17 good pixels score 0.5.
    #   t = 0.9: FPR 0, PRO = mean(2/2, 0/5) = 0.5  -> the curve jumps (0,0) -> (0, 0.5),
    #            a vertical step at FPR 0 that adds no area;
    #   t = 0.5: FPR 1, PRO 0.5 (flat);   t = 0.1: (1, 1).
    # Area on [0, 0.3] = 0.3 * 0.5 = 0.15 -> AUPRO = 0.15 / 0.3 = 0.5.
    # (A pixel-weighted overlap would give 2/7 instead.)
    masks = np.zeros((2, 3, 4), dtype=bool)
    masks[0, 1, 1:3] = True
    masks[1, 0, :] = True
    masks[1, 1, 0] = True
    maps = np.full(masks.shape, 0.5)
    maps[0][masks[0]] = 0.9
    maps[1][masks[1]] = 0.1
    fpr, pro = metrics.pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.5, 0.5, 1.0])
    assert metrics.aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


def test_aupro_kinked_curve_with_interpolation_at_limit() -> None:
    # One 1x14 image: pixels 0-3 form one region, pixels 4-13 are 10 good pixels.
    region = [0.9, 0.9, 0.7, 0.5]
    good = [0.95, 0.8, 0.7, 0.7] + [0.1] * 6
    masks = np.zeros((1, 1, 14), dtype=bool)
    masks[0, 0, :4] = True
    maps = np.array(region + good).reshape(1, 1, 14)
    # Thresholds, descending (FPR = good flagged / 10, PRO = region flagged / 4):
    #   0.95: 1 good                     -> (0.1, 0.0)
    #   0.9 : 2 region                   -> (0.1, 0.5)
    #   0.8 : 1 good                     -> (0.2, 0.5)
    #   0.7 : 2 good + 1 region, tied    -> (0.4, 0.75)  one diagonal step
    #   0.5 : 1 region                   -> (0.4, 1.0)
    #   0.1 : 6 good                     -> (1.0, 1.0)
    fpr, pro = metrics.pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0.0, 0.1, 0.1, 0.2, 0.4, 0.4, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.0, 0.5, 0.5, 0.75, 1.0, 1.0])
    # On [0, 0.3]: [0, 0.1] at 0 -> 0; [0.1, 0.2] at 0.5 -> 0.05; the diagonal
    # (0.2, 0.5)-(0.4, 0.75) is 0.5 + 0.25 * 0.5 = 0.625 at 0.3 -> 0.1 * (0.5 + 0.625) / 2 = 0.05625.
    assert metrics.aupro(masks, maps) == pytest.approx((0.05 + 0.05625) / 0.3, abs=1e-12)
    # Whole curve: 0.05 + 0.2 * (0.5 + 0.75) / 2 + 0.6 * 1 = 0.775.
    assert metrics.aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.775, abs=1e-12)
    # A limit on a vertical jump keeps the jump: [0, 0.1] is all at PRO 0.
    assert metrics.aupro(masks, maps, fpr_limit=0.1) == pytest.approx(0.0, abs=1e-12)


def test_aupro_all_tied_scores_is_one_diagonal_step() -> None:
    # Every pixel scores 0.5: one threshold flags everything, so the curve is
    # (0,0) -> (1,1); on [0, 0.3] that is a triangle of area 0.3 * 0.3 / 2 = 0.045
    # -> AUPRO = 0.045 / 0.3 = 0.15.
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, 0, :3] = True  # the defect pixels come first in raster order
    maps = np.full(masks.shape, 0.5)
    fpr, pro = metrics.pro_curve(masks, maps)
    np.testing.assert_allclose(fpr, [0.0, 1.0])
    np.testing.assert_allclose(pro, [0.0, 1.0])
    assert metrics.aupro(masks, maps) == pytest.approx(0.15, abs=1e-12)
    # Pixel-by-pixel (tie-unaware) walking flags the 3 defect pixels before any good
    # one: (0,0) -> (0,1) -> (1,1), area 0.3 -> 1.0. This test would catch that bug.
    unaware = _reference_area(*_reference_curve(masks, maps, tie_aware=False), 0.3)
    assert unaware == pytest.approx(1.0)
    assert _reference_area(*_reference_curve(masks, maps), 0.3) == pytest.approx(0.15)


def test_two_blobs_in_one_mask_are_two_regions() -> None:
    # Blob A = 1 pixel (score 0.9), blob B = 3 pixels (score 0.1), good pixels 0.5.
    # Two regions: at t = 0.9, PRO = mean(1, 0) = 0.5 (one region would give 1/4).
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 0, 0] = True
    masks[0, 4, 2:5] = True
    maps = np.where(masks, 0.1, 0.5)
    maps[0, 0, 0] = 0.9
    fpr, pro = metrics.pro_curve(masks, maps)
    assert (fpr[1], pro[1]) == pytest.approx((0.0, 0.5))
    assert metrics.aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


def test_diagonal_pixels_are_one_region_under_8_connectivity() -> None:
    # D = {(0,0), (1,1)} touch diagonally: one region of 2 pixels. S = {(4,4)} is apart.
    # Only (0,0) scores high. 8-connected: PRO = mean(1/2, 0) = 0.25;
    # 4-connected would be 3 regions: mean(1, 0, 0) = 1/3.
    masks = np.zeros((1, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 4, 4] = True
    maps = np.where(masks, 0.1, 0.5)
    maps[0, 0, 0] = 0.9
    fpr, pro = metrics.pro_curve(masks, maps)
    assert (fpr[1], pro[1]) == pytest.approx((0.0, 0.25))


def test_regions_do_not_connect_across_images() -> None:
    # Image 0: 1 pixel at (0,0), high. Image 1: 3 pixels at (0,0..2), low. Same place,
    # different images: 2 regions -> PRO 0.5; merged through the stack it would be 1/4.
    masks = np.zeros((2, 3, 3), dtype=bool)
    masks[0, 0, 0] = True
    masks[1, 0, :] = True
    maps = np.where(masks, 0.1, 0.5)
    maps[0, 0, 0] = 0.9
    fpr, pro = metrics.pro_curve(masks, maps)
    assert (fpr[1], pro[1]) == pytest.approx((0.0, 0.5))


# --------------------------------------------------------------------------- AUPRO vs reference


@pytest.mark.parametrize("seed", range(4))
def test_aupro_matches_threshold_by_threshold_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = _random_masks(rng, (4, 9, 10))
    maps = np.round(rng.random(masks.shape) + 0.3 * masks, 1)  # rounding creates many ties
    fpr, pro = metrics.pro_curve(masks, maps)
    assert fpr[0] == pro[0] == 0.0 and fpr[-1] == pro[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
    ref = _reference_curve(masks, maps)
    for limit in (0.05, 0.1, 0.3, 0.65, 1.0):
        assert metrics.aupro(masks, maps, limit) == pytest.approx(_reference_area(*ref, limit), abs=1e-12)


def test_aupro_undefined_cases() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    maps = np.random.default_rng(0).random(masks.shape)
    assert metrics.aupro(masks, maps) is None
    with pytest.raises(ValueError, match="defect region"):
        metrics.pro_curve(masks, maps)
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(masks | True, maps, fpr_limit=0.0)
    with pytest.raises(ValueError, match="shapes"):
        metrics.aupro(masks, maps[:1])


def test_aupro_on_a_category_sized_stack_is_one_when_separated_and_0_15_at_chance() -> None:
    # 100 maps of 256 x 256 = 6.6 M pixels (a category-sized stack), thousands of regions.
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, (100, 256, 256))
    noise = rng.random(masks.shape, dtype=np.float32)
    # Every defect pixel (>= 1) above every good one (< 1): all regions are whole at FPR 0.
    assert metrics.aupro(masks, (noise + masks).astype(np.float32)) == pytest.approx(1.0, abs=1e-12)
    # Scores independent of the masks: at each threshold a region overlaps as much as the
    # good pixels flagged, PRO(fpr) = fpr, so the area on [0, 0.3] is 0.3^2 / 2 = 0.045 and
    # AUPRO = 0.045 / 0.3 = 0.15 (up to sampling noise, about 1e-3 with these region counts).
    assert metrics.aupro(masks, noise) == pytest.approx(0.15, abs=0.005)


# --------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize("seed", range(3))
def test_image_auroc_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.4
    scores = np.round(rng.normal(size=300) + labels, 1)  # with ties
    assert metrics.image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_none_with_one_class() -> None:
    assert metrics.image_auroc(np.zeros(5, dtype=bool), np.arange(5.0)) is None
    assert metrics.image_auroc(np.ones(5, dtype=int), np.arange(5.0)) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_auroc_equals_sklearn(dtype: type) -> None:
    rng = np.random.default_rng(1)
    masks = _random_masks(rng, (6, 32, 32))
    maps = (rng.random(masks.shape) + 0.4 * masks).astype(dtype)
    maps[:, :4] = 0.25  # a block of ties across both classes
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_none_without_defects_and_rejects_nan() -> None:
    masks = np.zeros((2, 3, 3), dtype=bool)
    assert metrics.pixel_auroc(masks, np.ones(masks.shape)) is None
    maps = np.ones(masks.shape)
    maps[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        metrics.pixel_auroc(masks, maps)


def test_per_defect_auroc_is_each_type_against_good() -> None:
    rng = np.random.default_rng(2)
    types = np.array(["good"] * 20 + ["crack"] * 8 + ["scratch"] * 6)
    scores = rng.normal(size=types.size) + (types != "good")
    result = metrics.per_defect_auroc(list(types), scores)
    assert list(result) == ["crack", "scratch"]
    for name, value in result.items():
        subset = (types == name) | (types == "good")
        assert value == pytest.approx(roc_auc_score(types[subset] == name, scores[subset]), abs=1e-12)
    assert metrics.per_defect_auroc(["crack", "crack"], np.array([0.1, 0.2])) == {}


def test_roc_curve_points() -> None:
    fpr, tpr = metrics.roc_curve_points(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    assert auc(fpr, tpr) == pytest.approx(0.75)


# --------------------------------------------------------------------------- F1, precision, recall


def _brute_force_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    best = 0.0
    for t in np.unique(scores):
        flagged = scores >= t
        tp = np.sum(flagged & labels)
        if tp:
            best = max(best, 2 * tp / (flagged.sum() + labels.sum()))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(80) < 0.3
    scores = np.round(rng.normal(size=80) + labels, 1)
    f1, threshold = metrics.f1_max(labels, scores)
    assert f1 == pytest.approx(_brute_force_f1_max(labels, scores), abs=1e-12)
    # F1-max sweeps score >= t; the decision rule is score > t, so ask just below t.
    precision, recall = metrics.precision_recall_at(labels, scores, np.nextafter(threshold, -np.inf))
    assert 2 * precision * recall / (precision + recall) == pytest.approx(f1, abs=1e-12)


def test_f1_max_none_without_defects() -> None:
    assert metrics.f1_max(np.zeros(4, dtype=bool), np.arange(4.0)) is None


def test_precision_recall_at_threshold() -> None:
    labels = np.array([0, 0, 1, 1, 1], dtype=bool)
    scores = np.array([0.1, 0.6, 0.5, 0.7, 0.2])
    # score >= 0.5 flags {0.6, 0.5, 0.7}: 2 of 3 are defective, 2 of 3 defects found.
    assert metrics.precision_recall_at(labels, scores, 0.49) == pytest.approx((2 / 3, 2 / 3))
    # The decision is strict: at 0.5 the defect scored exactly 0.5 is not flagged.
    assert metrics.precision_recall_at(labels, scores, 0.5) == pytest.approx((1 / 2, 1 / 3))
    # Nothing flagged: precision is undefined (0/0), recall is 0 of 3 defects found.
    assert metrics.precision_recall_at(labels, scores, 0.9) == (None, 0.0)


def test_recall_is_undefined_without_defects() -> None:
    good = np.zeros(3, dtype=bool)
    scores = np.array([0.1, 0.6, 0.2])
    assert metrics.precision_recall_at(good, scores, 0.5) == (0.0, None)  # one flagged, a false alarm
    assert metrics.precision_recall_at(good, scores, 0.9) == (None, None)  # nothing flagged, nothing to find


# --------------------------------------------------------------------------- evaluate

EVALUATE_KEYS = {"image_auroc", "pixel_auroc", "aupro", "image_f1_max", "f1_threshold",
                 "precision", "recall", "threshold", "per_defect"}


def _category(rng: np.random.Generator) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray, np.ndarray]:
    types = ["good"] * 4 + ["hole"] * 3 + ["stain"] * 3
    labels = np.array([t != "good" for t in types])
    masks = _random_masks(rng, (10, 16, 16))
    masks[~labels] = False
    masks[labels, 5:8, 5:8] = True
    maps = (rng.random(masks.shape) + 0.5 * masks).astype(np.float32)
    scores = maps.reshape(10, -1).max(axis=1)
    return labels, types, scores, maps, masks


def test_evaluate_returns_json_ready_plain_floats() -> None:
    labels, types, scores, maps, masks = _category(np.random.default_rng(3))
    result = metrics.evaluate(labels, types, scores, maps, masks, threshold=0.9)
    assert set(result) == EVALUATE_KEYS
    json.dumps(result, allow_nan=False)
    for key in EVALUATE_KEYS - {"per_defect"}:
        assert type(result[key]) is float, key
    assert set(result["per_defect"]) == {"hole", "stain"}
    assert result["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(masks, maps), abs=0)
    assert result["aupro"] == pytest.approx(metrics.aupro(masks, maps), abs=0)
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_evaluate_without_ground_truth_gives_null_pixel_metrics() -> None:
    labels, types, scores, maps, _ = _category(np.random.default_rng(4))
    result = metrics.evaluate(labels, types, scores, maps, None, threshold=0.9)
    assert result["pixel_auroc"] is None and result["aupro"] is None
    assert '"aupro": null' in json.dumps(result)
    with pytest.raises(ValueError, match="defect types"):
        metrics.evaluate(labels, types[:-1], scores, maps, None, threshold=0.9)


def _views(**fused) -> dict:
    defined = {"precision": 0.5}
    return {"fused": {**defined, **fused}, "stpm": dict(defined), "recon": dict(defined)}


def test_the_note_names_why_each_undefined_metric_is_undefined() -> None:
    from dualstpm.evaluation import undefined_metrics_note

    good_only = {"n_test_images": 5, "n_defective": 0, **_views()}
    note = undefined_metrics_note(good_only, has_ground_truth=False)
    assert "no defective images" in note and "recall" in note and "ground_truth" not in note
    assert "no good images" in undefined_metrics_note({"n_test_images": 3, "n_defective": 3, **_views()}, True)
    no_masks = undefined_metrics_note({"n_test_images": 5, "n_defective": 2, **_views()}, has_ground_truth=False)
    assert "ground_truth" in no_masks and "defective" not in no_masks
    quiet = undefined_metrics_note({"n_test_images": 5, "n_defective": 2, **_views(precision=None)}, True)
    assert "threshold of fused, so precision is undefined" in quiet and "stpm" not in quiet
    assert undefined_metrics_note({"n_test_images": 5, "n_defective": 2, **_views()}, True) is None
