"""A small, deterministic synthetic category in MVTec AD layout.

Tests and the offline demo need data that exists everywhere, takes no download and
has exact masks. Two looks cover the two MVTec families: ``texture`` (a stationary
pattern, like carpet or tile) and ``object`` (a centred part on a plain background,
like bottle or nut). Three defect types are painted on top, each with its exact mask:
``scratch`` (thin bright or dark polyline), ``hole`` (dark filled ellipse) and
``stain`` (blurred coloured blob; the mask is where its opacity passes half).

Every image has its own random stream derived from ``(seed, split, index)``, so the same
arguments always write byte-identical files, and adding images does not change the
existing ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from dualstpm.errors import DataError
from dualstpm.files import staged_dir

SYNTHETIC_KINDS = ("texture", "object")
DEFECT_TYPES = ("scratch", "hole", "stain")
MIN_IMAGE_SIZE = 32

_STYLE_STREAM = 1000  # stream id of the category-wide look, apart from image streams
_STAIN_COLOURS = np.array([[0.55, 0.30, 0.10], [0.20, 0.45, 0.20], [0.15, 0.25, 0.60]])


@dataclass(frozen=True)
class _Style:
    """What all normal images of a category share (the 'product')."""

    colour: np.ndarray  # (3,) base colour
    background: np.ndarray  # (3,) object kind only
    angle: float  # texture grating orientation, radians
    period: float  # texture grating period, in fractions of the image size
    radius: float  # object radius, in fractions of the image size


@dataclass
class _Canvas:
    """A normal image plus where defects may go."""

    image: np.ndarray  # HxWx3 float
    region: np.ndarray  # HxW bool, pixels a defect may change
    centre: tuple[float, float]  # (x, y) of the placement disc
    reach: float  # radius of the placement disc, pixels


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _style(seed: int, kind: str) -> _Style:
    rng = _rng(seed, _STYLE_STREAM, SYNTHETIC_KINDS.index(kind))
    return _Style(
        colour=rng.uniform(0.45, 0.9, 3),
        background=np.full(3, rng.uniform(0.1, 0.25)),
        angle=float(rng.uniform(0, np.pi)),
        period=float(rng.uniform(1 / 14, 1 / 9)),
        radius=float(rng.uniform(0.28, 0.34)),
    )


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) pixel-centre coordinates."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    return x, y


def _texture(style: _Style, size: int, rng: np.random.Generator) -> _Canvas:
    """Two crossed gratings with a random phase, fine noise and slight colour jitter."""
    x, y = _grid(size)
    angle = style.angle + rng.normal(0, 0.03)
    along = x * np.cos(angle) + y * np.sin(angle)
    across = -x * np.sin(angle) + y * np.cos(angle)
    frequency = 2 * np.pi / (style.period * size)
    gray = (0.5
            + 0.22 * np.sin(frequency * along + rng.uniform(0, 2 * np.pi))
            + 0.08 * np.sin(2.3 * frequency * across + rng.uniform(0, 2 * np.pi))
            + rng.normal(0, 0.03, (size, size)))
    colour = style.colour * (1 + rng.normal(0, 0.03, 3))
    return _Canvas(gray[..., None] * colour, np.ones((size, size), bool),
                   (size / 2, size / 2), 0.35 * size)


def _object(style: _Style, size: int, rng: np.random.Generator) -> _Canvas:
    """A shaded disc with a small dark mark, slightly shifted and brightened per image."""
    x, y = _grid(size)
    cx, cy = size / 2 + rng.uniform(-0.03, 0.03, 2) * size
    radius = style.radius * size * (1 + rng.normal(0, 0.01))
    r = np.hypot(x - cx, y - cy)
    region = r <= radius
    dome = np.sqrt(np.clip(1 - (r / radius) ** 2, 0, 1))
    lit = (0.45 + 0.45 * dome) * (1 + rng.normal(0, 0.02))
    mark = np.hypot(x - (cx + 0.5 * radius), y - cy) <= 0.12 * radius
    shade = np.where(mark, 0.3, lit)
    noise = rng.normal(0, 0.01, (size, size, 1))
    image = np.where(region[..., None], shade[..., None] * style.colour, style.background) + noise
    return _Canvas(image, region, (cx, cy), 0.55 * radius)


_RENDERERS: dict[str, Callable[[_Style, int, np.random.Generator], _Canvas]] = {
    "texture": _texture,
    "object": _object,
}


def _place(canvas: _Canvas, rng: np.random.Generator) -> tuple[float, float]:
    """A uniform point of the placement disc (on the object for the object kind)."""
    angle, distance = rng.uniform(0, 2 * np.pi), canvas.reach * np.sqrt(rng.uniform())
    return canvas.centre[0] + distance * np.cos(angle), canvas.centre[1] + distance * np.sin(angle)


def _drawn(shape: tuple[int, int], draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    """A shape rasterised by PIL as a float 0/1 array of `shape` (H, W)."""
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw(ImageDraw.Draw(canvas))
    return (np.asarray(canvas) > 0).astype(np.float64)


def _ellipse(centre: tuple[float, float], half_axes: tuple[float, float]) -> Callable[[ImageDraw.ImageDraw], None]:
    (cx, cy), (a, b) = centre, half_axes
    return lambda draw: draw.ellipse([cx - a, cy - b, cx + a, cy + b], fill=255)


# A defect: (opacity HxW in [0, 1], colour (3,), exact mask HxW bool), before clipping.
_Defect = tuple[np.ndarray, np.ndarray, np.ndarray]


def _scratch(canvas: _Canvas, size: int, rng: np.random.Generator) -> _Defect:
    start = _place(canvas, rng)
    angle, points = rng.uniform(0, 2 * np.pi), [start]
    for _ in range(2):  # two segments with a small bend
        length = rng.uniform(0.08, 0.15) * size
        points.append((points[-1][0] + length * np.cos(angle), points[-1][1] + length * np.sin(angle)))
        angle += rng.normal(0, 0.5)
    width = int(rng.integers(1, 4))
    shape = _drawn(canvas.region.shape, lambda draw: draw.line(points, fill=255, width=width, joint="curve"))
    colour = np.full(3, 0.97 if rng.uniform() < 0.5 else 0.05)
    return shape * rng.uniform(0.7, 0.9), colour, shape > 0


def _hole(canvas: _Canvas, size: int, rng: np.random.Generator) -> _Defect:
    half_axes = tuple(max(2.0, rng.uniform(0.035, 0.07) * size) for _ in range(2))
    shape = _drawn(canvas.region.shape, _ellipse(_place(canvas, rng), half_axes))
    return shape * 0.92, np.full(3, rng.uniform(0.03, 0.1)), shape > 0


def _stain(canvas: _Canvas, size: int, rng: np.random.Generator) -> _Defect:
    half_axes = tuple(max(4.0, rng.uniform(0.06, 0.1) * size) for _ in range(2))
    blob = gaussian_filter(_drawn(canvas.region.shape, _ellipse(_place(canvas, rng), half_axes)), max(1.0, 0.02 * size))
    colour = _STAIN_COLOURS[rng.integers(len(_STAIN_COLOURS))] * rng.uniform(0.9, 1.1)
    return blob * rng.uniform(0.55, 0.75), colour, blob > 0.5


_DEFECTS: dict[str, Callable[[_Canvas, int, np.random.Generator], _Defect]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
}


def _paint(canvas: _Canvas, defect: _Defect) -> np.ndarray:
    """Blend the defect into the image, only inside the canvas region; return its mask."""
    opacity, colour, mask = defect
    opacity = (opacity * canvas.region)[..., None]
    canvas.image = canvas.image * (1 - opacity) + colour * opacity
    return mask & canvas.region


def paint_scratch(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint one synthetic scratch on any HxWx3 float image; return (image, exact mask).

    The same scratch as in the synthetic categories (its lengths in units of the shorter
    side), placed anywhere within a disc of 35 % of the shorter side around the centre: the
    fusion-weight ablation and the fit check paste these on real validation images.
    """
    height, width = image.shape[:2]
    size = min(height, width)
    canvas = _Canvas(np.array(image, dtype=np.float64), np.ones((height, width), bool), (width / 2, height / 2),
                     0.35 * size)
    mask = _paint(canvas, _scratch(canvas, size, rng))
    return np.clip(canvas.image, 0.0, 1.0), mask


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _save(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, format="PNG")


