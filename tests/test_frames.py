"""Rectangular input sizes and the native-aspect rule (issue 23 item 1): `image_size: [H, W]`,
`data.keep_aspect`, and one rectangular model through fit, test, ablate, predict and the
exports. Expected values are worked out by hand in the comments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from dualstpm.budget import plan_fit
from dualstpm.config import load_params
from dualstpm.data import decode_images, decode_masks, resize_mask
from dualstpm.data.mvtec import Sample
from dualstpm.errors import ConfigError
from dualstpm.sizes import as_param, aspect_change, describe, from_json, hw, native_size, pixel_count, stretch_note, to_json
from tests.conftest import fit_tiny

# --- the size helpers -----------------------------------------------------------------------


def test_a_side_is_a_square_and_a_pair_is_height_then_width():
    assert hw(256) == (256, 256)
    assert hw((160, 384)) == (160, 384)
    assert pixel_count((160, 384)) == 61_440  # 160 * 384
    assert describe(256) == "256 px" and describe((160, 384)) == "160 high x 384 wide"
    assert as_param(256) == "256" and as_param((160, 384)) == "[160, 384]"
    assert to_json((160, 384)) == [160, 384] and to_json(128) == 128
    assert from_json([160, 384]) == (160, 384) and from_json(128) == 128


def test_native_size_keeps_the_median_aspect_with_sides_in_multiples_of_32():
    # kolektor: 500 wide, 1250 high (portrait); long side 384 -> W = 384 * 500/1250 = 153.6 -> 160 (5 x 32)
    assert native_size([(500, 1250)] * 3, 384) == (384, 160)
    # the same frame turned (landscape): H = 384 / 2.5 = 153.6 -> 160
    assert native_size([(1250, 500)], 384) == (160, 384)
    # mixed shapes: width/height 1, 2 and 3, median 2 -> H = 256 / 2 = 128
    assert native_size([(100, 100), (200, 100), (300, 100)], 256) == (128, 256)
    # a very long strip: 256 / 40 = 6.4 -> the smallest side, 32
    assert native_size([(4000, 100)], 256) == (32, 256)
    with pytest.raises(ValueError, match="no images"):
        native_size([], 256)


def test_aspect_change_is_how_much_a_resize_stretches():
    # 500x1250 (width/height 0.4) into a square: 1 / 0.4 = 2.5
    assert aspect_change((500, 1250), 256) == pytest.approx(2.5)
    # into 384x160 (width/height 160/384 = 0.41667): 0.41667 / 0.4 = 1.0417
    assert aspect_change((500, 1250), (384, 160)) == pytest.approx((160 / 384) / 0.4)
    assert aspect_change((200, 100), (128, 256)) == pytest.approx(1.0)


def test_predict_names_the_images_it_stretches():
    # 500x1250 into a square: 2.5x; 1000x1000: 1x; 530x1250 into a square: 1250/530 = 2.358x
    note = stretch_note([aspect_change((500, 1250), 256), aspect_change((1000, 1000), 256),
                         aspect_change((530, 1250), 256)], 256)
    assert note.startswith("2 of 3 images have another aspect ratio than the model's 256 px input")
    assert "by up to 2.50x" in note
    # 5 % off is not worth a word (the bound is 10 %)
    assert stretch_note([aspect_change((105, 100), 256)], 256) is None


# --- the params -----------------------------------------------------------------------------


def test_image_size_takes_one_side_or_height_and_width():
    params = load_params(None, ["image_size=[160, 384]"])
    assert params.image_size == (160, 384) and params.size == (160, 384)
    assert params.to_dict()["image_size"] == [160, 384]  # written back as the list it was given
    assert load_params(None, ["image_size=256"]).size == (256, 256)


@pytest.mark.parametrize("value, fragment", [
    ("100", "image_size = 100: each side must be a multiple of 32"),
    ("[160, 100]", "got 100"),
    ("[160, 384, 3]", "must be one side (e.g. 256) or [height, width]"),
    ("[160.0, 384]", "two whole numbers"),
    ("true", "must be one side in px"),
    ("64x128", "write a rectangle as [height, width], e.g. [64, 128] if 64 is the height"),
    ("128.0", "must be one side as a whole number of px"),
    ("[4096, 128]", "between 32 and 2048"),
])
def test_a_bad_image_size_is_refused_naming_the_key_value_and_fix(value: str, fragment: str):
    with pytest.raises(ConfigError) as caught:
        load_params(None, [f"image_size={value}"])
    assert fragment in str(caught.value)


def test_a_blur_is_checked_against_the_shorter_side():
    # ceil(4 * 16) = 64 px of padding: too much for a 64 px side, fine for 128
    with pytest.raises(ConfigError, match=r"fusion.sigma=16 .* the map's 64 px side"):
        load_params(None, ["image_size=[64, 256]", "fusion.sigma=16"])
    assert load_params(None, ["image_size=[128, 256]", "fusion.sigma=16"]).fusion.sigma == 16


# --- the data path --------------------------------------------------------------------------


def test_images_and_masks_decode_to_height_by_width(tmp_path: Path):
    pixels = np.zeros((20, 50, 3), dtype=np.uint8)  # 50 wide, 20 high
    pixels[:, 25:] = 255  # right half white
    Image.fromarray(pixels).save(tmp_path / "a.png")
    images = decode_images([tmp_path / "a.png"], (32, 64))
    assert images.shape == (1, 3, 32, 64)
    # the white half stays the right half: left columns black, right columns white
    assert float(images[0, :, :, :16].max()) == 0.0 and float(images[0, :, :, 48:].min()) == 1.0

    mask = np.zeros((20, 50), dtype=bool)
    mask[10, 40] = True  # one defect pixel: row 10 of 20, column 40 of 50
    resized = resize_mask(mask, (32, 64))
    assert resized.shape == (32, 64)
    # area rule (adaptive average pooling, then > 0): target row r reads source rows
    # [floor(r * 20/32), ceil((r + 1) * 20/32)); source row 10 is read by r = 16 ([10, 11)) and
    # r = 17 ([10, 12)), not 15 ([9, 10)) nor 18 ([11, 12)). Columns, 50/64: source column 40 by
    # c = 51 ([39, 41)) and c = 52 ([40, 42)), not 50 ([39, 40)) nor 53 ([41, 42)).
    rows, cols = np.nonzero(resized.numpy())
    assert sorted(zip(rows.tolist(), cols.tolist())) == [(16, 51), (16, 52), (17, 51), (17, 52)]

    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "a_mask.png")
    masks, report = decode_masks([Sample(tmp_path / "a.png", 1, "scratch", tmp_path / "a_mask.png")], (32, 64))
    assert masks.shape == (1, 32, 64) and report.to_dict()["size"] == [32, 64]


def test_synthetic_defects_paste_onto_rectangular_images():
    from dualstpm.ablation.defects import KINDS, paste_defects

    images = torch.rand(2, 3, 32, 96, generator=torch.Generator().manual_seed(0))
    defective, masks, kinds = paste_defects(images, list(KINDS), 3, seed=0)
    assert defective.shape == (6, 3, 32, 96) and masks.shape == (6, 32, 96)
    assert sorted(set(kinds)) == sorted(KINDS)
    assert all(m.any() for m in masks)  # every copy has a defect
    changed = (defective - images.repeat_interleave(3, dim=0)).abs().amax(dim=1) > 0
    assert not (changed & torch.from_numpy(~masks)).any()  # nothing painted outside a mask
    assert (changed & torch.from_numpy(masks)).any()


# --- the plan: keep_aspect and the squash warning --------------------------------------------


def test_keep_aspect_plans_the_native_size_and_planning_again_keeps_it():
    params = load_params(None, ["data.keep_aspect=true", "image_size=256", "fit.recipe=fixed"])
    shapes = [(500, 1250)] * 5  # width/height 0.4
    plan = plan_fit(params, "/mine", 5, shapes)
    # long side 256, the other 256 * 0.4 = 102.4 -> 96 (3 x 32)
    assert plan.params.image_size == (256, 96)
    assert plan.aspect == pytest.approx(0.4)
    assert plan.stretch == pytest.approx(0.4 / (96 / 256))  # 1.0667: below the 10 % note
    assert plan.aspect_note() is None
    assert plan_fit(plan.params, "/mine", 5, shapes).params.image_size == (256, 96)  # the fit plans again
    with pytest.raises(ValueError, match="keep_aspect needs the training images' shapes"):
        plan_fit(params, "/mine", 5)


def test_a_squash_is_never_silent():
    plan = plan_fit(load_params(None, ["image_size=256", "fit.recipe=fixed"]), "/mine", 5, [(500, 1250)] * 5)
    assert plan.params.image_size == 256 and plan.stretch == pytest.approx(2.5)
    note = plan.aspect_note()
    assert "stretches their aspect ratio by up to 2.50x" in note
    assert "set data.keep_aspect=true or image_size=[256, 96] (height, width: 256 high x 96 wide" in note
    # mixed shapes whose median the size already suits (width/height 1, 1 and 0.5: median 1, a
    # square): the note says the images differ; the 50x100 one is stretched 1 / 0.5 = 2x
    mixed = plan_fit(load_params(None, ["image_size=256"]), "/mine", 3, [(100, 100), (100, 100), (50, 100)])
    assert mixed.stretch == pytest.approx(2.0)  # the 50x100 image into a square
    assert "differ in shape (median width/height 1.00)" in mixed.aspect_note()
    # square images into a square: nothing to say
    assert plan_fit(load_params(None, ["image_size=256"]), "/mine", 5, [(64, 64)]).aspect_note() is None


# --- one rectangular model, end to end --------------------------------------------------------


@pytest.fixture(scope="module")
def wide_root(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    """`wide`: the synth_texture category cut to its middle half, 64 wide x 32 high."""
    source, root = synthetic_root / "synth_texture", tmp_path_factory.mktemp("wide")
    for path in source.rglob("*.png"):
        target = root / "wide" / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(path).crop((0, 16, 64, 48)).save(target)
    return root


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory: pytest.TempPathFactory, wide_root: Path) -> Path:
    return fit_tiny(tmp_path_factory, wide_root, "wide", "wide", "image_size=64", "data.keep_aspect=true", "fit.epochs=1")


def test_a_rectangular_model_is_fitted_tested_and_predicted_at_its_own_size(wide_run: Path, wide_root: Path,
                                                                            tmp_path: Path):
    from dualstpm.detector import Detector
    from dualstpm.evaluation import test_run
    from dualstpm.predict import predict

    detector = Detector.load(wide_run)
    # 64 x 32 frames, long side 64: width/height 2 -> H = 64 / 2 = 32
    assert detector.image_size == (32, 64) and detector.calibration.image_size == (32, 64)
    result = test_run(wide_run, wide_root, "wide", out_dir=wide_run)
    assert result["ground_truth"]["size"] == [32, 64]
    assert result["fused"]["image_auroc"] is not None
    table = predict(detector, [wide_root / "wide" / "test" / "good"], tmp_path / "pred")
    assert len(table) == 6 and (table["error"] == "").all()  # every image scored
    out = detector.infer(decode_images(sorted((wide_root / "wide" / "test" / "good").glob("*.png")), (32, 64)))
    assert out.anomaly_map.shape == (6, 32, 64)


def test_the_exports_take_the_rectangular_input_and_agree(wide_run: Path, wide_root: Path, tmp_path: Path):
    from dualstpm.backends import ExportedModel
    from dualstpm.detector import Detector
    from dualstpm.export import export_run
    from tests.test_export import assert_parity

    detector = Detector.load(wide_run)
    images = decode_images(sorted((wide_root / "wide" / "test" / "good").glob("*.png")), (32, 64))
    exported = export_run(wide_run, "onnx", "fp32", tmp_path / "onnx")
    model = ExportedModel(exported, "onnxruntime")
    assert model.image_size == (32, 64)
    meta = pd.read_json(exported / "metadata.json", typ="series")
    assert meta["image_size"] == [32, 64] and meta["input"]["shape"] == ["N", 3, 32, 64]
    assert_parity(model.infer(images), detector.infer(images))
