"""Overlays an inspector can use: a scale fixed by the model, the decision, the aspect ratio."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dualstpm.errors import DataError, RunError
from dualstpm.model.fusion import FusionSpec, MapStats, ScoreSpec
from dualstpm.model.inference import MapViews
from dualstpm.overlays import LABEL_COLOURS, OverlayScale, draw_overlay, overlay_grid

STATS = MapStats(torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), torch.ones(2, 3))


def scale_of(spec: FusionSpec, threshold: float) -> OverlayScale:
    """The overlay scale of a model fusing with `spec` (its `fused` view) on STATS."""
    return OverlayScale.of_level(MapViews(spec, STATS, score=ScoreSpec()).typical_level("fused"), threshold)


def _band_height(width: int, scale: OverlayScale, title: str | None = None, regions: bool = False) -> int:
    """The caption band's height at `width`: a square picture's height minus its image's
    (`regions`: with the caption line of a model with a pixel threshold)."""
    from dualstpm.model.regions import RegionSpec, find_regions
    from dualstpm.overlays import RegionsShown

    shown = RegionsShown(find_regions(np.zeros((2, 2)), 1.0), RegionSpec(1.0)) if regions else None
    square = draw_overlay(np.zeros((width, width, 3)), np.zeros((width, width)), scale, 1.0, "good", title=title,
                          regions=shown)
    return square.height - width


def test_scale_starts_at_the_fused_level_of_a_typical_good_pixel():
    # six maps at their validation means 1..6; product: (1+4)(2+5)(3+6) = 315; sum: 21
    product = scale_of(FusionSpec(sigma=2.0), threshold=400.0)
    assert product.low == pytest.approx(315.0)
    assert product.high == pytest.approx(400.0 + 85.0 / 2)
    assert scale_of(FusionSpec(mode="sum"), 30.0).low == pytest.approx(21.0)
    # normalised by the means, a typical pixel is 1 per map: product of (1 + 1) over 3 levels = 8
    assert scale_of(FusionSpec(normalize="val_stats"), 30.0).low == pytest.approx(8.0)
    # branch A alone at level weights 1, 0, 2: levels 1 and 3 used, 1 * (2 * 3) = 6
    spec = FusionSpec(weights=((1.0, 0.0, 2.0), (0.0, 0.0, 0.0)))
    assert scale_of(spec, 30.0).low == pytest.approx(6.0)


def test_a_model_threshold_at_or_below_the_typical_level_is_refused():
    with pytest.raises(RunError, match=r"the model's threshold 315 is not above .* \(315\)"):
        scale_of(FusionSpec(), threshold=315.0)


def test_a_chosen_decision_threshold_moves_the_mark_not_the_colours():
    image, values = np.full((64, 256, 3), 0.5), np.linspace(0.0, 5.0, 256)[None].repeat(64, 0)
    model = np.asarray(draw_overlay(image, values, OverlayScale(1.0, 3.0), 2.0, "good"))
    chosen = np.asarray(draw_overlay(image, values, OverlayScale(1.0, 3.0, decision=1.5), 2.0, "defective"))
    below = np.asarray(draw_overlay(image, values, OverlayScale(1.0, 3.0, decision=-1.0), 2.0, "defective"))
    assert (model[:64] == chosen[:64]).all() and (model[:64] == below[:64]).all()  # same colours
    assert not (model[64:] == chosen[64:]).all()  # the caption and the mark differ
    assert OverlayScale(1.0, 3.0, decision=1.5).decision_on_bar and not OverlayScale(1.0, 3.0, decision=-1.0).decision_on_bar


def test_pixels_follow_the_models_scale():
    scale = OverlayScale(low=1.0, threshold=3.0)  # high = 3 + 2 / 2 = 4
    image = np.full((128, 256, 3), 0.5)
    values = np.full((128, 256), 0.5)  # below low: untouched
    values[:, 64:128] = 2.0  # half way to the threshold: alpha 0.3, colour jet(1/3) = (0, 5/6, 1)
    values[:, 128:192] = 4.0  # the top of the scale: alpha 0.6, jet(1) = (0.5, 0, 0)
    values[:, 192:] = 9.0  # above it: the same
    picture = np.asarray(draw_overlay(image, values, scale, 9.0, "defective"))
    assert picture.shape[1] == 256 and picture.shape[0] > 128  # the caption band below the image
    assert (picture[:128, :64] == 128).all()  # 0.5 * 255 = 127.5 -> 128
    # 0.7 * 0.5 + 0.3 * (0, 5/6, 1) = (0.35, 0.6, 0.65) -> (89, 153, 166)
    assert (picture[:128, 64:128] == [89, 153, 166]).all()
    # 0.4 * 0.5 + 0.6 * (0.5, 0, 0) = (0.5, 0.2, 0.2) -> (128, 51, 51)
    assert (picture[:128, 128:] == [128, 51, 51]).all()


def test_the_aspect_ratio_is_kept_and_narrow_images_are_enlarged():
    scale = OverlayScale(low=0.0, threshold=1.0)
    band = _band_height(256, scale)
    tall = draw_overlay(np.zeros((300, 100, 3)), np.zeros((300, 100)), scale, 0.5, "good")
    assert tall.size == (256, 768 + band)  # shown 256 wide: 300 * 256 / 100 = 768 rows
    wide = draw_overlay(np.zeros((200, 400, 3)), np.zeros((200, 400)), scale, 0.5, "good")
    assert wide.size[0] == 400 and wide.size[1] - 200 == _band_height(400, scale)
    cell = draw_overlay(np.zeros((200, 400, 3)), np.zeros((200, 400)), scale, 0.5, "good", width=320)
    assert cell.size == (320, 160 + _band_height(320, scale))


def test_a_large_frame_is_shown_at_most_2048_px_on_its_longer_side():
    scale = OverlayScale(low=0.0, threshold=1.0)
    # 100 high x 5000 wide: 2048 wide, 100 * 2048 / 5000 = 40.96 -> 41 rows
    wide = draw_overlay(np.zeros((100, 5000, 3)), np.zeros((100, 5000)), scale, 0.5, "good")
    assert wide.size == (2048, 41 + _band_height(2048, scale))
    # 3000 high x 1000 wide: the height is the longer side, 1000 * 2048 / 3000 = 682.7 -> 683 wide, 2049 rows
    # (683 * 3000 / 1000): rounding the width first keeps the aspect within one pixel
    tall = draw_overlay(np.zeros((3000, 1000, 3)), np.zeros((3000, 1000)), scale, 0.5, "good")
    assert tall.size == (683, 2049 + _band_height(683, scale))


def test_the_caption_shows_the_label_in_its_colour_and_a_title_adds_a_line():
    scale = OverlayScale(low=0.0, threshold=1.0)
    image, values = np.full((64, 256, 3), 0.5), np.zeros((64, 256))
    for label, other in (("defective", "good"), ("good", "defective")):
        band = np.asarray(draw_overlay(image, values, scale, 2.0, label))[64:].reshape(-1, 3)
        assert (band == LABEL_COLOURS[label]).all(axis=1).any()
        assert not (band == LABEL_COLOURS[other]).all(axis=1).any()
    assert _band_height(256, scale, title="hole_000.png") > _band_height(256, scale)


def test_ground_truth_is_outlined_in_white():
    scale = OverlayScale(low=0.0, threshold=1.0)
    mask = np.zeros((4, 4), dtype=bool)
    mask[1:3, 1:3] = True  # shown at 256 x 256: rows and columns 64..191, its border white
    picture = np.asarray(draw_overlay(np.zeros((256, 256, 3)), np.zeros((256, 256)), scale, 0.0, "good", mask=mask))
    assert (picture[64, 64:192] == 255).all() and (picture[64:192, 191] == 255).all()
    assert (picture[65:191, 65:191] == 0).all() and (picture[63, 64:192] == 0).all()


def test_regions_are_outlined_in_magenta_with_their_area_and_a_caption_line():
    from dualstpm.model.regions import RegionSpec, find_regions
    from dualstpm.overlays import REGION_COLOUR, SMALL_REGION_COLOUR, RegionsShown

    scale = OverlayScale(low=0.0, threshold=1.0)
    heat = np.zeros((8, 8))
    heat[2:4, 2:6] = 2.0  # map rows 2-3, cols 2-5 of a 16 x 16 image: image x [4, 12), y [4, 8)
    found = find_regions(heat, 1.0, image_shape=(16, 16))
    image = np.full((16, 16, 3), 0.5)

    def shown(spec: RegionSpec) -> np.ndarray:
        # shown 256 wide: 16 display px per image px, the region at x [64, 192), y [64, 128)
        return np.asarray(draw_overlay(image, np.zeros((16, 16)), scale, 0.0, "good", regions=RegionsShown(found, spec)))

    picture = shown(RegionSpec(1.0))
    assert (picture[127, 64:192] == REGION_COLOUR).all() and (picture[64:128, 191] == REGION_COLOUR).all()
    assert (picture[65:127, 65:191] == 128).all()  # inside: the image, untouched (0.5 -> 128)
    assert (picture[128:200, 64:192] == 128).all()  # below it: untouched
    label = picture[40:64, 64:120].reshape(-1, 3).astype(int)  # the area's label sits above the box, on black
    magenta_ish = (label[:, 0] > 200) & (label[:, 1] < 60) & (label[:, 2] > 200)  # anti-aliased text
    assert (label == 0).all(axis=1).any() and magenta_ish.any()
    # a rule the region does not meet (32 image px < 40): outlined in grey, and the caption says good
    small = shown(RegionSpec(1.0, min_area_px=40))
    assert (small[127, 64:192] == SMALL_REGION_COLOUR).all()
    assert small.shape[0] == picture.shape[0] == 256 + _band_height(256, scale, regions=True) > 256 + _band_height(
        256, scale)  # one more caption line
    assert (small[256:].reshape(-1, 3) == LABEL_COLOURS["good"]).all(axis=1).any()
    assert RegionsShown(found, RegionSpec(1.0, min_area_px=40)).caption() == (
        "rule region area >= 40 px: good; 1 region above pixel threshold 1")


def test_the_grid_tiles_pictures_without_stretching_them():
    scale = OverlayScale(low=0.0, threshold=1.0)
    pictures = [draw_overlay(np.zeros((h, 200, 3)), np.zeros((h, 200)), scale, 0.5, "good", width=320)
                for h in (100, 200, 100)]
    grid = np.asarray(overlay_grid(pictures, "heading", columns=2))
    second = np.asarray(pictures[1])
    x, y = 8 + 320 + 8, 2 * 8 + 16  # GRID_GAP, the heading line
    assert (grid[y : y + second.shape[0], x : x + 320] == second).all()  # pasted pixel for pixel
    assert grid.shape[1] == 2 * 320 + 3 * 8


def test_predict_overlays_show_the_decision_and_a_reused_folder_keeps_no_stale_ones(
        trained_run: Path, synthetic_root: Path, tmp_path: Path):
    from dualstpm.detector import Detector
    from dualstpm.predict import predict
    from dualstpm.rundir import PREDICTIONS_FILE

    detector = Detector.load(trained_run)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("000.png", "001.png"):
        shutil.copy(synthetic_root / "synth_texture" / "test" / "hole" / name, images / name)
    wide = np.asarray(Image.open(images / "000.png"))[:32]  # a 64 x 32 crop: twice as wide as tall
    Image.fromarray(wide).save(images / "wide.png")
    out = tmp_path / "pred"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    first = predict(detector, [images], out)
    assert sorted(first["overlay"]) == ["000_overlay.png", "001_overlay.png", "wide_overlay.png"]
    shown = Image.open(out / "wide_overlay.png")
    assert shown.width == 256 and shown.height == 128 + _band_height(256, OverlayScale(0.0, 1.0), "wide.png",
                                                                     regions=True)

    second = predict(detector, [images / "001.png"], out)
    assert list(second["overlay"]) == ["001_overlay.png"]
    # regions.jsonl: the defect regions of this batch (the model has a pixel threshold; docs/regions.md)
    assert sorted(p.name for p in out.iterdir()) == ["001_overlay.png", "monitor", "notes.txt", PREDICTIONS_FILE,
                                                     "regions.jsonl"]
    assert list(pd.read_csv(out / PREDICTIONS_FILE)["overlay"]) == ["001_overlay.png"]


def test_a_foreign_predictions_csv_in_the_output_folder_is_refused(trained_run: Path, synthetic_root: Path,
                                                                   tmp_path: Path):
    from dualstpm.detector import Detector
    from dualstpm.predict import predict

    (tmp_path / "predictions.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match=r"predictions.csv is not a predictions.csv of `dualstpm predict`"):
        predict(Detector.load(trained_run), [synthetic_root / "synth_texture" / "test" / "hole"], tmp_path)


def test_a_reviewed_output_folder_is_refused_before_anything_is_scored(trained_run: Path, synthetic_root: Path,
                                                                        tmp_path: Path):
    from dualstpm.detector import Detector
    from dualstpm.predict import predict

    holes = synthetic_root / "synth_texture" / "test" / "hole"
    out = tmp_path / "pred"
    detector = Detector.load(trained_run)
    predict(detector, [holes / "000.png"], out)
    (out / "review").mkdir()
    log = out / "review" / "verdicts.jsonl"
    log.write_text('{"verdict": "good"}\n')  # what a review of the first batch left (its content is not read)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(DataError, match=rf"holds the review log {re.escape(str(log))} .*Choose a new --out folder"):
        predict(detector, [holes / "001.png"], out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # no overlay, same table
    assert log.read_text() == '{"verdict": "good"}\n'


def test_the_test_draws_its_overlays_from_the_maps_it_computed(trained_run: Path, synthetic_root: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """The networks run once per test image: the overlays are drawn from those raw maps."""
    from dualstpm.detector import Detector
    from dualstpm.evaluation import test_run

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("exports", "plots", "maps"))
    calls = []
    raw_maps = Detector.raw_maps
    monkeypatch.setattr(Detector, "raw_maps",
                        lambda self, images, **kw: calls.append(len(images)) or raw_maps(self, images, **kw))
    monkeypatch.setattr(Detector, "infer", lambda self, images: pytest.fail("the networks ran again for the overlays"))
    test_run(run, synthetic_root, "synth_texture")
    n_test = len(list((synthetic_root / "synth_texture" / "test").rglob("*.png")))
    n_val = len(np.load(run / "maps" / "val.npz")["labels"])
    assert sum(calls) == n_test + n_val  # each test and validation image once
    assert (run / "plots" / "overlays.png").is_file() and len(list((run / "plots" / "overlays").glob("*.png"))) > 0


def test_the_scale_and_heading_follow_an_applied_chosen_fusion(trained_run: Path):
    from dualstpm.detector import ChosenFusion, Detector, fusion_label
    from dualstpm.overlays import detector_heading, overlay_scale

    trained = Detector.load(trained_run)
    mean = trained.calibration.map_stats.mean
    # the trained product fusion: typical level = product over levels of (mean A + mean B)
    assert overlay_scale(trained).low == pytest.approx(float((mean[0] + mean[1]).prod()), rel=1e-5)
    assert fusion_label(trained) == "params.fusion"
    chosen = ChosenFusion(FusionSpec(mode="sum"), threshold=100.0, source={"config": "sum_all"}, val_min=0.0)
    decided = Detector(trained.model, trained.params, trained.calibration, trained.compute, chosen)
    scale = overlay_scale(decided)  # the sum of the six means, up to the chosen threshold
    assert (scale.low, scale.threshold) == (pytest.approx(float(mean.sum()), rel=1e-5), 100.0)
    assert fusion_label(decided) == "sum_all"
    assert detector_heading(decided, "synth_texture").startswith(
        "synth_texture: chosen view: fusion sum_all chosen by `dualstpm ablate` (sum); threshold 100 ")
    chosen_by_user = overlay_scale(decided, threshold=150.0)  # predict --threshold: labels, not colours
    assert (chosen_by_user.threshold, chosen_by_user.decision) == (100.0, 150.0)


def test_each_telling_image_says_why_it_is_shown():
    from dualstpm.figures import telling_images

    labels = np.array([1, 1, 1, 0, 0, 0], dtype=bool)
    scores = np.array([5.0, 0.5, 3.0, 2.0, 0.1, 0.9])
    # defects by score: 0 (5.0), 2 (3.0), 1 (0.5, not above 1: missed); good parts: 3 (2.0, flagged), 5, 4 (0.1)
    assert telling_images(labels, scores, threshold=1.0) == [
        (0, "top defect #1"), (2, "top defect #2"), (1, "worst miss"), (3, "worst false alarm"),
        (4, "quietest good part")]
    # at threshold 0.4 every defect is caught, so the lowest-scoring one is the weakest caught
    assert dict(telling_images(labels, scores, threshold=0.4))[1] == "weakest defect, caught"
    # at 2.5 no good part is flagged; count 4: one top defect, the lowest defect, the loudest and quietest good part
    assert telling_images(labels, scores, threshold=2.5, count=4) == [
        (0, "top defect #1"), (1, "worst miss"), (3, "highest-scoring good part, not flagged"),
        (4, "quietest good part")]
    assert telling_images(labels, scores, threshold=6.0, count=4)[0] == (0, "top defect #1, missed")


def test_the_roc_chart_is_titled_with_the_category(tmp_path: Path):
    from dualstpm.figures import write_roc

    labels = np.array([0, 0, 1, 1])
    scores = {"fused": np.array([0.1, 0.2, 0.3, 0.4]),  # every defect above every good part: AUROC 1
              "stpm": np.array([0.4, 0.3, 0.2, 0.1]),  # every one below: 0
              "recon": np.array([0.1, 0.3, 0.2, 0.4])}  # 3 of the 4 (defect, good) pairs ordered: 0.75
    axes = write_roc(tmp_path, labels, scores, "bottle").axes[0]
    assert axes.get_title() == "bottle: image ROC (AUROC)"
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["fused (1.000)", "stpm (0.000)", "recon (0.750)"]
    assert (tmp_path / "roc.png").is_file()
    assert write_roc(tmp_path / "one-class", np.zeros(4), scores, "bottle") is None


def test_the_grid_heading_names_the_view_its_fusion_and_threshold():
    from dualstpm.overlays import grid_heading

    assert grid_heading("bottle", "fused", FusionSpec(), 4.48281, "topk_mean(topk=0.01)") == (
        "bottle: fused view: product fusion, the trained model's fusion.* (level weights A 1/1/1, B 1/1/1, "
        "normalize none); threshold 4.483 on the image score topk_mean(topk=0.01); white outline: ground truth")
    chosen = grid_heading("wood", "chosen", FusionSpec(mode="sum", normalize="val_stats"), 0.5, "max",
                          "levels_23_sum+val_stats")
    assert chosen == ("wood: chosen view: fusion levels_23_sum+val_stats chosen by `dualstpm ablate` (sum); "
                      "threshold 0.5 on the image score max; white outline: ground truth")
    assert grid_heading("wood", "recon", FusionSpec(), 2.0, "max").startswith(
        "wood: recon view: branch B (reconstruction) alone; threshold 2 ")


def test_an_overlay_of_8_bit_gray_pixels_is_the_overlay_of_their_float_image():
    from dualstpm.data.images import as_float_rgb
    from dualstpm.overlays import OverlayScale, draw_overlay

    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (300, 280), dtype=np.uint8)  # no resize: at least MIN_WIDTH wide
    anomaly_map = rng.random((300, 280)).astype(np.float32)
    scale = OverlayScale(low=0.2, threshold=0.6)
    ours = draw_overlay(gray, anomaly_map, scale, 0.7, "defective", title="x.png")
    theirs = draw_overlay(as_float_rgb(gray), anomaly_map, scale, 0.7, "defective", title="x.png")
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
