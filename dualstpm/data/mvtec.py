"""The MVTec AD folder layout: one category's file lists, checked before any training.

Layout (METHOD.md section 1)::

    <root>/<category>/train/good/*
    <root>/<category>/validation/good/*          (optional, as in MVTec 3D-AD)
    <root>/<category>/validation/<defect_type>/*  (optional: real defects, validation evidence only)
    <root>/<category>/validation_ground_truth/<defect_type>/<stem>_mask.<suffix>  (optional)
    <root>/<category>/test/<good|defect_type>/*
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.<suffix>

Training needs only ``train/good`` (and ``validation/good`` when there is one): a
category without ``test/`` can be fitted, and testing it says what it needs
(:func:`missing_test_message`). Everything a run will trip over later (an empty folder, a
missing or mis-sized mask) is found here, from file names and image headers only, and
reported as a :class:`DataError` that names the file and the fix.

Real defects in ``validation/<defect_type>/`` (what `dualstpm feedback apply` files there,
or a user's own) are validation evidence: they select the epoch and the ablation's fusion
in place of synthetic defects. They are never training data and never test data:
:func:`load_category` keeps them apart in ``Category.validation_defects`` and no split
draws from them. Each may have a mask (``validation_ground_truth/``, the ``ground_truth``
naming); one without a mask counts for image AUROC only.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dualstpm.data.images import IMAGE_SUFFIXES, image_size_of, is_hidden, list_images
from dualstpm.errors import ConfigError, DataError
from dualstpm.paths import category_dir

GOOD = "good"
MASK_SUFFIX = "_mask"
VALIDATION = "validation"
VALIDATION_GT = "validation_ground_truth"  # masks of the real validation defects, named as in ground_truth/


@dataclass(frozen=True)
class Sample:
    """One test image with its label and, for a defective image, its mask."""

    path: Path
    label: int  # 0 good, 1 defective
    defect_type: str  # "good" or the test sub-folder name
    mask_path: Path | None


@dataclass(frozen=True)
class Category:
    """The checked file lists of one category; paths only, nothing decoded."""

    root: Path
    name: str
    train: tuple[Path, ...]
    validation: tuple[Path, ...] | None
    test: tuple[Sample, ...]
    has_ground_truth: bool
    #: real defective validation images (``validation/<defect_type>/``), sorted by (type, name);
    #: validation evidence only, never in `train`, `validation` or `test`
    validation_defects: tuple[Sample, ...] = ()

    @property
    def defect_types(self) -> tuple[str, ...]:
        """Sorted test sub-folder names other than ``good``."""
        return tuple(sorted({s.defect_type for s in self.test if s.defect_type != GOOD}))


def _images_in(folder: Path) -> tuple[Path, ...]:
    """Image files of a folder sorted by name, so results never depend on listing order."""
    return tuple(list_images(folder))


def _subfolders(folder: Path) -> list[Path]:
    """Visible sub-folders, sorted; none when `folder` is missing."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p.name))


def _train_images(root: Path) -> tuple[Path, ...]:
    folder = root / "train" / GOOD
    images = _images_in(folder)
    if not images:
        raise DataError(
            f"no training images in {folder.absolute()}: put the category's defect-free "
            f"images there (files ending in {', '.join(IMAGE_SUFFIXES)})."
        )
    return images


def _validation_images(root: Path) -> tuple[Path, ...] | None:
    folder = root / VALIDATION / GOOD
    if not folder.is_dir():
        return None
    images = _images_in(folder)
    if not images:
        raise DataError(
            f"{folder.absolute()} exists but holds no images: add defect-free images "
            "there or remove the folder to hold out part of train/good instead."
        )
    return images


def _mask_index(folder: Path) -> dict[str, Path]:
    """Map image stem -> mask file in one ground_truth/<defect_type> folder.

    ``<stem>_mask.<suffix>`` is the MVTec AD naming. ``<stem>.<suffix>`` is accepted
    as a fallback because VisA's official MVTec-style conversion
    (amazon-science/spot-diff ``prepare_data.py``) names masks after the image; when
    both exist the ``_mask`` file wins.
    """
    index: dict[str, Path] = {}
    fallback: dict[str, Path] = {}
    for path in _images_in(folder):
        stem = path.stem
        if stem.endswith(MASK_SUFFIX):
            index.setdefault(stem[: -len(MASK_SUFFIX)], path)
        else:
            fallback.setdefault(stem, path)
    return {**fallback, **index}


