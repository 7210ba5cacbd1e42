"""Ground truth read as the user meant it: every mask convention, thin defects kept at the
metric resolution, empty masks, merged regions and masks lossy compression damaged
reported, honest means over categories."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import strict_json
from dualstpm.cli import print_metrics
from dualstpm.data import Sample, decode_masks, read_mask, resize_mask
from dualstpm.data.images import read_mask_file
from dualstpm.evaluation import test_run
from dualstpm.metrics import category_means
from dualstpm.mlops.stages import metrics_table

H, W = 24, 32


def _reference() -> np.ndarray:
    """A 5x7 rectangle (35 px), a 1-px dot (1 px) and a 10-px line: 46 defect pixels, 3 regions."""
    mask = np.zeros((H, W), dtype=bool)
    mask[4:9, 3:10] = True
    mask[15, 20] = True
    mask[20, 10:20] = True
    return mask


MASK = _reference()
N_DEFECT = 35 + 1 + 10


def _palette(mask: np.ndarray, colours: list[int], indices: np.ndarray, **info: int) -> Image.Image:
    image = Image.frombytes("P", (W, H), indices.astype(np.uint8).tobytes())
    image.putpalette(colours)
    image.info.update(info)
    return image


def _stack(*planes: np.ndarray) -> np.ndarray:
    return np.dstack([np.broadcast_to(p, (H, W)) for p in planes]).astype(np.uint8)


m = MASK.astype(np.uint8)
CONVENTIONS: dict[str, tuple[Callable[[], Image.Image], str]] = {
    "0/1": (lambda: Image.fromarray(m), "png"),
    "0/255": (lambda: Image.fromarray(m * 255), "png"),
    "0/65535 16-bit": (lambda: Image.fromarray(m.astype(np.uint16) * 65535), "png"),
    "16-bit holding 0/255": (lambda: Image.fromarray(m.astype(np.uint16) * 255), "png"),
    "16-bit holding 0/1": (lambda: Image.fromarray(m.astype(np.uint16)), "png"),
    "16-bit big-endian": (lambda: Image.frombytes("I;16B", (W, H), (m.astype(">u2") * 65535).tobytes()), "tif"),
    "32-bit int holding 0/255": (lambda: Image.fromarray(m.astype(np.int32) * 255), "tif"),
    "1-bit": (lambda: Image.fromarray(MASK), "png"),
    "bmp 0/255": (lambda: Image.fromarray(m * 255), "bmp"),
    "palette black, red": (lambda: _palette(MASK, [0, 0, 0, 255, 0, 0], m), "png"),
    # index 0 is the defect colour: reading indices as brightness would invert the mask
    "palette red, black": (lambda: _palette(MASK, [255, 0, 0, 0, 0, 0], 1 - m), "png"),
    # a white background made transparent: colour alone is white everywhere
    "palette transparent white, red": (lambda: _palette(MASK, [255, 255, 255, 255, 0, 0], m, transparency=0), "png"),
    "RGB red on black": (lambda: Image.fromarray(_stack(m * 255, 0, 0)), "png"),
    "RGB white on black": (lambda: Image.fromarray(_stack(m * 255, m * 255, m * 255)), "png"),
    "RGBA white on transparent black": (lambda: Image.fromarray(_stack(m * 255, m * 255, m * 255, m * 255)), "png"),
    "RGBA white everywhere, alpha marks": (lambda: Image.fromarray(_stack(255, 255, 255, m * 255)), "png"),
    "RGBA black strokes on transparent": (lambda: Image.fromarray(_stack(0, 0, 0, m * 255)), "png"),
    "gray+alpha, white everywhere": (lambda: Image.fromarray(_stack(255, m * 255)), "png"),
    "gray+alpha, white on transparent": (lambda: Image.fromarray(_stack(m * 255, m * 255)), "png"),
    # class indices: rectangle 1, dot 2, line 3 (every class is a defect)
    "class-index map 0/1/2/3": (lambda: Image.fromarray((MASK * np.select(
        [np.arange(H)[:, None] < 10, np.arange(H)[:, None] < 18], [1, 2], 3)).astype(np.uint8)), "png"),
    # off-white defect and off-black background with +-3 noise: the halfway split is (0 + 250) / 2
    "noisy 0/250": (lambda: Image.fromarray((m * 247 + np.random.default_rng(0).integers(0, 4, (H, W))).astype(np.uint8)),
                    "png"),
}


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_every_mask_convention_reads_the_same_pixels(tmp_path: Path, convention: str) -> None:
    make, suffix = CONVENTIONS[convention]
    path = tmp_path / f"mask.{suffix}"
    make().save(path)
    mask = read_mask(path)
    assert mask.dtype == bool and mask.shape == (H, W)
    assert int(mask.sum()) == N_DEFECT
    assert np.array_equal(mask, MASK)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_mask_compression_noise_is_not_defect(tmp_path: Path, mode: str) -> None:
    """Lossy masks: JPEG rings around edges by far less than half the 0/255 contrast."""
    path = tmp_path / "mask.jpg"
    Image.fromarray(m * 255).convert(mode).save(path, quality=90)
    noisy = np.asarray(Image.open(path).convert("L"))
    assert len(np.unique(noisy)) > 2  # the file really is noisy: a plain 0/255 threshold test would be moot
    mask = read_mask(path)
    assert int(mask.sum()) == N_DEFECT and np.array_equal(mask, MASK)


# --- lossy masks ------------------------------------------------------------------------
# (values, PIL format, save options, the lossy format named, damaged). The rule: a lossy file
# is damaged when its brightest and darkest values differ by less than half its range. A 0/1
# mask differs by 1 of 255 levels (at most, after compression: 0.4 %), a 0/255 one by ~255.
LOSSY_CASES = {
    "0/1 JPEG": (m, "JPEG", {}, "JPEG", True),
    "0/1 JPEG quality 95": (m, "JPEG", {"quality": 95}, "JPEG", True),
    "0/255 JPEG": (m * 255, "JPEG", {}, "JPEG", False),
    "0/1 lossy WebP": (m, "WEBP", {"quality": 80}, "lossy WebP", True),
    "0/255 lossy WebP": (m * 255, "WEBP", {"quality": 80}, "lossy WebP", False),
    "0/1 TIFF with JPEG compression": (m, "TIFF", {"compression": "jpeg"}, "TIFF with JPEG compression", True),
    "0/1 lossless WebP": (m, "WEBP", {"lossless": True}, None, False),
    "0/1 PNG": (m, "PNG", {}, None, False),
    "0/1 TIFF (deflate)": (m, "TIFF", {"compression": "tiff_deflate"}, None, False),
}


@pytest.mark.parametrize("case", list(LOSSY_CASES))
def test_lossy_masks_with_too_little_contrast_are_marked(tmp_path: Path, case: str) -> None:
    """Decided by the file's content, not its suffix: every file here is named .png."""
    values, fmt, options, lossy, damaged = LOSSY_CASES[case]
    path = tmp_path / "mask.png"
    Image.fromarray(values).save(path, fmt, **options)
    read = read_mask_file(path)
    assert (read.lossy, read.compression_damaged) == (lossy, damaged)
    if lossy is None:  # lossless: every pixel as drawn
        assert np.array_equal(read.mask, MASK)
    elif damaged:  # why they are flagged: the defect pixels did not survive
        assert int(read.mask.sum()) < N_DEFECT


