"""Defect regions (issue 23, item 3): the pixel threshold, connected regions, the acceptance
rule, and what predict, test, the served model and exports do with them.

Every expected number below is derived by hand in the comments next to it.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import strict_json

from dualstpm.config import load_params
from dualstpm.errors import ConfigError, RunError
from dualstpm.model.calibration import (
    calibrate_pixel_threshold,
    pixel_false_positive_bound,
)
from dualstpm.model.regions import Region, RegionSpec, find_regions

# --- regions of a hand-made map ------------------------------------------------------------


def two_rectangles() -> np.ndarray:
    """An 8 x 8 map, threshold 0.5: rectangle A rows 1-2, cols 1-3 (1.0, peak 3.0 at (1, 2));
    B two pixels touching by a corner, (5, 6) = 0.7 and (6, 7) = 0.9; (4, 0) = 0.5 exactly,
    which is not above the threshold."""
    values = np.zeros((8, 8), dtype=np.float32)
    values[1:3, 1:4] = 1.0
    values[1, 2] = 3.0
    values[5, 6], values[6, 7] = 0.7, 0.9
    values[4, 0] = 0.5
    return values


def test_rectangles_give_exact_regions_in_the_images_coordinates():
    # image 16 high, 32 wide: one map pixel covers 4 image columns and 2 image rows (8 image px)
    found = find_regions(two_rectangles(), 0.5, image_shape=(16, 32))
    assert found.image_shape == (16, 32)
    a, b = found.regions
    # A: 6 map px = 48 image px; cols [1, 4) -> x [4, 16); rows [1, 3) -> y [2, 6);
    # centroid: mean col 2, mean row 1.5 -> x = (2 + 0.5) * 4 - 0.5 = 9.5, y = (1.5 + 0.5) * 2 - 0.5 = 3.5
    # (the mean of image columns 4..15 is 9.5, of rows 2..5 is 3.5); mean (5 * 1 + 3) / 6
    assert a == Region(id=1, map_pixels=6, area_px=48.0, area_mm2=None, bbox=(4, 2, 16, 6), centroid=(9.5, 3.5),
                       peak=3.0, mean=pytest.approx(8 / 6))
    # B: one region under 8-connectivity (two under 4); 2 map px = 16 image px; cols [6, 8) -> x [24, 32),
    # rows [5, 7) -> y [10, 14); centroid col 6.5 -> 7 * 4 - 0.5 = 27.5, row 5.5 -> 6 * 2 - 0.5 = 11.5
    assert b == Region(id=2, map_pixels=2, area_px=16.0, area_mm2=None, bbox=(24, 10, 32, 14), centroid=(27.5, 11.5),
                       peak=pytest.approx(0.9), mean=pytest.approx(0.8))
    assert found.labels[1, 1] == 1 and found.labels[6, 7] == 2 and found.labels[4, 0] == 0
    assert int(found.mask.sum()) == 8


def test_areas_in_mm2_and_boxes_rounded_outwards_at_a_fractional_scale():
    found = find_regions(two_rectangles(), 0.5, image_shape=(16, 32), mm_per_px=0.5)
    assert [r.area_mm2 for r in found.regions] == [12.0, 4.0]  # 48 * 0.25, 16 * 0.25
    # a 4 x 4 map of a 10 x 10 image: map pixel (row 2, col 1) covers x [2.5, 5), y [5, 7.5);
    # outwards: x [2, 5), y [5, 8); area 100 / 16 = 6.25; centre (1.5 * 2.5 - 0.5, 2.5 * 2.5 - 0.5)
    one = np.zeros((4, 4))
    one[2, 1] = 1.0
    (region,) = find_regions(one, 0.0, image_shape=(10, 10)).regions
    assert (region.bbox, region.area_px, region.centroid) == ((2, 5, 5, 8), 6.25, (3.25, 5.75))
    # without an image shape the coordinates are the map's own
    (own,) = find_regions(one, 0.0).regions
    assert (own.bbox, own.area_px, own.centroid) == ((1, 2, 2, 3), 1.0, (1.0, 2.0))


def test_no_pixel_above_the_threshold_means_no_region():
    found = find_regions(two_rectangles(), 3.0)  # the peak equals it: not above
    assert found.regions == () and not found.mask.any()


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 3, 3)), r"\(h, w\)"), (np.array([[0.0, np.nan]]), "NaN or inf"),
])
def test_maps_that_are_not_finite_2d_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        find_regions(bad, 0.5)


# --- the acceptance rule ---------------------------------------------------------------------


def test_the_rule_rejects_a_part_with_a_region_at_least_the_minimum_area():
    regions = find_regions(two_rectangles(), 0.5, image_shape=(16, 32), mm_per_px=0.5).regions  # 48 and 16 px
    exactly = RegionSpec(0.5, min_area_px=48)
    assert [exactly.is_defect(r) for r in regions] == [True, False] and exactly.verdict(regions) == "defective"
    assert RegionSpec(0.5, min_area_px=48.5).verdict(regions) == "good"
    assert RegionSpec(0.5, min_area_px=1).verdict(()) == "good"  # no region, nothing to reject
    in_mm2 = RegionSpec(0.5, mm_per_px=0.5, min_area_mm2=4)  # areas 12 and 4 mm²
    assert [in_mm2.is_defect(r) for r in regions] == [True, True] and in_mm2.largest_area(regions) == 12.0
    assert RegionSpec(0.5, mm_per_px=0.5, min_area_mm2=12.5).verdict(regions) == "good"
    plain = RegionSpec(0.5)  # no rule: the image score decides
    assert plain.verdict(regions) is None and plain.is_defect(regions[0]) is None and plain.largest_area(regions) == 48.0
    assert RegionSpec.from_json(json.loads(json.dumps(in_mm2.to_json()))) == in_mm2
    with pytest.raises(ValueError, match="not both"):
        RegionSpec(0.5, mm_per_px=1.0, min_area_px=1, min_area_mm2=1)
    with pytest.raises(ValueError, match="needs mm_per_px"):
        RegionSpec(0.5, min_area_mm2=1)


# --- the pixel threshold -----------------------------------------------------------------------


def test_pixel_threshold_is_the_conformal_order_statistic_of_good_pixels():
    good = np.arange(1, 13, dtype=np.float32).reshape(3, 2, 2)  # 3 good images of 2 x 2 px: 1, 2, ..., 12
    # N = 12: k = floor(0.25 * 13) - 1 = 2 -> the 3rd largest, 10; pixels above it: 11, 12 (2 of 12)
    assert calibrate_pixel_threshold(good, 0.25) == 10.0
    assert calibrate_pixel_threshold(good, 0.5) == 7.0  # k = floor(6.5) - 1 = 5: the 6th largest
    assert calibrate_pixel_threshold(good, 0.01) == 12.0  # k = floor(0.13) - 1 < 0: the maximum
    assert calibrate_pixel_threshold(good[::-1].copy(), 0.25) == 10.0  # order does not matter
    # the bound on a new image's expected share above it: (k + P) / ((m + 1) P) = (2 + 4) / (4 * 4)
    assert pixel_false_positive_bound(3, 4, 0.25) == 6 / 16
    with pytest.raises(ValueError, match="no good pixels"):
        calibrate_pixel_threshold(np.zeros((0, 4, 4)), 0.01)
    with pytest.raises(ValueError, match="NaN or inf"):
        calibrate_pixel_threshold(np.array([1.0, np.inf]), 0.01)


def test_ablate_recalibrates_the_pixel_threshold_of_a_chosen_fusion():
    """Two images of 4 x 4 px whose sum fusion is 1..16 (image 0) and 0 (image 1): pooled N = 32,
    at 0.1 k = floor(3.3) - 1 = 2, the 3rd largest, 14; the record round-trips, and a fusion.json
    of an earlier dualstpm (no pixel_threshold) reads as none."""
    from dualstpm.ablation.grid import Config
    from dualstpm.ablation.run import chosen_fusion
    from dualstpm.detector import ChosenFusion
    from dualstpm.maps import MapSet
    from dualstpm.model.fusion import FusionSpec, ScoreSpec
    from dualstpm.model.inference import MapViews

    maps = np.zeros((2, 2, 3, 4, 4), dtype=np.float16)
    maps[0, 0, 0] = np.arange(1, 17).reshape(4, 4)
    val = MapSet(maps, np.zeros(2, dtype=np.int8), np.array(["good", "good"]), np.array(["a.png", "b.png"]), None, {})
    views = MapViews(FusionSpec(), None, score=ScoreSpec())
    chosen = chosen_fusion(Config("sum", "named", FusionSpec(mode="sum")), val, views, 0.01, {"config": "sum"}, 0.1)
    assert chosen.pixel_threshold == 14.0
    assert ChosenFusion.from_json(json.loads(json.dumps(chosen.to_json()))) == chosen
    earlier = {k: v for k, v in json.loads(json.dumps(chosen.to_json())).items() if k != "pixel_threshold"}
    assert ChosenFusion.from_json(earlier).pixel_threshold is None
    assert chosen_fusion(Config("sum", "named", FusionSpec(mode="sum")), val, views, 0.01, {}).pixel_threshold is None


# --- params ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, fragments", [
    (["data.mm_per_px=0"], ["data.mm_per_px = 0:", "positive number of millimetres", "e.g. 0.05", "or null"]),
    (["data.mm_per_px=-0.1"], ["data.mm_per_px = -0.1:", "positive number"]),
    (["regions.pixel_fpr=null", "decision.min_defect_area_px=50"],
     ["decision.min_defect_area_px=50", "regions.pixel_fpr is null", "set regions.pixel_fpr (e.g. 0.001)"]),
    (["decision.min_defect_area_mm2=0.5"],
     ["decision.min_defect_area_mm2=0.5 needs the pixel scale", "data.mm_per_px is null", "set data.mm_per_px"]),
    (["data.mm_per_px=0.1", "decision.min_defect_area_mm2=0.5", "decision.min_defect_area_px=5"],
     ["both set", "one acceptance rule"]),
    (["decision.min_defect_area_px=0"], ["decision.min_defect_area_px = 0:", "positive area"]),
    (["regions.pixel_fpr=1"], ["regions.pixel_fpr = 1:", "strictly between 0 and 1"]),
])
def test_bad_region_params_are_refused_at_load_naming_key_value_and_fix(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_params(None, overrides)
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_predict_and_test_refuse_a_pixel_scale_the_model_would_not_apply():
    """`data.*` is read from --set by predict and test, but the pixel scale is the model's own."""
    from dualstpm.cli import SERVING_SETTINGS, serving_params

    for command in ("predict", "test"):
        with pytest.raises(ConfigError, match=rf"`dualstpm {command}` does not apply --set data.mm_per_px=0.1: the "
                                              r"model measures .*fit it with --set data.mm_per_px=0.1"):
            serving_params(None, ["data.mm_per_px=0.1"], command, SERVING_SETTINGS[command])


