"""Six maps, one answer (METHOD.md §4): normalisation, fusion, smoothing, image score.

Pure tensor functions so that the model, the evaluation and the fusion-weight ablation
re-score maps the same way. Maps arrive as a tensor of shape (B, 2, 3, H, W): branch
(A = STPM, B = reconstruction) by pyramid level (strides 4, 8, 16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

BRANCHES = ("stpm", "recon")
VIEWS = ("fused", "stpm", "recon")
#: the discriminative stage's view (METHOD.md §5b): only models fitted with fit.discriminator have it
DISC_VIEW = "disc"
#: the memory view (`dualstpm.model.memory`) and its sum with `fused`: only models fitted with memory.enabled have them
MEMORY_VIEW = "memory"
FUSED_MEMORY_VIEW = "fused_memory"
MEMORY_VIEWS = (MEMORY_VIEW, FUSED_MEMORY_VIEW)


@dataclass(frozen=True)
class FusionSpec:
    """How six maps become one: the `fusion.*` params plus the validation statistics."""

    mode: str = "product"  # product | sum | product_all (`config.FusionMode`, validated there): see `fuse`
    weights: tuple[tuple[float, ...], ...] = ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0))
    normalize: Literal["none", "val_stats"] = "none"
    sigma: float = 0.0

    @classmethod
    def from_params(cls, params) -> FusionSpec:
        """From `params.fusion` (a `dualstpm.config.FusionParams`, validated there), or anything
        with its `mode`, `weights` (2x3), `normalize` and `sigma`."""
        return cls(params.mode, tuple(tuple(row) for row in params.weights), params.normalize, params.sigma)

    def view(self, name: str) -> FusionSpec:
        """The spec of one view: `fused` as is, or one branch alone (the other's weights zeroed)."""
        if name == "fused":
            return self
        keep = BRANCHES.index(name)
        weights = tuple(row if b == keep else (0.0, 0.0, 0.0) for b, row in enumerate(self.weights))
        if not any(w > 0 for w in weights[keep]):
            weights = tuple(row if b != keep else (1.0, 1.0, 1.0) for b, row in enumerate(weights))
        return replace(self, weights=weights)


@dataclass(frozen=True)
class MapStats:
    """Per-map mean and std over all validation pixels, shape (2, 3) each."""

    mean: Tensor
    std: Tensor

    def to_json(self) -> dict[str, list[list[float]]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, list[list[float]]]) -> MapStats:
        return cls(torch.tensor(data["mean"], dtype=torch.float32), torch.tensor(data["std"], dtype=torch.float32))


def normalize_maps(maps: Tensor, spec: FusionSpec, stats: MapStats | None) -> Tensor:
    """Put the six maps on a common scale using validation statistics.

    In `sum` mode each map is standardised, (m - mean) / std. In the product modes a shift
    would make factors negative and the product meaningless, so each map is only divided
    by its validation mean: 1.0 then means "as different as a typical normal pixel".
    """
    if spec.normalize == "none":
        return maps
    if stats is None:
        raise ValueError("fusion.normalize=val_stats needs validation statistics")
    mean = stats.mean.to(maps.device, maps.dtype)[None, :, :, None, None]
    std = stats.std.to(maps.device, maps.dtype)[None, :, :, None, None]
    if spec.mode == "sum":
        return (maps - mean) / std
    return maps / mean.clamp_min(1e-12)


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian smoothing of (B, H, W) maps with a kernel of radius 4 sigma."""
    radius = max(1, math.ceil(4 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    out = maps[:, None]
    out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return out[:, 0]


def fuse(maps: Tensor, spec: FusionSpec, stats: MapStats | None = None) -> Tensor:
    """(B, 2, 3, H, W) -> (B, H, W).

    product: M = prod_l (w_A,l * m_A,l + w_B,l * m_B,l) over levels with any weight > 0
    (a level weighted 0 in both branches is left out rather than zeroing the product);
    sum: M = sum of all weighted maps;
    product_all: M = product of every weighted map with a weight > 0 (an AND of all six
    detectors; the weights only scale M, so for ranking they merely select maps).
    """
    maps = normalize_maps(maps, spec, stats)
    weights = torch.tensor(spec.weights, dtype=maps.dtype, device=maps.device)
    used_maps = weights[None, :, :, None, None] > 0
    # A map weighted 0 is left out, not multiplied by 0: a NaN in it (a diverged branch) stays out of the other views.
    weighted = torch.where(used_maps, maps * weights[None, :, :, None, None], 0.0)  # (B, 2, 3, H, W)
    # Which maps/levels take part is decided from the Python weights, not from tensors, so
    # that a traced or exported graph holds constant indices (no data-dependent shapes).
    if spec.mode == "product_all":
        kept = [i for i, w in enumerate(w for row in spec.weights for w in row) if w > 0]
        fused = weighted.flatten(1, 2)[:, kept].prod(dim=1)
    elif spec.mode == "sum":
        fused = weighted.sum(dim=1).sum(dim=1)
    else:
        used = [level for level in range(3) if spec.weights[0][level] + spec.weights[1][level] > 0]
        fused = weighted.sum(dim=1)[:, used].prod(dim=1)
    if spec.sigma > 0:
        fused = gaussian_blur(fused, spec.sigma)
    return fused


@dataclass(frozen=True)
class ScoreSpec:
    """How a fused map becomes an image score: the `score.*` params (see :func:`image_score`)."""

    reduce: str = "max"  # max | topk_mean | smoothed_max (`config.ScoreReduce`): see `image_score`
    topk: float = 0.01
    sigma: float = 4.0

    @classmethod
    def from_params(cls, params) -> ScoreSpec:
        """From `params.score` (a `dualstpm.config.ScoreParams`, validated there; a stored record
        is validated by reading it into one first), or anything with `reduce`, `topk`, `sigma`."""
        return cls(params.reduce, params.topk, params.sigma)

    def to_json(self) -> dict[str, str | float]:
        """Only what the reduction uses, e.g. {"reduce": "topk_mean", "topk": 0.01}."""
        used = {"max": {}, "topk_mean": {"topk": self.topk}, "smoothed_max": {"sigma": self.sigma}}[self.reduce]
        return {"reduce": self.reduce, **used}

    @property
    def label(self) -> str:
        """`max`, `topk_mean(topk=0.01)` or `smoothed_max(sigma=4)`: a table row's name."""
        used = ", ".join(f"{k}={v:g}" for k, v in self.to_json().items() if k != "reduce")
        return f"{self.reduce}({used})" if used else self.reduce