def test_decode_masks_names_lossy_masks_and_says_to_save_png(tmp_path: Path) -> None:
    Image.fromarray(m).save(tmp_path / "a_mask.jpg")  # 0/1 JPEG: damaged
    Image.fromarray(m * 255).save(tmp_path / "b_mask.jpg")  # 0/255 JPEG: survives
    Image.fromarray(m).save(tmp_path / "c_mask.png")  # 0/1 PNG: lossless
    samples = [Sample(tmp_path / f"{s}.png", 1, "dot", tmp_path / f"{s}_mask.{x}") for s, x in
               (("a", "jpg"), ("b", "jpg"), ("c", "png"))]
    _, report = decode_masks(samples, 16)
    assert report.lossy_masks == (str(tmp_path / "a_mask.jpg"),) and report.lossy_formats == ("JPEG",)
    assert report.to_dict()["lossy_masks"] == [str(tmp_path / "a_mask.jpg")]
    note = report.note()
    assert "1 of 3 defect masks are saved in a lossy format (JPEG)" in note
    assert str(tmp_path / "a_mask.jpg") in note and "b_mask" not in note and "Save masks as PNG" in note


@pytest.mark.parametrize(("make", "expected"), [
    (lambda: Image.fromarray(np.zeros((H, W), np.uint8)), 0),
    (lambda: Image.fromarray(np.ones((H, W), np.uint8)), H * W),  # a 0/1 mask of a wholly defective part
    (lambda: Image.fromarray(np.full((H, W), 65535, np.uint16)), H * W),
    (lambda: Image.fromarray(_stack(255, 255, 255, 0)), 0),  # white but fully transparent
    (lambda: Image.fromarray(_stack(0, 255)), 0),  # opaque black
], ids=["all-0", "all-1", "all-65535", "transparent-white", "opaque-black"])
def test_single_valued_mask_is_empty_only_when_zero_or_transparent(tmp_path: Path, make, expected: int) -> None:
    make().save(tmp_path / "mask.png")
    assert int(read_mask(tmp_path / "mask.png").sum()) == expected


