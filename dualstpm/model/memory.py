"""The memory view: PatchCore's nearest-neighbour distance on T1's own features (issue 22, item 3).

Training-free. It reuses the features the model already computes: T1's pyramid levels at
strides 8 and 16 (Lite0's ``blocks.2`` and ``blocks.4``; a ResNet's ``layer2`` and
``layer3``, the layers PatchCore takes). The method is K. Roth et al., "Towards Total Recall
in Industrial Anomaly Detection", CVPR 2022 (PatchCore), as anomalib implements it:

- **Patch features** (:func:`patch_features`, paper §3.1): each level is averaged over
  3 x 3 neighbourhoods (local aggregation, ``AvgPool2d(3, 1, 1)``). The coarser level is
  upsampled bilinearly to the finer grid, and the levels are concatenated along channels:
  (N, C8 + C16, H/8, W/8).
- **Memory bank** (:func:`greedy_coreset`, paper §3.2 and Algorithm 1): a greedy k-center
  coreset of the good training patches. The selection runs on a seeded Gaussian random
  projection (Johnson-Lindenstrauss); the bank keeps the full features.
- **Map** (:class:`MemoryBank`): each patch's Euclidean distance to its nearest bank entry,
  upsampled bilinearly to the image size and blurred with a Gaussian of `sigma` px (4,
  anomalib's). The image score is the product's own reduction of this map
  (:func:`dualstpm.model.fusion.image_score`), not PatchCore's re-weighted maximum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualstpm.model.fusion import gaussian_blur

#: the T1 pyramid levels (0-based, strides 4, 8, 16) the memory view takes: strides 8 and 16
MEMORY_LEVELS = (1, 2)
#: PatchCore's (anomalib's) blur of the upsampled map, px
MEMORY_SIGMA = 4.0
#: dimensions of the random projection the coreset is selected on (features of more dims are projected)
PROJECTION_DIM = 128
#: query patches per distance chunk (a chunk's distance matrix is CHUNK x bank entries)
CHUNK = 4096


def pixel_moments(maps: Tensor) -> tuple[float, float]:
    """Mean and population std over every pixel of (N, H, W) maps, in float64; a std below
    1e-12 is raised to it, so that a constant map divides safely."""
    values = maps.detach().to(torch.float64)
    return float(values.mean()), max(float(values.std(correction=0)), 1e-12)


@dataclass(frozen=True)
class MemoryStats:
    """Mean and standard deviation over the good calibration pixels of the params' fused map and
    of the memory map: what standardises each before the view `fused_memory` sums them."""

    fused: tuple[float, float]
    memory: tuple[float, float]

    def to_json(self) -> dict[str, list[float]]:
        return {"fused": list(self.fused), "memory": list(self.memory)}

    @classmethod
    def from_json(cls, data: dict[str, list[float]]) -> MemoryStats:
        (fm, fs), (mm, ms) = data["fused"], data["memory"]
        return cls((float(fm), float(fs)), (float(mm), float(ms)))

    @classmethod
    def of_maps(cls, fused: Tensor, memory: Tensor) -> MemoryStats:
        """From (N, H, W) fused and memory maps of good images (:func:`pixel_moments` of each)."""
        return cls(pixel_moments(fused), pixel_moments(memory))

    def combine(self, fused: Tensor, memory: Tensor) -> Tensor:
        """(N, H, W) fused and memory maps -> their standardised sum, (f - mean_f) / std_f + (m - mean_m) / std_m."""
        (fm, fs), (mm, ms) = self.fused, self.memory
        return (fused - fm) / fs + (memory - mm) / ms


def patch_features(levels: Sequence[Tensor]) -> Tensor:
    """T1 levels, finest first, each (N, C_i, h_i, w_i) -> locally aware patch features
    (N, sum C_i, h_0, w_0) float32.

    Each level is averaged over its 3 x 3 neighbourhood (zero padding counted, as
    ``nn.AvgPool2d(3, 1, 1)``, PatchCore §3.1). Coarser levels are upsampled bilinearly
    (``align_corners=False``) to the first level's grid. Raises ValueError without levels.
    """
    if not levels:
        raise ValueError("patch_features needs at least one feature level")
    size = levels[0].shape[-2:]
    pooled = [F.avg_pool2d(level.float(), kernel_size=3, stride=1, padding=1) for level in levels]
    return torch.cat([p if p.shape[-2:] == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
                      for p in pooled], dim=1)


def flatten_patches(features: Tensor) -> Tensor:
    """(N, D, h, w) patch features -> (N * h * w, D), image by image, row-major within an image."""
    return features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])


def nearest_distance(queries: Tensor, bank: Tensor, chunk: int | None = CHUNK) -> Tensor:
    """(M, D) queries, (K, D) bank -> (M,) Euclidean distance of each query to its nearest
    bank row, float32.

    The nearest row is found by |q|^2 - 2 q.b + |b|^2 (one matrix product per chunk of
    `chunk` queries), then its distance is taken directly, |q - b|, so that cancellation in
    the expansion cannot blur small distances (a query in the bank is exactly 0). `chunk`
    None: all queries at once (one graph for any batch size: tracing and export). Raises
    ValueError for an empty bank or mismatched dimensions.
    """
    if bank.ndim != 2 or len(bank) == 0:
        raise ValueError(f"the memory bank must be a non-empty (K, D) matrix, got shape {tuple(bank.shape)}")
    if queries.shape[-1] != bank.shape[-1]:
        raise ValueError(f"queries have {queries.shape[-1]} dimensions, the memory bank {bank.shape[-1]}")
    bank = bank.float()
    bank_sq = (bank * bank).sum(1)

    def nearest(q: Tensor) -> Tensor:
        row = (bank_sq[None] - 2.0 * q @ bank.T).argmin(1)  # |q|^2 is the same for every row
        return (q - bank[row]).norm(dim=1)

    queries = queries.float()
    if chunk is None or len(queries) <= chunk:
        return nearest(queries)
    return torch.cat([nearest(queries[start : start + chunk]) for start in range(0, len(queries), chunk)])


def greedy_coreset(features: Tensor, count: int, *, seed: int = 0, projection_dim: int | None = PROJECTION_DIM) -> Tensor:
    """Indices (count,) int64 of a greedy k-center coreset of `features` (M, D).

    PatchCore's Algorithm 1 (Sener and Savarese, ICLR 2018): start from a seeded random
    point, then repeatedly add the point farthest from everything chosen so far. With
    `projection_dim` below D the distances are taken on a seeded Gaussian projection to that
    many dimensions (PatchCore §3.2); None or >= D uses the features as they are. Raises
    ValueError unless 1 <= count <= M.
    """
    n = len(features)
    if not 1 <= count <= n:
        raise ValueError(f"a coreset of {count} points cannot be drawn from {n} patch features")
    generator = torch.Generator().manual_seed(seed)
    x = features.float()
    if projection_dim is not None and projection_dim < x.shape[1]:
        projection = torch.randn(x.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        x = x @ projection
    chosen = torch.empty(count, dtype=torch.int64)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    nearest = ((x - x[chosen[0]]) ** 2).sum(1)  # squared distance to the closest chosen point
    for i in range(1, count):
        chosen[i] = int(nearest.argmax())
        nearest = torch.minimum(nearest, ((x - x[chosen[i]]) ** 2).sum(1))
    return chosen


def coreset_size(n_patches: int, ratio: float) -> int:
    """Bank entries for `ratio` of `n_patches` (at least 1). Raises ValueError unless 0 < ratio <= 1."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"the coreset ratio must be in (0, 1], got {ratio}")
    return max(1, round(ratio * n_patches))


