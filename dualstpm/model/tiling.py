"""Tiling: a large frame cut into overlapping tiles at the model's input size, maps stitched back.

The networks see tiles of the model's input size (`image_size`); a frame of `tiling.frame_size`
px is cut into a grid of them, every tile is scored, and the tiles' maps are stitched into
one map of the frame, from which the image score, the metrics and the defect regions are
taken as for an untiled image (docs/frames.md, "Tiling").

**Grid.** Along each axis of length L with tiles of t px and overlap fraction o, there are
``n = ceil((L - t) / (t * (1 - o))) + 1`` tiles (one when L <= t), whose origins are spread
evenly from 0 to L - t (``round(i * (L - t) / (n - 1))``), so the first and the last tile
are flush with the frame's edges and neighbours overlap by at least ``o * t`` px.

**Stitching: the overlap-tile strategy** (Ronneberger et al., "U-Net", MICCAI 2015, §2).
Each frame pixel takes its value from the one tile in which it lies farthest from the tile's
border: neighbours split their overlap at its middle. A convolutional network's features
are distorted near a tile's border (zero padding, missing context); the overlap exists so
that no pixel of the frame is read from there. Owning instead of averaging also makes
stitching commute with every pixel-wise operation: the fused map of stitched six maps is
exactly the stitch of the tiles' fused maps, so a test (which stores six maps) and predict or
an export (which stitch the tiles' views) give the same numbers. Fusion smoothing and the
discriminative stage are not pixel-wise: params refuse them with tiling.

**A frame smaller than one tile** along an axis is padded (edge pixels repeated) to the tile
and its map cropped back: scored as one padded tile.

Pure torch, no params and no files: `Tiling` is built from plain values at the edge
(`dualstpm.config.Params.tiling_spec`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor


def axis_origins(length: int, tile: int, overlap: float) -> tuple[int, ...]:
    """Tile origins along one axis (module docstring): flush with both ends, evenly spread,
    neighbours overlapping by at least ``overlap * tile`` px. Raises ValueError for an
    overlap outside [0, 1) or a non-positive size."""
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if length < 1 or tile < 1:
        raise ValueError(f"length and tile must be positive, got {length} and {tile}")
    if length <= tile:
        return (0,)
    stride = tile * (1.0 - overlap)
    n = math.ceil((length - tile) / stride - 1e-9) + 1
    return tuple(round(i * (length - tile) / (n - 1)) for i in range(n))


def axis_owners(length: int, tile: int, origins: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The span [start, stop) of the frame each tile owns along one axis: neighbours split
    their overlap at its middle, the first starts at 0 and the last stops at `length`."""
    cuts = [0, *((b + a + tile) // 2 for a, b in zip(origins, origins[1:])), length]
    return tuple(zip(cuts, cuts[1:]))


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one frame size: `frame` (H, W), `tile` (h, w), origins per axis."""

    frame: tuple[int, int]
    tile: tuple[int, int]
    overlap: float

    @cached_property
    def ys(self) -> tuple[int, ...]:
        return axis_origins(self.frame[0], self.tile[0], self.overlap)

    @cached_property
    def xs(self) -> tuple[int, ...]:
        return axis_origins(self.frame[1], self.tile[1], self.overlap)

    @property
    def count(self) -> int:
        """Tiles per frame."""
        return len(self.ys) * len(self.xs)

    @property
    def padded(self) -> bool:
        """True when the frame is smaller than one tile along an axis (it is edge-padded)."""
        return self.frame[0] < self.tile[0] or self.frame[1] < self.tile[1]

    def positions(self) -> list[tuple[int, int]]:
        """(row origin, column origin) of every tile, row by row."""
        return [(y, x) for y in self.ys for x in self.xs]

    def owned(self) -> list[tuple[slice, slice, slice, slice]]:
        """Per tile (same order as `positions`): (frame rows, frame columns, tile rows, tile
        columns) of the window it writes into the stitched map. The windows partition the frame."""
        rows = axis_owners(self.frame[0], self.tile[0], self.ys)
        cols = axis_owners(self.frame[1], self.tile[1], self.xs)
        out = []
        for y, (r0, r1) in zip(self.ys, rows):
            for x, (c0, c1) in zip(self.xs, cols):
                out.append((slice(r0, r1), slice(c0, c1), slice(r0 - y, r1 - y), slice(c0 - x, c1 - x)))
        return out

    def describe(self) -> str:
        """E.g. ``3 x 7 = 21 tiles of 256 x 256 px``."""
        return (f"{len(self.ys)} x {len(self.xs)} = {self.count} tiles of {self.tile[0]} x {self.tile[1]} px "
                f"(height x width)")

    def cut(self, frame: Tensor) -> Tensor:
        """One frame (C, H, W) -> its tiles (count, C, h, w), in `positions` order (edge-padded
        where the frame is smaller than a tile). Materialises every tile: for training sets;
        scoring streams them (`stitched`)."""
        return torch.stack([self._tile(frame, y, x) for y, x in self.positions()])

    def _tile(self, frame: Tensor, y: int, x: int) -> Tensor:
        h, w = self.tile
        crop = frame[..., y : y + h, x : x + w]
        short = (h - crop.shape[-2], w - crop.shape[-1])
        if short == (0, 0):
            return crop
        return F.pad(crop[None].float(), (0, short[1], 0, short[0]), mode="replicate")[0].to(crop.dtype)


@dataclass(frozen=True)
class Tiling:
    """How frames are tiled: tiles of `tile` (h, w) px (the model's input size), neighbours
    overlapping by at least `overlap` of a tile, `batch_size` tiles through the networks at a time."""

    tile: tuple[int, int]
    overlap: float
    batch_size: int

    def grid(self, frame: tuple[int, int]) -> TileGrid:
        return TileGrid((int(frame[0]), int(frame[1])), self.tile, self.overlap)

    def cut_all(self, frames: Tensor) -> Tensor:
        """(N, C, H, W) frames -> (N * tiles, C, h, w): every frame's tiles, frame by frame
        (the training set of a tiled fit)."""
        grid = self.grid(frames.shape[-2:])
        return torch.cat([grid.cut(frame) for frame in frames]) if len(frames) else frames.new_empty(0, frames.shape[1], *self.tile)

    def batches(self, frames: Tensor) -> Iterator[tuple[list[tuple[int, int]], Tensor]]:
        """Stream the tiles of (N, C, H, W) frames, `batch_size` at a time: ([(frame index,
        tile index), ...], (B, C, h, w) tiles). Only one batch of tiles exists at a time."""
        grid = self.grid(frames.shape[-2:])
        keys = [(n, k) for n in range(len(frames)) for k in range(grid.count)]
        positions = grid.positions()
        for start in range(0, len(keys), self.batch_size):
            part = keys[start : start + self.batch_size]
            yield part, torch.stack([grid._tile(frames[n], *positions[k]) for n, k in part])


def owned_windows(frames: Tensor, tiling: Tiling, maps_of: Callable[[Tensor], Tensor],
                  on_tiles: Callable[[int], None] | None = None) -> Iterator[tuple[int, slice, slice, Tensor]]:
    """The one tiled scoring loop: stream (N, C, H, W) frames through `maps_of` tile by tile.

    `maps_of` takes (B, C, h, w) tiles (the frames' dtype: uint8 frames give uint8 tiles) to
    (B, *M, h, w) maps; tiles are cut `tiling.batch_size` at a time. Yields, per tile, (frame
    index, frame rows, frame columns, (*M, rows, columns) its maps there): the window the
    tile owns (module docstring); over a frame the windows partition it, so every pixel comes
    exactly once. Memory: one batch of tiles and their maps. `on_tiles(n)` is called after
    each batch of n tiles (a progress bar).
    """
    windows = tiling.grid(frames.shape[-2:]).owned()
    for keys, tiles in tiling.batches(frames):
        maps = maps_of(tiles)
        for (n, k), tile_map in zip(keys, maps):
            rows, cols, tile_rows, tile_cols = windows[k]
            yield n, rows, cols, tile_map[..., tile_rows, tile_cols]
        if on_tiles is not None:
            on_tiles(len(keys))


def stitched(frames: Tensor, tiling: Tiling, maps_of: Callable[[Tensor], Tensor],
             on_tiles: Callable[[int], None] | None = None) -> Tensor:
    """(N, C, H, W) frames -> (N, *M, H, W) maps stitched from the tiles' owned windows
    (:func:`owned_windows`; `maps_of` as there: six raw maps (B, 2, 3, h, w) for the test and
    calibration). Memory: the result and one batch of tiles with their maps."""
    out: Tensor | None = None
    for n, rows, cols, window in owned_windows(frames, tiling, maps_of, on_tiles):
        if out is None:
            out = window.new_empty((len(frames), *window.shape[:-2], *frames.shape[-2:]))
        out[n, ..., rows, cols] = window
    if out is None:
        raise ValueError("no frames to tile")
    return out
