"""Issue 11 items 4 and 5: a fusion is adopted only on a bootstrap margin, and the threshold
is calibrated on validation images that did not select the epoch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dualstpm import metrics
from dualstpm.ablation.margin import (
    aupro,
    bootstrap_margin,
    contributions,
    image_auroc,
    image_f1_max,
    min_units,
    pixel_auroc,
)
from dualstpm.config import ConfigError, load_params
from dualstpm.data import MIN_SPLIT_IMAGES, validation_parts
from dualstpm.evaluation import false_alarms, test_run
from dualstpm.training import training_signature


def _units(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n units, each one good image then one defective copy: (labels, units) in selection-set order."""
    return np.r_[np.zeros(n, int), np.ones(n, int)], np.r_[np.arange(n), np.arange(n)]


# --------------------------------------------------------------------------- the margin's metrics


def test_weighted_image_metrics_match_the_exact_ones_on_the_resample():
    rng = np.random.default_rng(0)
    labels, units = _units(6)
    scores = rng.normal(size=12) + labels
    c = contributions(scores, labels, units, 6)
    weights = np.array([2.0, 0, 1, 0, 3, 0])  # a resample: unit 0 twice, unit 2 once, unit 4 three times
    rows = np.concatenate([np.flatnonzero(units == u).repeat(int(k)) for u, k in enumerate(weights)])
    assert image_auroc(c, weights) == pytest.approx(metrics.image_auroc(labels[rows], scores[rows]))
    assert image_f1_max(c, weights) == pytest.approx(metrics.f1_max(labels[rows], scores[rows])[0])
    ones = np.ones(6)
    assert image_auroc(c, ones) == pytest.approx(metrics.image_auroc(labels, scores))


def test_binned_pixel_metrics_are_close_to_the_exact_ones():
    rng = np.random.default_rng(1)
    labels, units = _units(5)
    masks = np.zeros((10, 32, 32), bool)
    masks[5:, 8:16, 8:20] = True
    masks[7, 24:28, 2:6] = True  # a second region in one image
    maps = rng.gamma(2.0, 1.0, masks.shape).astype(np.float32) + 1.5 * masks
    c = contributions(maps.max(axis=(1, 2)), labels, units, 5, maps, masks)
    ones = np.ones(5)
    assert pixel_auroc(c, ones) == pytest.approx(metrics.pixel_auroc(masks, maps), abs=2e-3)
    assert aupro(c, ones) == pytest.approx(metrics.aupro(masks, maps), abs=5e-3)


# --------------------------------------------------------------------------- adopting on a margin


def test_identical_configurations_differ_by_exactly_zero_and_are_kept():
    labels, units = _units(8)
    c = contributions(np.arange(16.0), labels, units, 8)
    margin = bootstrap_margin(c, c, "image_auroc", 50, 0.95, seed=0)
    assert (margin.observed_difference, margin.mean_difference, margin.lower_bound) == (0.0, 0.0, 0.0)
    assert margin.n_resamples == 50 and margin.n_units == 8 and not margin.adopted
    assert margin.describe().startswith("kept the default")


def test_a_gain_driven_by_one_image_is_kept_a_robust_one_is_adopted():
    labels, units = _units(5)
    # default: goods 0, 2, 4, 6, 8 and defective copies 1, 3, 5, 7, 9.5 => each defect beats the goods below it
    goods, defects = np.array([0.0, 2, 4, 6, 8]), np.array([1.0, 3, 5, 7, 9.5])
    default = contributions(np.r_[goods, defects], labels, units, 5)
    # one image drives the gain: unit 0's defect now beats every good image
    lucky = contributions(np.r_[goods, defects + np.array([10.0, 0, 0, 0, 0])], labels, units, 5)
    # by hand: default AUROC = (1+2+3+4+5)/25 = 15/25; lucky: unit 0's defect wins 5 instead of 1 -> 19/25
    assert image_auroc(default, np.ones(5)) == pytest.approx(15 / 25)
    kept = bootstrap_margin(default, lucky, "image_auroc", 200, 0.95, seed=0)
    assert kept.observed_difference == pytest.approx(4 / 25)
    assert kept.mean_difference > 0 and kept.lower_bound == 0.0 and not kept.adopted  # unit 0 missing: no gain
    # a clearly better fusion separates every defect from every good image
    clear = contributions(np.r_[goods, defects + 20], labels, units, 5)
    adopted = bootstrap_margin(default, clear, "image_auroc", 200, 0.95, seed=0)
    assert adopted.observed_difference == pytest.approx(10 / 25) and adopted.lower_bound > 0 and adopted.adopted
    assert adopted.describe().startswith("adopted")
    assert bootstrap_margin(default, clear, "image_auroc", 200, 0.95, seed=0) == adopted  # seeded


@pytest.mark.parametrize("confidence, expected", [(0.95, 5), (0.99, 7), (0.9, 4), (0.75, 2), (0.5, 1)])
def test_min_units_is_the_sign_test_floor(confidence, expected):
    """By hand: the smallest n with 2^-n <= 1 - confidence. 0.95: 2^-4 = 0.0625 > 0.05, 2^-5 = 0.03125;
    0.99: 2^-6 = 0.0156 > 0.01, 2^-7 = 0.0078; 0.9: 2^-3 = 0.125 > 0.1, 2^-4 = 0.0625; 0.75: 2^-2 = 0.25 exactly."""
    assert min_units(confidence) == expected