class MemoryBank(nn.Module):
    """Good patch features (K, D) -> the memory view's anomaly map of new images.

    Args:
        bank: (K, D) patch features of good training images (:meth:`build`).
        sigma: Gaussian blur of the upsampled map, px (0: none).
    """

    def __init__(self, bank: Tensor, sigma: float = MEMORY_SIGMA) -> None:
        super().__init__()
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"the memory bank must be a non-empty (K, D) matrix, got shape {tuple(bank.shape)}")
        self.register_buffer("bank", bank.float().contiguous())
        self.sigma = sigma

    @classmethod
    def build(cls, features: Tensor, ratio: float, *, seed: int = 0, sigma: float = MEMORY_SIGMA) -> MemoryBank:
        """From the patch features of all good training images, (M, D) (:func:`flatten_patches`):
        a coreset of `ratio` of them (:func:`coreset_size`, :func:`greedy_coreset`)."""
        keep = greedy_coreset(features, coreset_size(len(features), ratio), seed=seed)
        return cls(features[keep], sigma)

    def patch_distances(self, features: Tensor, chunked: bool = True) -> Tensor:
        """(N, D, h, w) patch features -> (N, h, w) distance to the nearest bank entry
        (`chunked` False: one graph for any batch size, see :func:`nearest_distance`)."""
        n, _, h, w = features.shape
        return nearest_distance(flatten_patches(features), self.bank, CHUNK if chunked else None).reshape(n, h, w)

    def forward(self, levels: Sequence[Tensor], size: tuple[int, int], chunked: bool = True) -> Tensor:
        """T1's levels at strides 8 and 16 (:data:`MEMORY_LEVELS`) -> (N, H, W) float32 map at `size`."""
        distances = self.patch_distances(patch_features(levels), chunked)[:, None]
        upsampled = F.interpolate(distances, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        return gaussian_blur(upsampled, self.sigma) if self.sigma > 0 else upsampled
