"""Branch B's student: a decoder that rebuilds T2's normal features from T1's deepest map.

METHOD.md §3. The decoder never sees the image: it only sees T1's stride-32 summary, so
for a defective region it can only produce what a normal part would look like there, and
its distance to T2's real features is the anomaly signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

DecoderWidth = Literal["quarter", "full"]
GateForm = Literal["residual", "method"]


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x + self.body(x))


class UpBlock(nn.Module):
    """Doubles the resolution with a transposed convolution, then refines with a residual block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.refine = ResidualBlock(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.refine(self.up(x))


class SpatialAttentionGate(nn.Module):
    """One-channel gate from a teacher feature: conv3x3 -> BN -> ReLU -> conv1x1 -> sigmoid.

    `residual` True: x + x * g, so that a closed gate (g = 0) never erases the decoder's
    features; False: x * g, the plain gate (a closed gate zeroes x). Shapes: x (B, C, h, w),
    guide (B, C_guide, h, w), g (B, 1, h, w) in [0, 1].
    """

    def __init__(self, guide_channels: int, hidden: int = 64, residual: bool = True) -> None:
        super().__init__()
        self.residual = residual
        self.gate = nn.Sequential(
            nn.Conv2d(guide_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor, guide: Tensor) -> Tensor:
        gated = x * self.gate(guide)
        return x + gated if self.residual else gated


def decoder_width(channels: int, width: DecoderWidth = "quarter") -> int:
    """Internal width of a decoder level for a teacher level of `channels` (`model.decoder_width`).

    `quarter`: a quarter of the teacher's channels, within [64, 256]: the same bottleneck
    ratio as ResNet-50's own blocks and Reverse Distillation's decoder (64/128/256 for
    ResNet-50's 256/512/1024 channels), far cheaper at stride 4. `full`: the teacher's
    channels (256/512/1024), as public re-implementations of the method build the decoder.
    Either way a 1x1 head follows and projects to the teacher's exact channels; at full
    width it is kept (not an identity) because the level's residual block ends in a ReLU,
    while the teacher's features may be negative.
    """
    if width == "full":
        return channels
    if width == "quarter":
        return max(64, min(256, channels // 4))
    raise ValueError(f"unknown decoder width {width!r} (model.decoder_width): use quarter or full")


class ReconstructionStudent(nn.Module):
    """Decoder 32 -> 16 -> 8 -> 4 emitting one feature map per T2 level (strides 4, 8, 16).

    Each level's output is taken before that level's attention gate, so the reconstruction
    at a level never sees T2's feature of the same level; the gate (METHOD.md §3, at the
    stride-16 and stride-8 steps) modulates what flows on to the finer levels.
    `width`: `model.decoder_width` (see `decoder_width`). `gate_form`: `model.gate_form`:
    `residual` = x + x*g at both gates; `method` = x*g at stride 16 and x + x*g at stride 8
    (METHOD.md §3). Ignored without `attention`.
    """

    strides: tuple[int, ...] = (4, 8, 16)

    def __init__(self, in_channels: int, out_channels: Sequence[int], attention: bool = True,
                 width: DecoderWidth = "quarter", gate_form: GateForm = "residual") -> None:
        super().__init__()
        if len(out_channels) != 3:
            raise ValueError(f"expected T2 channels at strides 4, 8, 16, got {out_channels}")
        if gate_form not in ("residual", "method"):
            raise ValueError(f"unknown gate form {gate_form!r} (model.gate_form): use residual or method")
        self.channels = tuple(int(c) for c in out_channels)
        c4, c8, c16 = (decoder_width(c, width) for c in self.channels)
        self.up16 = UpBlock(in_channels, c16)
        self.up8 = UpBlock(c16, c8)
        self.up4 = UpBlock(c8, c4)
        self.heads = nn.ModuleList(nn.Conv2d(w, c, 1) for w, c in zip((c4, c8, c16), self.channels))
        self.attention = attention
        if attention:
            self.gate16 = SpatialAttentionGate(self.channels[2], residual=gate_form == "residual")
            self.gate8 = SpatialAttentionGate(self.channels[1], residual=True)

    def forward(self, deep: Tensor, guides: Sequence[Tensor]) -> list[Tensor]:
        """`deep`: T1's stride-32 map; `guides`: T2's features at strides 4, 8, 16."""
        x16 = self.up16(deep)
        out16 = self.heads[2](x16)
        if self.attention:
            x16 = self.gate16(x16, guides[2])
        x8 = self.up8(x16)
        out8 = self.heads[1](x8)
        if self.attention:
            x8 = self.gate8(x8, guides[1])
        out4 = self.heads[0](self.up4(x8))
        return [out4, out8, out16]