# --- the metric resolution -------------------------------------------------------------

def test_one_pixel_line_in_512_survives_at_64() -> None:
    mask = np.zeros((512, 512), dtype=bool)
    mask[101, :] = True  # nearest-exact samples rows 4, 12, ..., 100, 108: it would miss row 101
    mask[300, 203] = True  # a 1-px dot
    resized = resize_mask(mask, 64).numpy()
    expected = np.zeros((64, 64), dtype=bool)
    expected[101 // 8, :] = True  # target row i covers source rows 8i .. 8i+7
    expected[300 // 8, 203 // 8] = True
    assert np.array_equal(resized, expected)


def test_non_integer_ratio_keeps_a_dot_in_the_one_footprint_holding_it() -> None:
    mask = np.zeros((500, 500), dtype=bool)
    mask[250, 0] = True
    # footprint of target i: rows floor(i * 500/64) .. ceil((i+1) * 500/64) - 1; row 250 lies in i = 32 only
    resized = resize_mask(mask, 64).numpy()
    assert list(zip(*np.nonzero(resized), strict=True)) == [(32, 0)]


def _mask_file(path: Path, pixels: list[tuple[int, int]], size: int = 512) -> Path:
    mask = np.zeros((size, size), np.uint8)
    for row, col in pixels:
        mask[row, col] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)
    return path


def test_decode_masks_reports_empty_masks_and_merged_regions(tmp_path: Path) -> None:
    samples = [
        Sample(tmp_path / "a.png", 1, "dot", _mask_file(tmp_path / "a_mask.png", [(101, 203), (101, 205)])),
        Sample(tmp_path / "b.png", 1, "dot", _mask_file(tmp_path / "b_mask.png", [(9, 9)])),
        Sample(tmp_path / "c.png", 1, "dot", _mask_file(tmp_path / "c_mask.png", [])),
        Sample(tmp_path / "d.png", 0, "good", None),
    ]
    masks, report = decode_masks(samples, 64)
    # a: columns 203 and 205 share target column 25, so its two dots become one pixel
    assert [int(mask.sum()) for mask in masks] == [1, 1, 0, 0]
    assert (report.n_masks, report.regions, report.regions_at_size) == (3, 3, 2)
    assert report.empty_masks == (str(tmp_path / "c_mask.png"),)
    note = report.note()
    assert "1 of 3 defect masks are empty" in note and "c_mask.png" in note
    assert "1 of 3 defect regions merged" in note and "64 px" in note


def _one_pixel_category(root: Path, dots: dict[str, tuple[int, int] | None]) -> Path:
    """512-px images; each defective image's mask is one dot (or empty for None)."""
    folder = root / "dots"
    rng = np.random.default_rng(0)
    for index in range(3):
        Image.fromarray(rng.integers(100, 140, (512, 512, 3), dtype=np.uint8)).save(_parent(folder / "train" / "good" / f"{index}.png"))
    Image.fromarray(rng.integers(100, 140, (512, 512, 3), dtype=np.uint8)).save(_parent(folder / "test" / "good" / "0.png"))
    for stem, dot in dots.items():
        image = rng.integers(100, 140, (512, 512, 3), dtype=np.uint8)
        if dot is not None:
            image[dot] = 255
        Image.fromarray(image).save(_parent(folder / "test" / "speck" / f"{stem}.png"))
        _mask_file(folder / "ground_truth" / "speck" / f"{stem}_mask.png", [dot] if dot else [])
    return root


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_only_one_pixel_defects_still_give_pixel_metrics(trained_run: Path, tmp_path: Path) -> None:
    """64-px metric resolution; dots at rows/columns 8i+1, which nearest-neighbour resizing skips."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    root = _one_pixel_category(tmp_path / "data", {"0": (101, 201), "1": (301, 41)})
    result = test_run(run, root, "dots")
    assert result["ground_truth"] == {"size": 64, "n_masks": 2, "empty_masks": [], "regions": 2, "regions_at_size": 2,
                                      "lossy_masks": []}
    assert "note" not in result
    for view in ("stpm", "recon", "fused"):
        assert result[view]["pixel_auroc"] is not None and result[view]["aupro"] is not None


def test_jpeg_masks_holding_0_and_1_are_flagged_in_metrics_json_and_on_the_console(
        trained_run: Path, synthetic_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The synthetic category's masks re-saved as 0/1 JPEG (their PNGs removed): each is named."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    root = tmp_path / "data"
    truth = shutil.copytree(synthetic_root / "synth_texture", root / "synth_texture") / "ground_truth"
    jpegs = []
    for png in sorted(truth.rglob("*_mask.png")):
        jpegs.append(png.with_suffix(".jpg"))
        Image.fromarray((np.asarray(Image.open(png).convert("L")) > 127).astype(np.uint8)).save(jpegs[-1])
        png.unlink()
    assert len(jpegs) == 9  # 3 defect types x 3 images (conftest)
    test_run(run, root, "synth_texture")
    written = strict_json((run / "metrics.json").read_text())
    assert written["ground_truth"]["lossy_masks"] == [str(p) for p in jpegs]
    assert "9 of 9 defect masks are saved in a lossy format (JPEG)" in written["note"]
    assert "Save masks as PNG" in written["note"] and str(jpegs[0]) in written["note"]
    print_metrics(written)
    console = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "9 of 9 defect masks are saved in a lossy format (JPEG)" in console and "Save masks as PNG" in console


def test_all_masks_empty_explains_null_pixel_metrics(trained_run: Path, tmp_path: Path) -> None:
    run = shutil.copytree(trained_run, tmp_path / "run")
    root = _one_pixel_category(tmp_path / "data", {"0": None})
    result = test_run(run, root, "dots")
    assert result["fused"]["pixel_auroc"] is None
    assert "1 of 1 defect masks are empty" in result["note"] and "pixel AUROC and AUPRO are null" in result["note"]


# --- the mean row --------------------------------------------------------------------------

def _result(image: float, pixel: float | None, pro: float | None) -> dict:
    figures = {"image_auroc": image, "pixel_auroc": pixel, "aupro": pro, "image_f1_max": 0.5}
    return {view: figures for view in ("stpm", "recon", "fused")}


def test_mean_row_is_null_unless_every_category_has_the_metric() -> None:
    table = metrics_table({"a": _result(0.8, 0.9, 0.6), "b": _result(0.6, None, None)})
    mean = table[(table["category"] == "mean") & (table["model"] == "fused")].iloc[0]
    assert mean["image_auroc"] == pytest.approx(0.7)
    assert pd.isna(mean["pixel_auroc"]) and pd.isna(mean["aupro"])
    both = metrics_table({"a": _result(0.8, 0.9, 0.6), "b": _result(0.6, 0.7, 0.4)})
    mean = both[(both["category"] == "mean") & (both["model"] == "stpm")].iloc[0]
    assert (mean["pixel_auroc"], mean["aupro"]) == (pytest.approx(0.8), pytest.approx(0.5))


def test_mean_is_null_for_a_model_missing_from_a_category() -> None:
    table = pd.DataFrame([
        {"category": "a", "model": "fused", "x": 0.2},
        {"category": "b", "model": "fused", "x": 0.4},
        {"category": "a", "model": "oracle", "x": 0.9},  # b has no oracle row
    ])
    means = category_means(table, ["x"]).set_index("model")["x"]
    assert means["fused"] == pytest.approx(0.3) and pd.isna(means["oracle"])
