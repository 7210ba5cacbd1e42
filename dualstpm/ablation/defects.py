"""Synthetic defects with exact masks, pasted on normal validation images.

The ablation must choose a fusion without looking at the test split, yet a choice
needs defective examples. These are made from the validation images themselves:

- `cutpaste` (Li et al., CutPaste, CVPR 2021): a rectangle of 2-15 % of the image,
  aspect ratio 0.3-3.3, cut from a random validation image, possibly flipped,
  made 15-40 % darker or brighter, and pasted at a random place;
- `scratch`: the thin bright or dark polyline of the synthetic categories;
- `texture` (after DRAEM, Zavrtanik et al., ICCV 2021): a smooth random blob of 2-15 %
  of the image (a bicubically upsampled coarse Gaussian field above its quantile) in which
  a smooth random colour texture is blended in with opacity 0.3-0.8.

Everything is seeded per (seed, image, copy), so the same params give the same set.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dualstpm.data.synthetic import paint_scratch

KINDS = ("cutpaste", "scratch", "texture")


def _cutpaste(images: Tensor, index: int, rng: np.random.Generator) -> tuple[Tensor, np.ndarray]:
    target = images[index].clone()
    height, width = target.shape[-2:]
    area = rng.uniform(0.02, 0.15) * height * width
    ratio = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
    h = int(np.clip(round(math.sqrt(area * ratio)), 2, height - 1))
    w = int(np.clip(round(math.sqrt(area / ratio)), 2, width - 1))
    source = images[int(rng.integers(len(images)))]
    sy, sx, ty, tx = (int(rng.integers(0, side - extent + 1))
                      for side, extent in ((height, h), (width, w), (height, h), (width, w)))
    patch = source[:, sy : sy + h, sx : sx + w]
    if rng.uniform() < 0.5:
        patch = patch.flip(-1)
    if rng.uniform() < 0.5:
        patch = patch.flip(-2)
    factor = rng.uniform(0.6, 0.85) if rng.uniform() < 0.5 else rng.uniform(1.15, 1.4)
    target[:, ty : ty + h, tx : tx + w] = (patch * factor).clamp(0, 1)
    mask = np.zeros((height, width), dtype=bool)
    mask[ty : ty + h, tx : tx + w] = True
    return target, mask


def _scratch(images: Tensor, index: int, rng: np.random.Generator) -> tuple[Tensor, np.ndarray]:
    painted, mask = paint_scratch(images[index].permute(1, 2, 0).numpy(), rng)
    return torch.from_numpy(painted).permute(2, 0, 1).float(), mask


def _smooth_field(rng: np.random.Generator, channels: int, cells: int, size: tuple[int, int]) -> Tensor:
    """(channels, H, W) Gaussian noise on a cells x cells grid, upsampled bicubically to `size` (H, W)."""
    coarse = torch.from_numpy(rng.standard_normal((1, channels, cells, cells))).float()
    return F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)[0]


def _texture(images: Tensor, index: int, rng: np.random.Generator) -> tuple[Tensor, np.ndarray]:
    target = images[index].clone()
    size = tuple(target.shape[-2:])
    field = _smooth_field(rng, 1, int(rng.integers(3, 7)), size)[0]
    area = rng.uniform(0.02, 0.15)
    mask = field > torch.quantile(field.flatten(), 1 - area)
    texture = _smooth_field(rng, 3, int(rng.integers(8, 33)), size)
    texture = (texture - texture.amin()) / (texture.amax() - texture.amin()).clamp_min(1e-6)
    opacity = rng.uniform(0.3, 0.8)
    target = torch.where(mask[None], (1 - opacity) * target + opacity * texture, target)
    return target, mask.numpy()


_PAINTERS = {"cutpaste": _cutpaste, "scratch": _scratch, "texture": _texture}


def paste_defects(images: Tensor, kinds: list[str], per_image: int, seed: int) -> tuple[Tensor, np.ndarray, list[str]]:
    """(N, 3, H, W) normal images in [0, 1] -> `per_image` defective copies of each:
    images (N * per_image, 3, H, W), masks (N * per_image, H, W) bool and their kinds.

    Kinds alternate over the copies, so every kind is equally represented.
    """
    out_images, out_masks, out_kinds = [], [], []
    for index in range(len(images)):
        for copy in range(per_image):
            kind = kinds[(index * per_image + copy) % len(kinds)]
            rng = np.random.default_rng([seed, index, copy])
            image, mask = _PAINTERS[kind](images, index, rng)
            out_images.append(image)
            out_masks.append(mask)
            out_kinds.append(kind)
    return torch.stack(out_images), np.stack(out_masks), out_kinds
