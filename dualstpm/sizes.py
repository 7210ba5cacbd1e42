"""The model's input size: one side (a square, as every model before rectangular sizes) or
(height, width), and the rule that keeps a category's native aspect ratio.

`image_size` in the params is either an int S (the frame is resized to S x S) or [H, W]
(resized to H x W). Both sides are multiples of :data:`STRIDE`, the stride of the deepest
teacher map, so every level of the feature pyramid tiles the input exactly.

With `data.keep_aspect: true` the fit turns the side into the category's own shape
(:func:`native_size`): the long side stays `image_size`'s longest side and the short side
follows the median aspect ratio of the good training images, rounded to a multiple of
:data:`STRIDE`. Every image is then resized to that one H x W (a frame of another aspect is
stretched by :func:`aspect_change`, which the fit reports): one rule per category, written
into the model's params as the concrete [H, W] it was trained at.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable

#: an input size: an int (the side of a square, px) or (height, width) in px
ImageSize = int | tuple[int, int]

#: the deepest teacher map's stride, px: each side a multiple of it (as `image_size` always was)
STRIDE = 32
MIN_SIDE, MAX_SIDE = 32, 2048


def hw(size: ImageSize) -> tuple[int, int]:
    """(height, width) in px of an `image_size`: an int S is (S, S); a pair is returned as a tuple."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def from_json(value: int | list[int] | tuple[int, int]) -> ImageSize:
    """A size as JSON keeps it (an int, or a [height, width] list) -> an int or an (H, W) tuple
    (:func:`check_size` refuses a list of another length)."""
    return value if isinstance(value, int) else tuple(int(side) for side in value)


def to_json(size: ImageSize) -> int | list[int]:
    """A size as JSON (and the params files) write it: an int, or [height, width]."""
    return size if isinstance(size, int) else [int(size[0]), int(size[1])]


def pixel_count(size: ImageSize) -> int:
    """Pixels of a map at `size`: H * W."""
    height, width = hw(size)
    return height * width


def shortest_side(size: ImageSize) -> int:
    """The shorter side in px (what a blur radius must stay below)."""
    return min(hw(size))


def describe(size: ImageSize) -> str:
    """'256 px' for a square, '160 high x 384 wide' for a rectangle (never an ambiguous 'AxB')."""
    height, width = hw(size)
    return f"{height} px" if height == width else f"{height} high x {width} wide"


def as_param(size: ImageSize) -> str:
    """The value to paste after `image_size=`: '256', or '[160, 384]' (height, width)."""
    height, width = hw(size)
    return str(height) if isinstance(size, int) else f"[{height}, {width}]"


def check_side(value: int) -> int:
    """One side in px: a multiple of :data:`STRIDE` in [MIN_SIDE, MAX_SIDE]; ValueError (with the
    fix) otherwise."""
    if not MIN_SIDE <= value <= MAX_SIDE or value % STRIDE:
        raise ValueError(f"each side must be a multiple of {STRIDE} between {MIN_SIDE} and {MAX_SIDE} px (the deepest "
                         f"teacher map has stride {STRIDE}), got {value}: e.g. 256, or [H, W] such as [160, 384]")
    return value


def check_size(value: ImageSize) -> ImageSize:
    """An int side, or an (H, W) pair, each side checked by :func:`check_side`; a pair of
    equal sides stays a pair (what the user wrote)."""
    if isinstance(value, int):
        return check_side(value)
    pair = tuple(value)
    if len(pair) != 2:
        raise ValueError(f"must be one side (e.g. 256) or [height, width] (e.g. [160, 384]), got {list(pair)}")
    return check_side(int(pair[0])), check_side(int(pair[1]))


def round_side(value: float) -> int:
    """The nearest multiple of :data:`STRIDE` to `value`, clamped to [MIN_SIDE, MAX_SIDE]."""
    return max(MIN_SIDE, min(MAX_SIDE, STRIDE * round(value / STRIDE)))


def native_size(shapes: Iterable[tuple[int, int]], long_side: int) -> tuple[int, int]:
    """(H, W) that keeps the median aspect ratio of `shapes` ((width, height) of each image, as
    `dualstpm.data.image_size_of` gives them): the longer side is `long_side`, the shorter
    `long_side` times the median short/long ratio, rounded to a multiple of :data:`STRIDE`.

    Example: 500x1250 frames (width x height) with long side 384 -> H 384, W 384 * 0.4 =
    153.6 -> 160. Raises ValueError for no shapes or a non-positive side.
    """
    ratios = []  # width / height of each image
    for width, height in shapes:
        if width <= 0 or height <= 0:
            raise ValueError(f"an image of {width}x{height} px has no aspect ratio")
        ratios.append(width / height)
    if not ratios:
        raise ValueError("no images to take the aspect ratio from")
    ratio = statistics.median(ratios)
    long_side = check_side(long_side)
    if ratio >= 1:  # landscape (or square): the width is the long side
        return round_side(long_side / ratio), long_side
    return long_side, round_side(long_side * ratio)


#: a resize that stretches an image's aspect ratio by more than this is reported (by the fit's
#: plan and by predict): 10 %, below which a defect's shape barely changes
STRETCH_NOTE = 1.1


def stretch_note(changes: Iterable[float], size: ImageSize, tiled: bool = False) -> str | None:
    """What `predict` says about its images' :func:`aspect_change` values at the model's
    `size` (its input, or under tiling (`tiled`) its frame size): None when none exceeds
    :data:`STRETCH_NOTE`, else how many and by how much."""
    changes = list(changes)
    over = [c for c in changes if c > STRETCH_NOTE]
    if not over:
        return None
    if tiled:
        return (f"{len(over)} of {len(changes)} images have another aspect ratio than the model's {describe(size)} "
                f"frames (tiling.frame_size) and are stretched to it by up to {max(over):.2f}x: defects change shape. "
                "Retrain with tiling.frame_size set to these images' [height, width] (docs/frames.md#tiling)")
    return (f"{len(over)} of {len(changes)} images have another aspect ratio than the model's {describe(size)} "
            f"input and are stretched to it by up to {max(over):.2f}x: defects change shape. Retrain on images like "
            "these (with data.keep_aspect=true the model keeps their aspect: docs/frames.md)")


def aspect_change(shape: tuple[int, int], size: ImageSize) -> float:
    """How much resizing an image of `shape` ((width, height)) to `size` stretches it: the
    ratio of the two aspect ratios, >= 1 (1.0: the aspect is kept; 2.5: a 500x1250 frame
    squashed to a square)."""
    width, height = shape
    target_h, target_w = hw(size)
    change = (width / height) / (target_w / target_h)
    return max(change, 1 / change)