@dataclass(frozen=True)
class _Writer:
    """Renders and saves the images of one category."""

    root: Path
    kind: str
    seed: int
    size: int
    style: _Style

    def split(self, stream: int, folder: str, count: int, defect: str | None = None) -> None:
        """Write `count` images to ``root/folder`` (and their masks when `defect` is set)."""
        images = self.root / folder
        images.mkdir(parents=True)
        masks = self.root / "ground_truth" / defect if defect else None
        if masks is not None:
            masks.mkdir(parents=True)
        width = max(3, len(str(count - 1)))
        for index in range(count):
            rng = _rng(self.seed, stream, index)
            canvas = _RENDERERS[self.kind](self.style, self.size, rng)
            stem = f"{index:0{width}d}"
            if defect and masks is not None:
                mask = _paint(canvas, _DEFECTS[defect](canvas, self.size, rng))
                _save(masks / f"{stem}_mask.png", mask.astype(np.uint8) * 255)
            _save(images / f"{stem}.png", _to_uint8(canvas.image))


def _write_category(root: Path, kind: str, seed: int, size: int,
                    n_train: int, n_test_good: int, n_per_defect: int) -> None:
    """Each split has its own stream id, so counts of one never change another."""
    writer = _Writer(root, kind, seed, size, _style(seed, kind))
    writer.split(0, "train/good", n_train)
    writer.split(1, "test/good", n_test_good)
    for stream, defect in enumerate(DEFECT_TYPES, start=2):
        writer.split(stream, f"test/{defect}", n_per_defect, defect)


