"""The data layer: reading images and masks, the MVTec AD layout, tensors, synthetic
data for tests and the demo, and the MVTec AD downloader."""

from dualstpm.data.download import MVTEC_CATEGORIES, extract_categories, fetch, prepare_mvtec, sha256_of
from dualstpm.data.images import IMAGE_SUFFIXES, image_size_of, list_images, read_image, read_mask
from dualstpm.data.mvtec import MIN_SPLIT_IMAGES, Category, Sample, ValidationParts, load_category, split_train_val, validation_parts
from dualstpm.data.synthetic import SYNTHETIC_KINDS, make_synthetic_category
from dualstpm.data.tensors import GroundTruthReport, decode_images, decode_masks, resize_image, resize_mask

__all__ = [
    "IMAGE_SUFFIXES",
    "MVTEC_CATEGORIES",
    "SYNTHETIC_KINDS",
    "Category",
    "GroundTruthReport",
    "Sample",
    "decode_images",
    "decode_masks",
    "extract_categories",
    "fetch",
    "image_size_of",
    "list_images",
    "load_category",
    "make_synthetic_category",
    "prepare_mvtec",
    "read_image",
    "read_mask",
    "resize_image",
    "resize_mask",
    "sha256_of",
    "split_train_val",
    "validation_parts",
    "ValidationParts",
    "MIN_SPLIT_IMAGES",
]