def test_region_params_default_to_a_pixel_threshold_and_no_rule():
    params = load_params(None)
    assert (params.regions.pixel_fpr, params.decision.min_defect_area_px, params.decision.min_defect_area_mm2,
            params.data.mm_per_px) == (0.001, None, None, None)
    both = load_params(None, ["data.mm_per_px=0.05", "decision.min_defect_area_mm2=0.25"])
    assert (both.data.mm_per_px, both.decision.min_defect_area_mm2) == (0.05, 0.25)


# --- the trained model -------------------------------------------------------------------------

RULE_PX = 20.0


def model_copy(trained_run: Path, dest: Path, **sections: dict) -> Path:
    """A copy of the trained run whose RUN/model/params.yaml has `sections` merged in (e.g. a
    region rule: it changes no training, only what the model decides with)."""
    shutil.copytree(trained_run, dest, ignore=shutil.ignore_patterns("exports", "plots", "maps", "evaluations"))
    path = dest / "model" / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return dest


@pytest.fixture(scope="module")
def rule_run(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_copy(trained_run, tmp_path_factory.mktemp("rule") / "run",
                      decision={"min_defect_area_px": RULE_PX}, data={"mm_per_px": 0.1})


def test_fit_stores_the_pixel_threshold_of_its_calibration_images(trained_run: Path, synthetic_root: Path):
    """calibration.json's fused pixel threshold is `calibrate_pixel_threshold` of the fused maps
    of exactly the calibration part of the validation images, at regions.pixel_fpr."""
    from dualstpm.data import (
        decode_images,
        load_category,
        split_train_val,
        validation_parts,
    )
    from dualstpm.detector import Detector

    detector = Detector.load(trained_run)
    params, calibration = detector.params, detector.calibration
    _, val_paths = split_train_val(load_category(synthetic_root, "synth_texture"), params.fit.val_fraction, params.seed)
    part = validation_parts(len(val_paths), params.calibration.split, params.seed).calibration
    maps = detector.score(decode_images([val_paths[i] for i in part], params.image_size)).maps["fused"].numpy()
    assert calibration.pixel_fpr == 0.001 and set(calibration.pixel_thresholds) == set(calibration.thresholds)
    assert calibration.pixel_thresholds["fused"] == pytest.approx(calibrate_pixel_threshold(maps, 0.001), rel=1e-6)
    assert detector.regions == RegionSpec(calibration.pixel_thresholds["fused"], 0.001)  # no rule, no scale


def test_a_rule_on_a_model_without_pixel_threshold_is_refused_at_load(trained_run: Path, tmp_path: Path):
    from dualstpm.detector import Detector

    run = model_copy(trained_run, tmp_path / "run", decision={"min_defect_area_px": RULE_PX})
    path = run / "model" / "calibration.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in data.items() if k not in ("pixel_fpr", "pixel_thresholds")}))
    with pytest.raises(RunError, match=r"region rule \(decision\.\*\) but it has no pixel threshold.*'fused'.*refit"):
        Detector.load(run)


def read_regions(folder: Path) -> list[dict]:
    return [strict_json(line) for line in (folder / "regions.jsonl").read_text().splitlines()]


def test_predict_writes_regions_and_the_rules_verdict(rule_run: Path, synthetic_root: Path, tmp_path: Path):
    from dualstpm.detector import Detector
    from dualstpm.predict import COLUMNS, predict

    images = [synthetic_root / "synth_texture" / "test" / kind / "000.png" for kind in ("good", "hole", "scratch")]
    table = predict(Detector.load(rule_run), images, tmp_path / "pred")
    assert list(table.columns) == [*COLUMNS[:-2], "n_regions", "verdict", *COLUMNS[-2:]]
    lines = read_regions(tmp_path / "pred")
    assert lines and all(set(line) == {"image", "region", "area_px", "area_mm2", "map_pixels", "bbox", "centroid",
                                       "peak", "mean", "defect"} for line in lines)
    for row in table.itertuples():
        mine = [line for line in lines if line["image"] == row.path]
        assert [line["region"] for line in mine] == list(range(1, row.n_regions + 1))
        for line in mine:  # 64 px images, 64 px map: an image pixel is a map pixel, of 0.1 mm
            assert line["area_px"] == line["map_pixels"] and line["area_mm2"] == pytest.approx(line["area_px"] * 0.01)
            assert line["defect"] == (line["area_px"] >= RULE_PX)
            x0, y0, x1, y1 = line["bbox"]
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and x0 <= line["centroid"][0] < x1
        assert row.verdict == ("defective" if any(line["defect"] for line in mine) else "good")
    assert (table["verdict"] == "defective").any()  # a hole of this texture is larger than 20 px


def test_without_pixel_threshold_predict_and_test_are_as_before(trained_run: Path, synthetic_root: Path,
                                                                tmp_path: Path):
    """A model with no pixel threshold (calibration.json of an earlier dualstpm): the table has
    the columns it always had, no regions.jsonl is left (not even an earlier batch's), and
    metrics.json has no `regions`, its other figures those of the same model with regions."""
    from dualstpm.detector import Detector
    from dualstpm.evaluation import test_run
    from dualstpm.predict import COLUMNS, predict

    run = model_copy(trained_run, tmp_path / "run")
    path = run / "model" / "calibration.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in data.items() if k not in ("pixel_fpr", "pixel_thresholds")}))
    detector = Detector.load(run)
    assert detector.regions is None
    out = tmp_path / "pred"
    images = [synthetic_root / "synth_texture" / "test" / "hole" / "000.png"]
    predict(Detector.load(trained_run), images, out)
    assert (out / "regions.jsonl").is_file()
    table = predict(detector, images, out)
    assert list(table.columns) == list(COLUMNS) and not (out / "regions.jsonl").exists()
    with_regions = model_copy(trained_run, tmp_path / "with")
    before, after = test_run(run, synthetic_root, "synth_texture"), test_run(with_regions, synthetic_root, "synth_texture")
    assert "regions" not in before and "regions" in after
    assert {k: v for k, v in after.items() if k != "regions"} == before


def test_test_reports_the_rule_beside_the_plain_score(rule_run: Path, synthetic_root: Path, tmp_path: Path):
    from dualstpm.detector import Detector
    from dualstpm.evaluation import test_run
    from dualstpm.predict import predict

    result = test_run(rule_run, synthetic_root, "synth_texture", out_dir=tmp_path / "eval")
    regions = result["regions"]
    assert regions["view"] == "fused" and regions["rule"] == "region area >= 20 px"
    assert regions["pixel_threshold"] == Detector.load(rule_run).regions.pixel_threshold
    assert 0 <= regions["pixel_fpr_good_test"] <= 1 and regions["image_auroc"] is not None
    # 2 calibration images of 64 x 64 px: N = 8192, k = floor(0.001 * 8193) - 1 = 7, bound (7 + 4096) / (3 * 4096)
    assert result["calibration"]["validation_split"]["calibration_images"] == 2
    assert regions["pixel_fpr_bound"] == 4103 / 12288
    rule = regions["at_rule"]
    assert rule["min_defect_area_px"] == RULE_PX and rule["false_alarms"] <= result["n_test_images"]
    # the rule's verdicts on the test images, counted from predict's table, agree (the test scores float16-
    # rounded stored maps: a region near 20 px could differ, which this texture's regions are not)
    table = predict(Detector.load(rule_run), [synthetic_root / "synth_texture" / "test"], tmp_path / "pred")
    good = table["path"].str.contains("/good/")
    assert rule["false_alarms"] == int((table["verdict"][good] == "defective").sum())
    assert rule["recall"] == pytest.approx(float((table["verdict"][~good] == "defective").mean()))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["regions"] == json.loads(json.dumps(regions))


def test_region_evaluation_by_hand():
    """4 images, 4 x 4 maps (= image size), threshold 0.5, rule >= 2 px: good images with no region
    and with one 1-px region, defective ones with a 4-px region and with none."""
    from dualstpm.evaluation import region_evaluation

    maps = np.zeros((4, 4, 4), dtype=np.float32)
    maps[1, 0, 0] = 1.0
    maps[2, 1:3, 1:3] = 1.0
    labels = np.array([0, 0, 1, 1])
    result = region_evaluation(RegionSpec(0.5, 0.01, min_area_px=2), maps, labels, [(4, 4)] * 4)
    # largest areas [0, 1, 4, 0]: pairs (4, 0) 1, (4, 1) 1, (0, 0) 0.5, (0, 1) 0 -> AUROC 2.5 / 4
    assert result["image_auroc"] == 0.625
    assert result["pixel_fpr_good_test"] == 1 / 32  # one of the good images' 32 pixels
    assert (result["regions_per_good_image"], result["regions_per_defective_image"]) == (0.5, 0.5)
    # flagged: only the 4-px image: no false alarm, recall 1/2, precision 1, F1 2 * 0.5 / 1.5
    assert result["at_rule"] == {"min_defect_area_px": 2, "min_defect_area_mm2": None, "false_alarm_rate": 0.0,
                                 "false_alarms": 0, "recall": 0.5, "precision": 1.0, "f1": pytest.approx(2 / 3)}
    assert region_evaluation(RegionSpec(0.5), maps, labels, [(4, 4)] * 4)["at_rule"] is None
    assert result["small_region_recall"] is None  # no ground truth given


def test_small_region_recall_by_hand():
    """Two 100 x 100 frames: a region is small below 0.1 % of 10,000 px = 10 px. Frame 0 holds a 3 px
    scratch (touched: one of its pixels is above the threshold) and a 9 px square (missed); frame 1 a
    10 px bar (not small: 10 is not below 10) and two pixels touching at a corner (one 8-connected
    2 px region, missed). Small regions 3, touched 1: recall 1/3."""
    from dualstpm.metrics import small_region_recall

    masks = np.zeros((2, 100, 100), dtype=bool)
    maps = np.zeros((2, 100, 100), dtype=np.float32)
    masks[0, 10, 10:13] = True
    maps[0, 10, 12] = 0.9  # the scratch's last pixel is found
    masks[0, 50:53, 50:53] = True
    maps[0, 49, 49] = 0.9  # beside the square, not on it: it does not count
    masks[1, 70, 0:10] = True
    maps[1, 70, 0:10] = 0.9
    masks[1, 20, 20] = masks[1, 21, 21] = True
    result = small_region_recall(masks, maps, pixel_threshold=0.5)
    assert result == {"max_area_share": 0.001, "max_area_px": 10.0, "small_regions": 3, "touched": 1,
                      "recall": pytest.approx(1 / 3)}
    assert small_region_recall(np.zeros((1, 8, 8), bool), np.zeros((1, 8, 8)), 0.5)["recall"] is None


# --- exports and the served model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def rule_export(rule_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dualstpm.export import export_run

    return export_run(rule_run, "onnx", "fp32", tmp_path_factory.mktemp("rule-export") / "onnx")


def comparable(records: list[dict]) -> list[dict]:
    """Region records less their peak and mean (map values, compared within the parity bound)."""
    return [{k: v for k, v in r.items() if k not in ("peak", "mean")} for r in records]


@pytest.mark.filterwarnings("ignore")
def test_an_onnx_export_finds_the_regions_and_verdicts_pytorch_finds(rule_run: Path, rule_export: Path,
                                                                       synthetic_root: Path):
    from dualstpm.backends import ExportedModel
    from dualstpm.compute import Compute
    from dualstpm.data import read_image
    from dualstpm.detector import Detector
    from dualstpm.predict import region_records, score_images

    detector = Detector.load(rule_run, Compute.resolve("cpu", "float32"))
    meta = json.loads((rule_export / "metadata.json").read_text())
    assert meta["regions"]["pixel_threshold"] == detector.regions.pixel_threshold
    assert (meta["regions"]["min_defect_area_px"], meta["regions"]["mm_per_px"]) == (RULE_PX, 0.1)
    images = [read_image(p) for p in sorted((synthetic_root / "synth_texture" / "test").rglob("*.png"))]
    reference = score_images(detector, images)
    assert sum(len(r.regions.regions) for r in reference) > 0
    for backend in ("onnxruntime", "openvino"):
        exported = ExportedModel(rule_export, backend)
        assert exported.regions == detector.regions
        for got, want in zip(score_images(exported, images), reference, strict=True):
            ours, theirs = region_records(got.regions, exported.regions), region_records(want.regions, detector.regions)
            assert comparable(ours) == comparable(theirs) and got.verdict == want.verdict
            np.testing.assert_allclose([r["peak"] for r in ours], [r["peak"] for r in theirs], rtol=0, atol=1e-3)


@pytest.mark.filterwarnings("ignore")
def test_the_served_model_answers_regions_in_strict_json(rule_run: Path, rule_export: Path, synthetic_root: Path,
                                                        tmp_path: Path):
    """The pyfunc's answer, written by MLflow's scoring server's own serialiser, parses as
    strict JSON; its regions are predict's regions.jsonl less `image`, on PyTorch and on ONNX Runtime."""
    from mlflow.pyfunc.scoring_server import predictions_to_json

    from dualstpm.detector import Detector
    from dualstpm.mlops.mlflow_model import DualStpmPyfunc
    from dualstpm.predict import predict

    images = sorted((synthetic_root / "synth_texture" / "test" / "hole").glob("*.png"))[:2]
    model = DualStpmPyfunc()
    model.load_context(SimpleNamespace(artifacts={"model": str(rule_run / "model"), "onnx": str(rule_export)},
                                       model_config={"device": "cpu"}))
    frame = pd.DataFrame({"image": [p.read_bytes() for p in images]})
    table = predict(Detector.load(rule_run, device="cpu"), images, tmp_path / "pred")
    expected = read_regions(tmp_path / "pred")
    for backend in ("torch", "onnxruntime"):
        answer = model.predict(None, frame, params={"return_regions": True, "backend": backend})
        text = io.StringIO()
        predictions_to_json(answer, text)
        rows = strict_json(text.getvalue())["predictions"]
        assert [row["verdict"] for row in rows] == list(table["verdict"])
        assert [row["n_regions"] for row in rows] == list(table["n_regions"])
        served = [{"image": str(path), **region} for path, row in zip(images, rows, strict=True) for region in row["regions"]]
        assert comparable(served) == comparable(expected)
    assert "regions" not in model.predict(None, frame).columns  # only when asked for