def test_a_clear_gain_on_too_few_images_keeps_the_default_and_says_why():
    """4 units, every defect separated from every good image by the challenger: the bootstrap's
    lower bound is positive, but 4 units cannot show a gain at 95 % (2^-4 > 0.05); at 90 % they can."""
    labels, units = _units(4)
    goods, defects = np.array([0.0, 2, 4, 6]), np.array([1.0, 3, 5, 7])
    default = contributions(np.r_[goods, defects], labels, units, 4)
    clear = contributions(np.r_[goods, defects + 20], labels, units, 4)
    kept = bootstrap_margin(default, clear, "image_auroc", 200, 0.95, seed=0)
    assert kept.observed_difference == pytest.approx(1 - 10 / 16)  # (1+2+3+4)/16 -> 16/16
    assert kept.lower_bound > 0 and kept.min_units == 5 and not kept.adopted
    assert "4 validation images cannot show a gain at 95%" in kept.describe()
    assert "at least 5" in kept.describe() and "fit.val_fraction" in kept.describe()
    # the bootstrap's figures come after the verdict, marked as not deciding anything
    assert kept.describe().startswith("kept the default: 4 validation images")
    # why 5: 4 of 4 in the candidate's favour by chance: 2^-4 = 1/16 = 0.0625 > 0.05
    assert "with probability 2^-4 = 0.0625, so the bootstrap's bound is not trusted" in kept.describe()
    assert "For information only, not used: image_auroc gain +0.3750" in kept.describe()
    at_90 = bootstrap_margin(default, clear, "image_auroc", 200, 0.9, seed=0)
    assert at_90.lower_bound > 0 and at_90.min_units == 4 and at_90.adopted
    assert "cannot show" not in at_90.describe()


def test_margin_params_are_validated():
    assert load_params(None).ablation.bootstrap == 200 and load_params(None).ablation.confidence == 0.95
    for bad in ("ablation.bootstrap=0", "ablation.confidence=1", "ablation.confidence=0.4", "calibration.split=1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_params(None, [bad])


# --------------------------------------------------------------------------- a threshold that keeps its promise


def test_validation_parts_are_disjoint_and_seeded():
    parts = validation_parts(10, 0.5, seed=3)
    assert parts.disjoint and parts.note is None
    assert sorted([*parts.selection, *parts.calibration]) == list(range(10)) and len(parts.calibration) == 5
    again = validation_parts(10, 0.5, seed=3)
    assert np.array_equal(parts.selection, again.selection) and np.array_equal(parts.calibration, again.calibration)
    other = validation_parts(10, 0.5, seed=4)
    assert not np.array_equal(parts.calibration, other.calibration)
    assert len(validation_parts(10, 0.1, seed=3).calibration) == 2  # at least 2 on each side
    assert len(validation_parts(10, 0.9, seed=3).selection) == 2


def test_too_few_validation_images_are_not_split_silently():
    parts = validation_parts(MIN_SPLIT_IMAGES - 1, 0.5, seed=0)
    assert not parts.disjoint and "calibration.split=0" in parts.note and "validation image" in parts.note
    chosen = validation_parts(8, 0.0, seed=0)
    assert not chosen.disjoint and "calibration.split=0" in chosen.note


def test_the_split_is_part_of_the_training_signature():
    base = load_params(None)
    assert training_signature(base) != training_signature(load_params(None, ["calibration.split=0.25"]))
    assert training_signature(base) == training_signature(load_params(None, ["calibration.false_alarm_rate=0.05"]))


def test_false_alarms_count_good_scores_above_the_threshold():
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.5, 0.7, 0.5, 0.2, 0.9])
    # good scores 0.1, 0.5, 0.7, 0.5 at threshold 0.5: only 0.7 is strictly above -> 1 of 4
    assert false_alarms(labels, scores, 0.5, 0.01) == {"false_alarm_rate": 0.25, "false_alarms": 1,
                                                       "false_alarm_target": 0.01}


def test_metrics_json_reports_the_observed_false_alarm_rate(trained_run: Path, synthetic_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    result = test_run(run, synthetic_root, "synth_texture")
    calibration = json.loads((run / "model" / "calibration.json").read_text())
    split = calibration["validation_split"]
    assert split["disjoint"] and split["selection_images"] + split["calibration_images"] == 4
    assert result["calibration"]["false_alarm_rate"] == calibration["false_alarm_rate"] == 0.01
    # 4 validation images split 2 / 2: 2 calibration images can promise 1/3, not 1 %, and the notes say so
    assert split["calibration_images"] == 2 and result["calibration"]["false_alarm_bound"] == pytest.approx(1 / 3)
    assert any("2 calibration images cannot keep calibration.false_alarm_rate=0.01" in n and "99 are needed" in n
               for n in calibration["notes"])
    from dualstpm.maps import MapSet

    test = MapSet.load(run / "maps" / "test.npz")
    from dualstpm.detector import Detector

    detector = Detector.load(run)
    good = test.labels == 0
    for view in ("fused", "stpm", "recon"):
        scores = detector.inference.views.stack(test.maps, view)[1]
        flagged = int(np.count_nonzero(scores[good] > detector.thresholds[view]))
        assert result[view]["false_alarms"] == flagged
        assert result[view]["false_alarm_rate"] == flagged / int(good.sum())
        assert result[view]["false_alarm_target"] == calibration["false_alarm_rate"]
