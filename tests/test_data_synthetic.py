"""The synthetic category: layout, exact masks, determinism, and the overwrite guard."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualstpm.data import SYNTHETIC_KINDS, load_category, make_synthetic_category, read_image, read_mask
from dualstpm.data.synthetic import DEFECT_TYPES
from dualstpm.errors import DataError

SMALL = {"image_size": 48, "n_train": 4, "n_test_good": 2, "n_per_defect": 2}


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["synth_texture", "synth_object"])
def test_fixture_categories_load(synthetic_root: Path, name: str) -> None:
    category = load_category(synthetic_root, name)
    assert len(category.train) == 20
    assert category.defect_types == tuple(sorted(DEFECT_TYPES))
    assert [s.defect_type for s in category.test].count("good") == 6
    assert len(category.test) == 6 + 3 * 3 and category.has_ground_truth


@pytest.mark.parametrize("name", ["synth_texture", "synth_object"])
def test_files_and_masks(synthetic_root: Path, name: str) -> None:
    category = load_category(synthetic_root, name)
    for sample in category.test:
        with Image.open(sample.path) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (64, 64))
        if sample.mask_path is None:
            continue
        assert sample.mask_path.name == f"{sample.path.stem}_mask.png"
        with Image.open(sample.mask_path) as mask:
            assert mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert 0 < read_mask(sample.mask_path).mean() < 0.25


def test_defects_change_the_masked_pixels(tmp_path: Path) -> None:
    """The defect sits where its mask says: masked pixels differ from the image's normal look."""
    folder = make_synthetic_category(tmp_path, "c", "object", **SMALL)
    for defect in DEFECT_TYPES:
        image = read_image(folder / "test" / defect / "000.png")
        mask = read_mask(folder / "ground_truth" / defect / "000_mask.png")
        normal = read_image(folder / "train" / "good" / "000.png")
        assert np.abs(image[mask] - normal.mean(axis=(0, 1))).mean() > 0.05


def test_same_arguments_give_identical_files(tmp_path: Path) -> None:
    for kind in SYNTHETIC_KINDS:
        first = make_synthetic_category(tmp_path / "a", kind, kind, seed=3, **SMALL)
        second = make_synthetic_category(tmp_path / "b", kind, kind, seed=3, **SMALL)
        assert _digests(first) == _digests(second)
        other = make_synthetic_category(tmp_path / "c", kind, kind, seed=4, **SMALL)
        assert _digests(first) != _digests(other)


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    folder = make_synthetic_category(tmp_path, "c", **SMALL)
    marker = folder / "keep.txt"
    marker.write_text("mine")
    with pytest.raises(DataError) as caught:
        make_synthetic_category(tmp_path, "c", **SMALL)
    assert str(folder.absolute()) in str(caught.value) and marker.exists()
    make_synthetic_category(tmp_path, "c", overwrite=True, **SMALL)
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp folders left behind


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="texture, object"):
        make_synthetic_category(tmp_path, "c", "fabric")
    with pytest.raises(DataError, match="image_size"):
        make_synthetic_category(tmp_path, "c", image_size=8)
    assert not (tmp_path / "c").exists()


def test_the_defaults_make_the_demo_category(tmp_path: Path) -> None:
    # Defaults: 128 px, 60 train, 12 good test images, 8 per defect type (3 types): 12 + 24 test
    # images, a mask for each of the 24. (Its speed is not asserted: no wall clock on a shared machine.)
    category = load_category(make_synthetic_category(tmp_path, "c").parent, "c")
    assert len(category.train) == 60 and len(category.test) == 12 + 3 * 8
    assert sum(sample.mask_path is not None for sample in category.test) == 3 * 8
    assert read_image(category.train[0]).shape[:2] == (128, 128)
