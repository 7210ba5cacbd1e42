"""From six anomaly maps to a fused map, an image score and a normalised score, as modules.

The pieces of the inference module (:mod:`dualstpm.models.inference`) that come after the
networks. The math is `dualstpm.fusion`'s (the functions the evaluation and the ablation
re-score stored maps with); these modules only hold what it needs as buffers and plain
attributes, so the whole chain traces and exports as one graph.

Normalised score (METHOD.md §4, issue 12): a raw image score s is mapped to

    n(s) = clip(0.5 * (s - s_min) / (t - s_min), 0, 1)

where t is the stored decision threshold and s_min the lowest image score of the good
validation images under the same fusion. So 0 = the least anomalous validation image,
0.5 = the threshold (``n > 0.5`` exactly when ``s > t``), 1 = as far above the threshold as
the threshold is above s_min, or more. It is monotone (non-decreasing), so it ranks images
as the raw score does; only scores beyond both ends tie (at 0 or 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dualstpm.fusion import FusionSpec, MapStats, fuse

MIN_SPAN = 1e-12  # a threshold equal to the lowest validation score (one validation image)


class MapFusion(nn.Module):
    """(B, 2, 3, H, W) six raw maps -> (B, H, W) fused map, with `fusion.fuse`.

    Args:
        spec: mode, 2x3 weights, normalisation and smoothing sigma (px).
        map_mean, map_std: (2, 3) per-map validation statistics (used when
            ``spec.normalize == "val_stats"``; kept as buffers either way).
    """

    map_mean: Tensor
    map_std: Tensor

    def __init__(self, spec: FusionSpec, map_mean: Tensor, map_std: Tensor) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("map_mean", map_mean.detach().float().clone().reshape(2, 3))
        self.register_buffer("map_std", map_std.detach().float().clone().reshape(2, 3))

    def forward(self, maps: Tensor) -> Tensor:
        # float32 whatever autocast the networks ran under (the smoothing is a convolution)
        with torch.autocast(maps.device.type, enabled=False):
            return fuse(maps.float(), self.spec, MapStats(self.map_mean, self.map_std))

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


class ScoreNormalization(nn.Module):
    """Raw image scores (B,) -> normalised scores in [0, 1], 0.5 at the threshold (module docstring).

    Args:
        threshold: the stored decision threshold t (raw score units).
        val_min: the lowest raw score of the good validation images under the same fusion.
    """

    def __init__(self, threshold: float, val_min: float) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.val_min = min(float(val_min), self.threshold)
        self.span = max(self.threshold - self.val_min, MIN_SPAN)

    def forward(self, scores: Tensor) -> Tensor:
        return (0.5 * (scores - self.val_min) / self.span).clamp(0.0, 1.0)

    def to_json(self) -> dict[str, float | str]:
        """What an export's metadata records about it."""
        return {"formula": "clip(0.5 * (score - val_min) / (threshold - val_min), 0, 1)",
                "threshold": self.threshold, "val_min": self.val_min}

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.6g}, val_min={self.val_min:.6g}"

