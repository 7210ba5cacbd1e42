"""Reading images, masks and the MVTec AD layout; resizing to tensors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dualstpm.data import (Category, decode_images, decode_masks, image_size_of, load_category,
                           read_image, read_mask, resize_image, resize_mask, split_train_val)
from dualstpm.errors import DataError

GRAY = np.array([[0, 51], [102, 255]], dtype=np.uint8)


def _save(path: Path, image: Image.Image, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def _png(path: Path, pixels: np.ndarray, mode: str | None = None) -> Path:
    image = Image.fromarray(pixels)
    return _save(path, image.convert(mode) if mode else image)


# --- images ---------------------------------------------------------------------------

def test_gray_png_becomes_three_equal_channels(tmp_path: Path) -> None:
    image = read_image(_png(tmp_path / "g.png", GRAY))
    assert image.shape == (2, 2, 3) and image.dtype == np.float32
    np.testing.assert_allclose(image[..., 0], GRAY / 255.0, atol=1e-6)
    assert np.array_equal(image[..., 0], image[..., 2])


def test_rgb_and_rgba_png(tmp_path: Path) -> None:
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0] = (255, 0, 51)
    np.testing.assert_allclose(read_image(_png(tmp_path / "c.png", rgb))[0, 0], [1.0, 0.0, 0.2], atol=1e-6)
    rgba = np.dstack([rgb, np.full((2, 3), 7, np.uint8)])  # nearly transparent: alpha is dropped
    np.testing.assert_allclose(read_image(_png(tmp_path / "a.png", rgba)), read_image(tmp_path / "c.png"))


def test_palette_and_gray_alpha_png(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (255, 0, 0)
    palette = Image.fromarray(rgb).quantize(colors=2)
    assert palette.mode == "P"
    np.testing.assert_allclose(read_image(_save(tmp_path / "p.png", palette))[0, 0], [1, 0, 0])
    gray_alpha = Image.fromarray(GRAY).convert("LA")
    np.testing.assert_allclose(read_image(_save(tmp_path / "la.png", gray_alpha))[..., 1], GRAY / 255.0,
                               atol=1e-6)


def test_sixteen_bit_png_is_scaled_by_65535(tmp_path: Path) -> None:
    pixels = np.array([[0, 65535], [32768, 1000]], dtype=np.uint16)
    path = _png(tmp_path / "16.png", pixels)
    assert Image.open(path).mode.startswith("I")
    image = read_image(path)
    np.testing.assert_allclose(image[..., 0], pixels / 65535.0, atol=1e-6)
    assert image[0, 1, 1] == 1.0


def test_big_endian_sixteen_bit_and_int32_modes(tmp_path: Path) -> None:
    big = Image.frombytes("I;16B", (2, 1), np.array([0, 65535], ">u2").tobytes())
    np.testing.assert_allclose(read_image(_save(tmp_path / "b.tif", big))[0, :, 0], [0, 1])
    int32 = Image.fromarray(np.array([[0, 65535]], np.int32))
    assert int32.mode == "I"
    np.testing.assert_allclose(read_image(_save(tmp_path / "i.tif", int32))[0, :, 0], [0, 1])


def test_jpeg_and_uppercase_suffix(tmp_path: Path) -> None:
    flat = np.full((8, 8, 3), 200, np.uint8)
    image = read_image(_save(tmp_path / "x.JPG", Image.fromarray(flat), quality=95))
    np.testing.assert_allclose(image, 200 / 255.0, atol=3 / 255.0)


def test_float_image_out_of_range_is_refused(tmp_path: Path) -> None:
    path = _save(tmp_path / "f.tif", Image.fromarray(np.array([[0.0, 3.5]], np.float32)))
    with pytest.raises(DataError, match="8- or 16-bit"):
        read_image(path)


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    path = _png(tmp_path / "cut.png", noise)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as caught:
        read_image(path)
    assert str(path.absolute()) in str(caught.value) and "Replace or remove" in str(caught.value)


def test_not_an_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("not a picture")
    for reader in (read_image, read_mask, image_size_of):
        with pytest.raises(DataError, match="cannot read image .*notes.png"):
            reader(path)


# --- masks ----------------------------------------------------------------------------

@pytest.mark.parametrize(("pixels", "expected"), [
    (np.array([[0, 255], [0, 255]], np.uint8), [[False, True], [False, True]]),
    (np.array([[0, 1], [1, 0]], np.uint8), [[False, True], [True, False]]),
    (np.array([[3, 250], [128, 126]], np.uint8), [[False, True], [True, False]]),  # split at (3 + 250) / 2 = 126.5
    (np.array([[0, 65535], [40000, 30000]], np.uint16), [[False, True], [True, False]]),
    (np.array([[0, 1], [0, 0]], np.uint16), [[False, True], [False, False]]),
    (np.zeros((2, 2), np.uint8), [[False, False], [False, False]]),
], ids=["0-255", "0-1", "off-white", "16-bit", "16-bit-0-1", "empty"])
def test_mask_threshold_is_halfway_between_the_values_present(tmp_path: Path, pixels: np.ndarray, expected: list) -> None:
    mask = read_mask(_png(tmp_path / "m.png", pixels))
    assert mask.dtype == bool
    assert mask.tolist() == expected


def test_rgb_mask_counts_any_bright_channel(tmp_path: Path) -> None:
    rgb = np.zeros((1, 3, 3), np.uint8)
    rgb[0, 1] = (255, 255, 255)
    rgb[0, 2] = (255, 0, 0)
    assert read_mask(_png(tmp_path / "m.png", rgb)).tolist() == [[False, True, True]]


def test_image_size_of_reads_header(tmp_path: Path) -> None:
    assert image_size_of(_png(tmp_path / "w.png", np.zeros((5, 7), np.uint8))) == (7, 5)


# --- tensors --------------------------------------------------------------------------

def test_resize_image_and_mask() -> None:
    image = np.random.default_rng(0).random((30, 50, 3), dtype=np.float32)
    tensor = resize_image(image, 16)
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    mask = np.zeros((30, 50), bool)
    mask[:, 25:] = True
    resized = resize_mask(mask, 10)
    assert resized.dtype == torch.bool and resized.shape == (10, 10)
    assert resized[:, 5:].all() and not resized[:, :5].any()


# --- layout ---------------------------------------------------------------------------

def _category(root: Path, name: str = "part", *, masks: bool = True, n_train: int = 3) -> Path:
    """A tiny valid category: 8x6 images, one defect type with masks."""
    folder = root / name
    image = np.full((6, 8), 90, np.uint8)
    for index in range(n_train):
        _png(folder / "train" / "good" / f"{index:03d}.png", image)
    _png(folder / "test" / "good" / "000.png", image)
    for stem in ("000", "001"):
        _png(folder / "test" / "crack" / f"{stem}.png", image)
        if masks:
            _png(folder / "ground_truth" / "crack" / f"{stem}_mask.png", np.full((6, 8), 255, np.uint8))
    return folder


def test_load_category_pairs_masks_and_ignores_clutter(tmp_path: Path) -> None:
    folder = _category(tmp_path)
    (folder / "train" / "good" / ".DS_Store").write_text("x")
    (folder / "train" / "good" / "readme.txt").write_text("x")
    (folder / "test" / ".hidden").mkdir()
    category = load_category(tmp_path, "part")
    assert isinstance(category, Category)
    assert [p.name for p in category.train] == ["000.png", "001.png", "002.png"]
    assert category.validation is None and category.has_ground_truth
    assert category.defect_types == ("crack",)
    assert [(s.defect_type, s.path.name, s.label) for s in category.test] == [
        ("crack", "000.png", 1), ("crack", "001.png", 1), ("good", "000.png", 0)]
    assert category.test[0].mask_path == folder / "ground_truth" / "crack" / "000_mask.png"
    assert category.test[2].mask_path is None


def test_mask_named_like_the_image_is_accepted(tmp_path: Path) -> None:
    folder = _category(tmp_path)
    (folder / "ground_truth" / "crack" / "001_mask.png").rename(folder / "ground_truth" / "crack" / "001.png")
    assert load_category(tmp_path, "part").test[1].mask_path == folder / "ground_truth" / "crack" / "001.png"


def test_defect_image_without_mask_names_expected_mask(tmp_path: Path) -> None:
    folder = _category(tmp_path)
    (folder / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError) as caught:
        load_category(tmp_path, "part")
    message = str(caught.value)
    assert str((folder / "test" / "crack" / "001.png").absolute()) in message
    assert str((folder / "ground_truth" / "crack" / "001_mask.png").absolute()) in message


def test_mask_of_another_size_names_both_files(tmp_path: Path) -> None:
    folder = _category(tmp_path)
    mask = _png(folder / "ground_truth" / "crack" / "000_mask.png", np.zeros((3, 4), np.uint8))
    with pytest.raises(DataError) as caught:
        load_category(tmp_path, "part")
    message = str(caught.value)
    assert str(mask.absolute()) in message and str((folder / "test" / "crack" / "000.png").absolute()) in message
    assert "4x3" in message and "8x6" in message


def test_empty_category_and_missing_test(tmp_path: Path) -> None:
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(DataError, match="no training images in .*empty"):
        load_category(tmp_path, "empty")
    folder = _category(tmp_path)
    shutil.rmtree(folder / "test")
    with pytest.raises(DataError, match="no test images"):
        load_category(tmp_path, "part")


def test_missing_category_lists_existing_ones(tmp_path: Path) -> None:
    _category(tmp_path, "bolt")
    _category(tmp_path, "nut")
    with pytest.raises(DataError) as caught:
        load_category(tmp_path, "screw")
    assert "bolt, nut" in str(caught.value) and str((tmp_path / "screw").absolute()) in str(caught.value)
    with pytest.raises(DataError, match="does not exist"):
        load_category(tmp_path / "nowhere", "screw")


def test_category_without_ground_truth_is_image_level(tmp_path: Path) -> None:
    _category(tmp_path, masks=False)
    category = load_category(tmp_path, "part")
    assert not category.has_ground_truth
    assert all(sample.mask_path is None for sample in category.test)
    masks, report = decode_masks(category.test, 4)
    assert masks.shape == (3, 4, 4) and masks.dtype == torch.bool and not masks.any()
    assert (report.n_masks, report.regions, report.note()) == (0, 0, None)


def test_validation_folder_is_used_when_present(tmp_path: Path) -> None:
    folder = _category(tmp_path)
    _png(folder / "validation" / "good" / "v.png", np.zeros((6, 8), np.uint8))
    category = load_category(tmp_path, "part")
    train, validation = split_train_val(category, 0.2, seed=0)
    assert train == list(category.train) and [p.name for p in validation] == ["v.png"]


def test_split_is_seeded_and_ignores_listing_order(tmp_path: Path) -> None:
    category = load_category(_category(tmp_path, n_train=20).parent, "part")
    train, validation = split_train_val(category, 0.2, seed=0)
    assert len(validation) == 4 and len(train) == 16 and not set(train) & set(validation)
    reversed_category = Category(category.root, category.name, category.train[::-1], None,
                                 category.test, category.has_ground_truth)
    assert split_train_val(reversed_category, 0.2, seed=0) == (train, validation)
    others = {tuple(split_train_val(category, 0.2, seed=seed)[1]) for seed in range(1, 6)}
    assert others - {tuple(validation)}


def test_split_needs_two_train_images(tmp_path: Path) -> None:
    category = load_category(_category(tmp_path, n_train=1).parent, "part")
    with pytest.raises(DataError, match="at least 2 train/good images"):
        split_train_val(category, 0.2, seed=0)
    two = load_category(_category(tmp_path, "two", n_train=2).parent, "two")
    assert [len(part) for part in split_train_val(two, 0.9, seed=0)] == [1, 1]


def test_decode_images_and_masks(tmp_path: Path) -> None:
    category = load_category(_category(tmp_path).parent, "part")
    images = decode_images(category.train, 4)
    assert images.shape == (3, 3, 4, 4) and images.dtype == torch.float32
    torch.testing.assert_close(images, torch.full_like(images, 90 / 255))
    assert decode_images([], 4).shape == (0, 3, 4, 4)
    masks, report = decode_masks(category.test, 4)
    assert masks[:2].all() and not masks[2].any()
    # two all-white 8x6 masks: one region each, whole-image defects (single value 255 = all defect)
    assert (report.n_masks, report.empty_masks, report.regions, report.regions_at_size) == (2, (), 2, 2)


# --- the shared real datasets ---------------------------------------------------------

@pytest.mark.real_data
@pytest.mark.parametrize(("name", "n_train", "n_test", "types"), [
    ("magnetic_tile", 762, 582, ("blowhole", "break", "crack", "fray", "uneven")),
    ("battery_weld", 37, 128, ("defective",)),
])
def test_shared_datasets_read_unchanged(shared_data: Path, name: str, n_train: int, n_test: int,
                                        types: tuple[str, ...]) -> None:
    category = load_category(shared_data, name)
    assert (len(category.train), len(category.test), category.defect_types) == (n_train, n_test, types)
    assert category.has_ground_truth and category.validation is None
    for sample in category.test:
        assert (sample.mask_path is None) == (sample.label == 0)
        if sample.mask_path is not None:
            assert sample.mask_path.name == f"{sample.path.stem}_mask.png"
    defective = next(s for s in category.test if s.label == 1)
    assert read_mask(defective.mask_path).any()
    assert read_image(defective.path).shape[:2] == read_mask(defective.mask_path).shape


def test_the_data_package_exports_every_lazily_imported_name_once():
    import dualstpm.data as data

    lazy = [name for names in data._MODULES.values() for name in names]
    assert sorted(data.__all__) == sorted(lazy) and len(set(data.__all__)) == len(data.__all__)
