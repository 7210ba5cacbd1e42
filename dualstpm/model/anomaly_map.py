"""From six anomaly maps to a fused map, as a module.

The pieces of the inference module (:mod:`dualstpm.model.inference`) that come after the
networks. The math is `dualstpm.model.fusion`'s (the functions the evaluation and the ablation
re-score stored maps with); these modules only hold what it needs as buffers and plain
attributes, so the whole chain traces and exports as one graph.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dualstpm.model.fusion import FusionSpec, MapStats, fuse


class MapFusion(nn.Module):
    """(B, 2, 3, H, W) six raw maps -> (B, H, W) fused map, with `fusion.fuse`.

    Args:
        spec: mode, 2x3 weights, normalisation and smoothing sigma (px).
        stats: (2, 3) per-map validation mean and std (used when ``spec.normalize ==
            "val_stats"``; kept as buffers either way), or None before calibration (then
            only ``normalize: none`` fuses; `fuse` raises ValueError otherwise).
    """

    map_mean: Tensor | None
    map_std: Tensor | None

    def __init__(self, spec: FusionSpec, stats: MapStats | None) -> None:
        super().__init__()
        self.spec = spec
        for name, value in (("map_mean", None if stats is None else stats.mean),
                            ("map_std", None if stats is None else stats.std)):
            self.register_buffer(name, None if value is None else value.detach().float().clone().reshape(2, 3))

    def forward(self, maps: Tensor) -> Tensor:
        stats = None if self.map_mean is None else MapStats(self.map_mean, self.map_std)
        # float32 whatever autocast the networks ran under (the smoothing is a convolution)
        with torch.autocast(maps.device.type, enabled=False):
            return fuse(maps.float(), self.spec, stats)

    def extra_repr(self) -> str:
        return f"spec={self.spec}"