def _test_samples(root: Path, ground_truth: Path | None) -> tuple[Sample, ...]:
    """Test images sorted by (defect_type, name); defective ones paired with their mask
    when the category has ground truth."""
    samples: list[Sample] = []
    for folder in _subfolders(root / "test"):
        label = 0 if folder.name == GOOD else 1
        mask_folder = ground_truth / folder.name if label and ground_truth is not None else None
        masks = _mask_index(mask_folder) if mask_folder is not None else {}
        for path in _images_in(folder):
            mask = _require_mask(masks, path, mask_folder) if mask_folder is not None else None
            samples.append(Sample(path, label, folder.name, mask))
    return tuple(samples)


def _require_mask(masks: dict[str, Path], image: Path, mask_folder: Path) -> Path:
    mask = masks.get(image.stem)
    if mask is None:
        expected = mask_folder / f"{image.stem}{MASK_SUFFIX}.png"
        raise DataError(
            f"defective test image {image.absolute()} has no mask: expected "
            f"{expected.absolute()}. Add the mask (white = defect), or move the image out "
            "of test/ (a category without any ground_truth folder is scored per image only)."
        )
    return mask


def _check_mask_sizes(samples: tuple[Sample, ...]) -> None:
    """Compare header sizes: a mis-sized mask would silently misalign pixel metrics."""
    for sample in samples:
        if sample.mask_path is None:
            continue
        image_size, mask_size = image_size_of(sample.path), image_size_of(sample.mask_path)
        if image_size != mask_size:
            raise DataError(
                f"mask {sample.mask_path.absolute()} is {mask_size[0]}x{mask_size[1]} but its "
                f"image {sample.path.absolute()} is {image_size[0]}x{image_size[1]} (width x "
                "height): resize or replace the mask so that it matches the image."
            )


def _validation_defects(root: Path) -> tuple[Sample, ...]:
    """The real defects of ``validation/<defect_type>/`` with their masks, if any, from
    ``validation_ground_truth/<defect_type>/``; empty without such folders. Raises DataError
    for an empty defect folder, a mask without its image, or a mask of another size."""
    masks_root = root / VALIDATION_GT
    samples: list[Sample] = []
    folders = [f for f in _subfolders(root / VALIDATION) if f.name != GOOD]
    for folder in folders:
        images = _images_in(folder)
        if not images:
            raise DataError(
                f"{folder.absolute()} holds no images: put the real defective parts of type {folder.name!r} "
                f"there (files ending in {', '.join(IMAGE_SUFFIXES)}) or remove the folder."
            )
        masks = _mask_index(masks_root / folder.name)
        for image in images:
            samples.append(Sample(image, 1, folder.name, masks.pop(image.stem, None)))
        _refuse_orphan_masks(masks.values(), folder)
    for mask_folder in _subfolders(masks_root):
        if mask_folder.name not in {f.name for f in folders}:
            _refuse_orphan_masks(_images_in(mask_folder), root / VALIDATION / mask_folder.name)
    result = tuple(samples)
    _check_mask_sizes(result)
    return result


def _refuse_orphan_masks(masks: Iterable[Path], image_folder: Path) -> None:
    """DataError naming the first of `masks` (mask files left without an image) when there is
    one: its image would be in `image_folder`."""
    orphans = sorted(masks)
    if orphans:
        mask = orphans[0]
        expected = image_folder / mask.stem.removesuffix(MASK_SUFFIX)
        raise DataError(
            f"mask {mask.absolute()} has no image: expected {expected.absolute()} with an image suffix "
            f"({', '.join(IMAGE_SUFFIXES)}), a real validation defect of type {image_folder.name!r}. Put the "
            "defective image there, or remove the mask."
        )


def validation_evidence(category: Category, default: str) -> str:
    """``real: N images of K defect types`` when the category has real validation defects,
    else `default` (what the caller selects on without them, e.g. ``synthetic``)."""
    defects = category.validation_defects
    if not defects:
        return default
    return real_evidence_label(len(defects), len({s.defect_type for s in defects}))


def real_evidence_label(n_images: int, n_types: int) -> str:
    """``real: N images of K defect types`` (singular where it is one)."""
    return (f"real: {n_images} image{'s' if n_images != 1 else ''} of {n_types} "
            f"defect type{'s' if n_types != 1 else ''}")


def missing_test_message(root: Path) -> str:
    """Why the category folder `root` cannot be tested, and the layout testing needs."""
    root = Path(root).absolute()
    folder = root / "test"
    why = "does not exist" if not folder.is_dir() else "holds no images in sub-folders"
    return (
        f"no test images: {folder} {why}. Testing needs defect-free parts in "
        f"{folder / GOOD}/ and defective ones in {folder}/<defect_type>/ (images ending in "
        f"{', '.join(IMAGE_SUFFIXES)}); for pixel metrics, a mask per defective image in "
        f"{root / 'ground_truth'}/<defect_type>/<name>{MASK_SUFFIX}.png (white = defect). "
        f"Training needs only {root / 'train' / GOOD}/."
    )


