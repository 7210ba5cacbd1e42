"""The data layer: reading images and masks, the MVTec AD layout, tensors, synthetic
data for tests and the demo, and the MVTec AD downloader.

The names below are imported on first use (PEP 562), so `dualstpm.data.mvtec` (file
lists and layout checks: numpy and PIL only) loads without torch: the CLI checks a data
layout in a fraction of a second, before torch, timm or MLflow load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dualstpm.data.download import MVTEC_CATEGORIES, extract_categories, fetch, prepare_mvtec, sha256_of
    from dualstpm.data.images import IMAGE_SUFFIXES, image_size_of, list_images, read_image, read_mask
    from dualstpm.data.mvtec import (MIN_SPLIT_IMAGES, Category, Sample, ValidationParts, load_category,
                                     missing_test_message, real_evidence_label, split_train_val,
                                     validation_evidence, validation_parts)
    from dualstpm.data.synthetic import SYNTHETIC_KINDS, make_synthetic_category
    from dualstpm.data.tensors import (
        GroundTruthReport, decode_images, decode_masks, image_shapes, resize_image, resize_map, resize_mask,
    )

_MODULES = {
    "download": ("MVTEC_CATEGORIES", "extract_categories", "fetch", "prepare_mvtec", "sha256_of"),
    "images": ("IMAGE_SUFFIXES", "image_size_of", "list_images", "read_image", "read_mask"),
    "mvtec": ("MIN_SPLIT_IMAGES", "Category", "Sample", "ValidationParts", "load_category", "missing_test_message",
              "real_evidence_label", "split_train_val", "validation_evidence", "validation_parts"),
    "synthetic": ("SYNTHETIC_KINDS", "make_synthetic_category"),
    "tensors": ("GroundTruthReport", "decode_images", "decode_masks", "image_shapes", "resize_image", "resize_map",
                "resize_mask"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

__all__ = [  # every name of _MODULES (tests/test_data_reader.py checks the two agree)
    "IMAGE_SUFFIXES", "MIN_SPLIT_IMAGES", "MVTEC_CATEGORIES", "SYNTHETIC_KINDS", "Category", "GroundTruthReport",
    "Sample", "ValidationParts", "decode_images", "decode_masks", "extract_categories", "fetch", "image_shapes",
    "image_size_of",
    "list_images", "load_category", "make_synthetic_category", "missing_test_message", "prepare_mvtec", "read_image",
    "read_mask", "real_evidence_label", "resize_image", "resize_map", "resize_mask", "sha256_of", "split_train_val",
    "validation_evidence", "validation_parts",
]


def __getattr__(name: str) -> Any:
    """`dualstpm.data.<name>`: imported from its module on first use, then cached here."""
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOME])
