"""Branch B's student: a decoder that rebuilds T2's normal features from T1's deepest map.

METHOD.md §3. The decoder never sees the image: it only sees T1's stride-32 summary, so
for a defective region it can only produce what a normal part would look like there, and
its distance to T2's real features is the anomaly signal.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


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

    Applied as x + x * g so that a closed gate never erases the decoder's features.
    """

    def __init__(self, guide_channels: int, hidden: int = 64) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.Conv2d(guide_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor, guide: Tensor) -> Tensor:
        return x + x * self.gate(guide)


def decoder_width(channels: int) -> int:
    """Internal width of a decoder level: a quarter of the teacher's channels, within [64, 256].

    The same bottleneck ratio as ResNet-50's own blocks and Reverse Distillation's decoder
    (64/128/256 for ResNet-50's 256/512/1024 channels): full width at stride 4 would cost
    more than the teacher itself. A 1x1 head projects to the teacher's exact channels.
    """
    return max(64, min(256, channels // 4))


class ReconstructionStudent(nn.Module):
    """Decoder 32 -> 16 -> 8 -> 4 emitting one feature map per T2 level (strides 4, 8, 16).

    Each level's output is taken before that level's attention gate, so the reconstruction
    at a level never sees T2's feature of the same level; the gate (METHOD.md §3, at the
    stride-16 and stride-8 steps) modulates what flows on to the finer levels.
    """

    strides: tuple[int, ...] = (4, 8, 16)

    def __init__(self, in_channels: int, out_channels: Sequence[int], attention: bool = True) -> None:
        super().__init__()
        if len(out_channels) != 3:
            raise ValueError(f"expected T2 channels at strides 4, 8, 16, got {out_channels}")
        self.channels = tuple(int(c) for c in out_channels)
        c4, c8, c16 = (decoder_width(c) for c in self.channels)
        self.up16 = UpBlock(in_channels, c16)
        self.up8 = UpBlock(c16, c8)
        self.up4 = UpBlock(c8, c4)
        self.heads = nn.ModuleList(nn.Conv2d(w, c, 1) for w, c in zip((c4, c8, c16), self.channels))
        self.attention = attention
        if attention:
            self.gate16 = SpatialAttentionGate(self.channels[2])
            self.gate8 = SpatialAttentionGate(self.channels[1])

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
