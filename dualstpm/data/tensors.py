"""From decoded arrays to fixed-size tensors, and whole file lists decoded once.

Images are resized to a square without cropping (METHOD.md section 1), so that the
whole part stays in view and maps line up with the ground truth at any input size.
Normalisation is not done here: it belongs to the teacher (its own mean and std).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from dualstpm.data.images import read_image, read_mask
from dualstpm.data.mvtec import Sample
from dualstpm.progress import progress_bar

T = TypeVar("T")


def resize_image(image: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 float array -> 3xSxS float32, bilinear with antialiasing (no aliasing
    when shrinking large inspection images, which would add fake texture)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    resized = F.interpolate(tensor[None], size=(size, size), mode="bilinear",
                            antialias=True, align_corners=False)
    return resized[0].contiguous()


def resize_mask(mask: np.ndarray, size: int) -> torch.Tensor:
    """HxW bool -> SxS bool by nearest neighbour, so a mask stays binary.

    Uses torch's "nearest-exact" (pixel-centre aligned, like PIL and scikit-image);
    plain "nearest" shifts masks by up to half a source pixel.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None, None]
    resized = F.interpolate(tensor.float(), size=(size, size), mode="nearest-exact")
    return resized[0, 0] > 0.5


def _stack(items: Sequence[T], decode: Callable[[T], torch.Tensor], shape: tuple[int, ...],
           dtype: torch.dtype, description: str) -> torch.Tensor:
    """Decode every item once into one preallocated tensor (no list of copies)."""
    out = torch.empty((len(items), *shape), dtype=dtype)
    with progress_bar() as progress:
        task = progress.add_task(description, total=len(items))
        for index, item in enumerate(items):
            out[index] = decode(item)
            progress.advance(task)
    return out


def decode_images(paths: Sequence[Path], size: int, description: str = "decoding images") -> torch.Tensor:
    """(N, 3, S, S) float32 in [0, 1] for a list of image files."""
    return _stack(paths, lambda path: resize_image(read_image(path), size),
                  (3, size, size), torch.float32, description)


def _sample_mask(sample: Sample, size: int) -> torch.Tensor:
    if sample.mask_path is None:
        return torch.zeros((size, size), dtype=torch.bool)
    return resize_mask(read_mask(sample.mask_path), size)


def decode_masks(samples: Sequence[Sample], size: int) -> torch.Tensor:
    """(N, S, S) bool ground truth; a sample without a mask (good, or a category
    without ground_truth) is all False."""
    return _stack(samples, lambda sample: _sample_mask(sample, size),
                  (size, size), torch.bool, "decoding masks")