def _check_arguments(kind: str, seed: int, image_size: int, counts: dict[str, int]) -> None:
    if kind not in SYNTHETIC_KINDS:
        raise DataError(f"unknown synthetic kind {kind!r}: use one of {', '.join(SYNTHETIC_KINDS)}.")
    if seed < 0:
        raise DataError(f"synthetic seed must be >= 0, got {seed}.")
    if image_size < MIN_IMAGE_SIZE:
        raise DataError(f"synthetic image_size must be >= {MIN_IMAGE_SIZE} px, got {image_size}.")
    for name, value in counts.items():
        if value < 1:
            raise DataError(f"synthetic {name} must be >= 1, got {value}.")


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not target.is_dir():
        raise DataError(f"{target.absolute()} exists and is not a folder: remove it or pick another category name.")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise DataError(
            f"{target.absolute()} already exists and is not empty: pick another category "
            "name or data root, or ask to overwrite it (overwrite=True)."
        )


def make_synthetic_category(data_root: Path, category: str, kind: str = "texture", *, seed: int = 0,
                            image_size: int = 128, n_train: int = 60, n_test_good: int = 12,
                            n_per_defect: int = 8, overwrite: bool = False) -> Path:
    """Write a synthetic category to ``<data_root>/<category>`` and return that folder.

    Files are PNG: RGB images, 0/255 L-mode masks at
    ``ground_truth/<defect>/<stem>_mask.png``. The category is built in a hidden temp
    folder beside the target and renamed into place, so a crash never leaves half a
    category. An existing non-empty folder is only replaced with ``overwrite=True``.
    """
    _check_arguments(kind, seed, image_size,
                     {"n_train": n_train, "n_test_good": n_test_good, "n_per_defect": n_per_defect})
    data_root = Path(data_root)
    target = data_root / category
    _check_target(target, overwrite)
    with staged_dir(target) as built:
        _write_category(built, kind, seed, image_size, n_train, n_test_good, n_per_defect)
    return target
