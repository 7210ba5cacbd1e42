"""The image score (`score.*`, issue 11 item 2): reductions derived by hand, params checked,
thresholds calibrated in the reduced units, the model's reduction used everywhere, exports."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES

from dualstpm.config import load_params
from dualstpm.data import (
    decode_images,
    load_category,
    split_train_val,
    validation_parts,
)
from dualstpm.detector import Detector, read_score_spec
from dualstpm.errors import ConfigError
from dualstpm.model.calibration import calibrate_threshold
from dualstpm.model.fusion import ScoreSpec, image_score, topk_count

TOPK = ScoreSpec("topk_mean", topk=0.01)


# --- the reductions, by hand ---------------------------------------------------------------

def test_max_is_the_largest_pixel():
    m = torch.zeros(2, 4, 4)
    m[0, 1, 2], m[1, 3, 3] = 5.0, 2.0
    assert image_score(m, ScoreSpec("max")).tolist() == [5.0, 2.0]


def test_topk_mean_averages_the_top_fraction_of_pixels():
    # 16 px: values 0..15 in both images, then image 1's 0 replaced by an outlier of 100
    m = torch.arange(32, dtype=torch.float32).reshape(2, 4, 4) % 16
    m[1, 0, 0] = 100.0
    # topk 0.125 of 16 px = 2 px: (15 + 14) / 2 and (100 + 15) / 2
    assert image_score(m, ScoreSpec("topk_mean", topk=0.125)).tolist() == [14.5, 57.5]
    # topk 1.0 = the mean of every pixel: (0 + ... + 15) / 16 = 7.5; image 1: (120 - 0 + 100) / 16
    assert image_score(m, ScoreSpec("topk_mean", topk=1.0)).tolist() == [7.5, 220 / 16]
    # a fraction below one pixel still averages one pixel: the max
    assert image_score(m, ScoreSpec("topk_mean", topk=0.001)).tolist() == [15.0, 100.0]


def test_topk_count_rounds_to_the_nearest_pixel_count_within_bounds():
    assert topk_count(16, 0.125) == 2 and topk_count(4096, 0.01) == 41  # 40.96 -> 41
    assert topk_count(16, 0.001) == 1 and topk_count(16, 1.0) == 16


def test_smoothed_max_of_a_single_spike_is_the_kernel_peak():
    """A unit spike blurred by the separable kernel w (radius ceil(4 sigma), normalised) is
    w(x) w(y): its peak is w(0)^2, with w(0) = 1 / sum_{x=-4..4} exp(-x^2 / 2) for sigma 1,
    i.e. 1 / (1 + 2 (e^-0.5 + e^-2 + e^-4.5 + e^-8)) = 0.398943..."""
    spike = torch.zeros(1, 17, 17)
    spike[0, 8, 8] = 1.0  # more than the radius 4 from every edge: the reflection adds nothing
    centre = 1 / (1 + 2 * (math.exp(-0.5) + math.exp(-2) + math.exp(-4.5) + math.exp(-8)))
    assert centre == pytest.approx(0.398943, abs=1e-6)
    assert image_score(spike, ScoreSpec("smoothed_max", sigma=1.0)).item() == pytest.approx(centre**2, rel=1e-6)
    # a broad plateau keeps its level: the smoothed max discounts lone spikes, not regions
    plateau = torch.ones(1, 17, 17)
    assert image_score(plateau, ScoreSpec("smoothed_max", sigma=1.0)).item() == pytest.approx(1.0, rel=1e-6)


def test_score_spec_records_only_what_its_reduction_uses():
    assert ScoreSpec("max").to_json() == {"reduce": "max"}
    assert TOPK.to_json() == {"reduce": "topk_mean", "topk": 0.01} and TOPK.label == "topk_mean(topk=0.01)"
    assert ScoreSpec("smoothed_max", sigma=2).label == "smoothed_max(sigma=2)"
    assert read_score_spec(TOPK.to_json()) == TOPK
    with pytest.raises(ValueError, match="topk"):
        read_score_spec({"reduce": "topk_mean", "topk": 0})


# --- params ---------------------------------------------------------------------------------

def test_score_params_are_validated():
    params = load_params(None, ["score.reduce=topk_mean", "score.topk=0.05"])
    assert ScoreSpec.from_params(params.score) == ScoreSpec("topk_mean", topk=0.05)
    for bad, key in (("score.reduce=mean", "score.reduce"), ("score.topk=0", "score.topk"),
                     ("score.topk=1.5", "score.topk"), ("score.sigma=0", "score.sigma")):
        with pytest.raises(ConfigError, match=key):
            load_params(None, [bad])
    # the blur of smoothed_max reflect-pads by ceil(4 sigma) px: it must stay below image_size
    with pytest.raises(ConfigError, match=r"score.sigma <= 15.75"):
        load_params(None, ["image_size=64", "score.reduce=smoothed_max", "score.sigma=16"])
    load_params(None, ["image_size=64", "score.reduce=smoothed_max", "score.sigma=15.75"])
    load_params(None, ["image_size=64", "score.sigma=16"])  # unused by max: not refused


def test_score_is_not_part_of_the_training_signature():
    from dualstpm.training import training_signature

    base = load_params(None, TINY_OVERRIDES)
    other = load_params(None, [*TINY_OVERRIDES, "score.reduce=smoothed_max", "score.sigma=2"])
    assert training_signature(base) == training_signature(other)  # a model can be re-calibrated


def test_a_calibration_json_an_earlier_version_wrote_is_refused_naming_the_fix(trained_run: Path, tmp_path: Path):
    """The thresholds are in the units of `score` and were computed in `precision`: a
    calibration.json without either is not read with a guess, and is left as it was."""
    from dualstpm.errors import RunError

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("exports"))
    path = run / "model" / "calibration.json"
    written = json.loads(path.read_text())
    assert written["score"] == {"reduce": "topk_mean", "topk": 0.01} and written["precision"] == "float32"
    for key in ("score", "precision"):
        earlier = {k: v for k, v in written.items() if k != key}
        path.write_text(json.dumps(earlier))
        with pytest.raises(RunError, match=rf"calibration\.json is not a calibration this dualstpm reads .*'{key}'"
                                           r".*retrain the model with this version"):
            Detector.load(run)
        assert json.loads(path.read_text()) == earlier


# --- a model fitted with topk_mean ----------------------------------------------------------

@pytest.fixture(scope="module")
def topk_run(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dualstpm.training import fit

    params = load_params(None, [*TINY_OVERRIDES, "fit.epochs=1", "score.reduce=topk_mean", "score.topk=0.01"])
    run = tmp_path_factory.mktemp("score") / "topk"
    fit(params, synthetic_root, "synth_texture", run)
    return run


def test_threshold_is_calibrated_in_the_reduced_units(topk_run: Path, synthetic_root: Path):
    detector = Detector.load(topk_run)
    assert detector.calibration.score == TOPK and detector.score_spec == TOPK
    params = detector.params
    _, val_paths = split_train_val(load_category(synthetic_root, "synth_texture"), params.fit.val_fraction, params.seed)
    calibration_part = validation_parts(len(val_paths), params.calibration.split, params.seed).calibration
    val = decode_images(val_paths, params.image_size)[calibration_part]  # the images that calibrated the model
    scores = torch.cat([s.scores["fused"] for _, s in detector.batches(val, params.fit.batch_size)]).numpy()
    expected = calibrate_threshold(scores, params.calibration.false_alarm_rate)
    assert detector.threshold == pytest.approx(expected, rel=1e-6)
    assert detector.inference.normalization.val_min == pytest.approx(float(scores.min()), rel=1e-6)
    # and not in max units: the top 1 % mean of every map lies below its max
    maxima = torch.cat([s.maps["fused"].flatten(1).amax(1) for _, s in detector.batches(val, 8)]).numpy()
    assert (scores < maxima).all()


def test_the_model_scores_with_its_calibrated_reduction_not_a_later_params_file(topk_run: Path, synthetic_root: Path,
                                                                                tmp_path: Path):
    from dualstpm.evaluation import test_run

    run = tmp_path / "run"
    shutil.copytree(topk_run, run)
    params_file = run / "model" / "params.yaml"
    params_file.write_text(params_file.read_text().replace("reduce: topk_mean", "reduce: max"))
    detector = Detector.load(run)
    assert detector.params.score.reduce == "max" and detector.score_spec == TOPK
    result = test_run(run, synthetic_root, "synth_texture")
    assert result["score"] == TOPK.to_json()


# --- exports trace the reduction with a constant k / kernel --------------------------------

@pytest.mark.parametrize("score", [TOPK, ScoreSpec("smoothed_max", sigma=4.0)], ids=lambda s: s.reduce)
def test_onnx_export_of_a_reduction_matches_pytorch(trained_run: Path, synthetic_root: Path, tmp_path: Path,
                                                     score: ScoreSpec):
    """The tiny trained run re-calibrated with `score` (the fused threshold halfway between
    the middle two of these images' scores, so both labels occur and no score sits on it)
    and exported: ONNX Runtime gives PyTorch's outputs."""
    from test_export import assert_parity, float32_detector

    from dualstpm.backends import ExportedModel
    from dualstpm.export import METADATA_FILE, export_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("exports", "maps"))
    images = decode_images([s.path for s in load_category(synthetic_root, "synth_texture").test], 64)
    calibration_file = run / "model" / "calibration.json"
    data = json.loads(calibration_file.read_text())
    data["score"] = score.to_json()
    calibration_file.write_text(json.dumps(data))
    scores = np.sort(float32_detector(run).infer(images).score.numpy())
    middle = len(scores) // 2
    data["thresholds"]["fused"] = float(scores[middle - 1] + scores[middle]) / 2
    data["val_score_summary"]["fused"]["min"] = float(scores.min())
    calibration_file.write_text(json.dumps(data))

    reference = float32_detector(run).infer(images)
    assert 0 < int(reference.label.sum()) < len(images)
    exported = export_run(run, "onnx", "fp32", tmp_path / "onnx")
    assert json.loads((exported / METADATA_FILE).read_text())["score"]["reduce"] == score.reduce
    assert_parity(ExportedModel(exported, "onnxruntime").infer(images), reference)
    assert_parity(ExportedModel(exported, "onnxruntime").infer(images[:1]), float32_detector(run).infer(images[:1]))
