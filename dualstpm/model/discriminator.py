"""The discriminative stage's network (METHOD.md §5b): six anomaly maps in, one clean map out.

Yamada, Kamiya and Hotta (arXiv 2210.07548) and DeSTSeg (CVPR 2023) add to the
student-teacher maps a small segmentation network trained on pseudo-anomalies, because the
maps of normal images are not clean (isolated hot spots on rare normal patterns) and their
maximum then decides the image score. Here the network sees only the six maps:

1. ``prepare``: x = avgpool_4(log(m + eps)) - log(s) per map, with s (2, 3) the mean of
   each map over the clean training images (a buffer set once by the training), so that 0
   means "as different as a typical normal pixel" whatever the branch or level:
   (B, 2, 3, H, W) -> (B, 6, H/4, W/4). ``pooled_log`` is the part before the shift, which
   the training computes once per image and caches.
2. ``head``: conv3x3 -> BN -> ReLU, a dilated (2) conv3x3 -> BN -> ReLU, conv3x3 -> BN ->
   ReLU, conv1x1 to one logit per cell: (B, 6, h, w) -> (B, h, w).
3. ``forward``: ``head(prepare(maps))`` upsampled bilinearly to H x W: (B, H, W) logits
   (the map of the view `disc`, in logit units; sigmoid gives the defect probability).

Pure nn.Module: no I/O, no params object. Training lives in `dualstpm.disc_training`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STRIDE = 4
LOG_EPS = 1e-6  # keeps log() finite where a map is exactly 0


def _block(c_in: int, c_out: int, dilation: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def pooled_log(maps: Tensor) -> Tensor:
    """(B, 2, 3, H, W) raw maps -> (B, 6, H/4, W/4): avgpool_4(log(max(m, 0) + eps)).
    Raises ValueError when H or W is not a multiple of ``STRIDE``."""
    height, width = maps.shape[-2:]
    if height % STRIDE or width % STRIDE:
        raise ValueError(f"the discriminator needs maps whose sides are multiples of {STRIDE}, got {height}x{width}")
    return F.avg_pool2d(torch.log(maps.clamp_min(0) + LOG_EPS).flatten(1, 2), STRIDE)


class Discriminator(nn.Module):
    """(B, 2, 3, H, W) six raw maps -> (B, H, W) anomaly logits (module docstring).

    Args:
        width: channels of the hidden layers.
        map_scale: (2, 3) per-map scale s (mean over clean training images); ones until set.
    Raises ValueError (``pooled_log``) when H or W is not a multiple of ``STRIDE``.
    """

    map_scale: Tensor

    def __init__(self, width: int = 32, map_scale: Tensor | None = None) -> None:
        super().__init__()
        self.width = width
        scale = torch.ones(2, 3) if map_scale is None else map_scale.detach().float().reshape(2, 3)
        self.register_buffer("map_scale", scale.clone())
        self.layers = nn.Sequential(
            *_block(6, width), *_block(width, width, dilation=2), *_block(width, width), nn.Conv2d(width, 1, 1)
        )

    def prepare(self, maps: Tensor) -> Tensor:
        """(B, 2, 3, H, W) raw maps -> (B, 6, H/4, W/4) pooled log maps shifted by -log(s)."""
        return self.shift(pooled_log(maps))

    def shift(self, pooled: Tensor) -> Tensor:
        """(B, 6, h, w) ``pooled_log`` maps -> the same minus log(s) per map."""
        return pooled - torch.log(self.map_scale.to(pooled.device, pooled.dtype)).reshape(1, 6, 1, 1)

    def head(self, prepared: Tensor) -> Tensor:
        """(B, 6, h, w) prepared maps -> (B, h, w) logits at stride 4."""
        return self.layers(prepared)[:, 0]

    def forward(self, maps: Tensor) -> Tensor:
        with torch.autocast(maps.device.type, enabled=False):  # float32 whatever the networks ran in
            logits = self.head(self.prepare(maps.float()))
            return F.interpolate(logits[:, None], size=maps.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