#: model selection's score (the original STPM rule), whatever `score.*` says: so that a
#: model can be re-calibrated with another reduction without retraining.
MAX_SCORE = ScoreSpec("max")


def topk_count(n_pixels: int, fraction: float) -> int:
    """Pixels averaged by `topk_mean`: round(fraction * n_pixels), at least 1, at most n_pixels."""
    return min(n_pixels, max(1, round(fraction * n_pixels)))


def image_score(fused: Tensor, spec: ScoreSpec) -> Tensor:
    """(B, H, W) fused maps -> (B,) image scores, in the map's units (METHOD.md §4 uses the max).

    - `max`: the largest pixel;
    - `topk_mean`: the mean of the k = `topk_count(H * W, spec.topk)` largest pixels; k is
      a Python int from the map's size, so a traced or exported graph holds it constant;
    - `smoothed_max`: the largest pixel after `gaussian_blur(fused, spec.sigma)`, so a lone
      hot pixel counts for what its neighbourhood supports.
    """
    if spec.reduce == "smoothed_max":
        fused = gaussian_blur(fused, spec.sigma)
    flat = fused.flatten(1)
    if spec.reduce == "topk_mean":
        # int() of a traced size is a constant: the graph's k is fixed for the exported map size
        k = topk_count(int(fused.shape[-2]) * int(fused.shape[-1]), spec.topk)
        return flat.topk(k, dim=1, sorted=False).values.mean(dim=1)
    return flat.amax(dim=1)


class StreamedScore:
    """`image_score` of one (H, W) map that arrives as disjoint pieces (the windows that a
    tiled frame's tiles own: `dualstpm.model.tiling.owned_windows`), holding the map only where
    the reduction needs it:

    - `max`: a running maximum;
    - `topk_mean`: the largest values seen so far, at most a few k of them (k =
      `topk_count(H * W, topk)` of the whole map). Exact: the k largest values of a union are
      among the k largest of its parts, so the candidates are cut back to k whenever they
      exceed COMPACT_AT times k. The mean of the same k values may differ from
      `image_score`'s in the last digit (another summation order);
    - `smoothed_max`: the blur crosses the pieces' borders, so the whole map is assembled and
      reduced by `image_score` at the end.

    Args: spec, the reduction; shape, (H, W) of the whole map. `add(rows, cols, values)` takes
    the piece at frame rows and columns (slices) of shape (h, w); `result()` the () score.
    Raises ValueError from `result` when pieces covered fewer pixels than the map has.
    """

    COMPACT_AT = 4

    def __init__(self, spec: ScoreSpec, shape: tuple[int, int]) -> None:
        self.spec, self.shape = spec, (int(shape[0]), int(shape[1]))
        self.k = topk_count(self.shape[0] * self.shape[1], spec.topk)
        self.seen = 0
        self._parts: list[Tensor] = []  # topk_mean: the candidate values
        self._held = 0
        self._max: Tensor | None = None  # max: the running maximum
        self._map: Tensor | None = None  # smoothed_max: the assembled map

    def add(self, rows: slice, cols: slice, values: Tensor) -> None:
        self.seen += values.numel()
        if self.spec.reduce == "smoothed_max":
            if self._map is None:
                self._map = values.new_empty(self.shape)
            self._map[rows, cols] = values
        elif self.spec.reduce == "topk_mean":
            flat = values.flatten()
            part = flat.topk(self.k, sorted=False).values if flat.numel() > self.k else flat.clone()
            self._parts.append(part)
            self._held += part.numel()
            if self._held > self.COMPACT_AT * self.k:
                self._parts = [torch.cat(self._parts).topk(self.k, sorted=False).values]
                self._held = self.k
        else:
            self._max = values.amax() if self._max is None else torch.maximum(self._max, values.amax())

    def result(self) -> Tensor:
        if self.seen != self.shape[0] * self.shape[1]:
            raise ValueError(f"the pieces covered {self.seen} pixels of a {self.shape[0]} x {self.shape[1]} map")
        if self.spec.reduce == "smoothed_max":
            return image_score(self._map[None], self.spec)[0]
        if self.spec.reduce == "topk_mean":
            return torch.cat(self._parts).topk(self.k, sorted=False).values.mean()
        return self._max