def load_category(data_root: Path, category: str, *, require_test: bool = True) -> Category:
    """List and check one category; raise DataError naming the first problem found.

    A category without any ``ground_truth`` folder loads with ``has_ground_truth``
    False (image-level scores only); with one, every defective test image needs a
    mask of its own size. ``test/good`` images never have masks.

    `require_test` False (training, export calibration) accepts a category without test
    images (``test`` is then empty); test images that are there are checked all the same.

    Real defects in ``validation/<defect_type>/`` (``validation_defects``, each with its
    mask from ``validation_ground_truth/`` when there is one) are checked the same way:
    an empty folder, a mask without its image or a mask of another size is a DataError.
    They are in no other list: neither training, nor validation/good, nor test data.
    """
    root = category_dir(Path(data_root), category)
    train = _train_images(root)
    validation = _validation_images(root)
    validation_defects = _validation_defects(root)
    ground_truth = root / "ground_truth"
    has_ground_truth = ground_truth.is_dir()
    test = _test_samples(root, ground_truth if has_ground_truth else None)
    if not test and require_test:
        raise DataError(missing_test_message(root))
    _check_mask_sizes(test)
    return Category(root, category, train, validation, test, has_ground_truth, validation_defects)


def split_train_val(category: Category, val_fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, validation) image lists.

    ``validation/good`` is used as is when the category has it. Otherwise a fixed,
    seeded share of ``train/good`` is held out: the sorted list is shuffled with
    ``random.Random(seed)`` so the split depends only on file names and the seed.
    At least one image is held out and at least one kept for training.
    """
    if category.validation is not None:
        return list(category.train), list(category.validation)
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
    n_images = len(category.train)
    if n_images < 2:
        raise DataError(
            f"{(category.root / 'train' / GOOD).absolute()} holds {n_images} image(s): the "
            "category needs at least 2 train/good images to hold one out for validation "
            "(or add a validation/good folder)."
        )
    n_val = min(max(1, round(val_fraction * n_images)), n_images - 1)
    shuffled = sorted(category.train)
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])

MIN_SPLIT_IMAGES = 4  # each part of the validation split needs at least 2 images


@dataclass(frozen=True)
class ValidationParts:
    """Indices into the validation images: `selection` picks the epoch, `calibration` sets
    the map statistics and thresholds. `note` says why they are not disjoint (else None)."""

    selection: np.ndarray  # int64, ascending
    calibration: np.ndarray  # int64, ascending
    note: str | None = None

    @property
    def disjoint(self) -> bool:
        return not np.intersect1d(self.selection, self.calibration).size

    def to_json(self) -> dict[str, Any]:
        return {"selection_images": len(self.selection), "calibration_images": len(self.calibration),
                "disjoint": self.disjoint}


def validation_parts(n_images: int, split: float, seed: int) -> ValidationParts:
    """Split `n_images` validation images into disjoint selection and calibration parts.

    round(split * n) images (at least 2, leaving at least 2 to select) are drawn for
    calibration by a shuffle seeded with `seed` alone, so the same seed and count give the
    same parts. `split` 0 asks for no split (both parts are all images, noted); fewer than
    MIN_SPLIT_IMAGES images cannot be split: both parts are all images and `note` says so
    and how to fix it (the caller warns; the note is kept in calibration.json).
    """
    everything = np.arange(n_images, dtype=np.int64)
    if split == 0:
        return ValidationParts(everything, everything, "calibration.split=0: the thresholds are calibrated on the "
                               "same validation images that selected the epoch, so false alarms may exceed the target")
    if n_images < MIN_SPLIT_IMAGES:
        return ValidationParts(everything, everything, (
            f"only {n_images} validation image(s): calibration.split={split:g} needs at least {MIN_SPLIT_IMAGES} "
            "to hold out a calibration part, so the thresholds are calibrated on the images that selected the "
            "epoch and false alarms may exceed the target. Add good images (validation/good, or more train/good "
            "with a larger fit.val_fraction), or pass --set calibration.split=0 to accept this knowingly"))
    n_calibration = min(max(2, round(split * n_images)), n_images - 2)
    order = list(range(n_images))
    random.Random(f"calibration.split {seed}").shuffle(order)
    return ValidationParts(np.sort(np.asarray(order[n_calibration:], dtype=np.int64)),
                           np.sort(np.asarray(order[:n_calibration], dtype=np.int64)))
