"""Reading one image or mask file into a numpy array, whatever its format.

Inspection datasets mix PNG and JPEG, grayscale and colour, 8- and 16-bit files. Every
caller gets the same thing back (float RGB in [0, 1], or a bool mask), and every file
that cannot be decoded becomes a :class:`DataError` naming that file, so that a damaged
image stops a run with a message instead of a traceback.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from dualstpm.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# Modes whose pixels numpy can take as they are; everything else is converted first.
_GRAY_MODES = ("L", "I", "F")
_TO_GRAY_MODES = ("1", "LA", "La")  # bilevel, or gray with alpha

# Full-scale value of each pixel dtype PIL hands out. Mode "I" (32-bit int) is what
# PIL uses for 16-bit files in some versions and formats, so it is scaled as 16-bit.
_FULL_SCALE = {
    np.dtype(np.uint8): 255.0,
    np.dtype(np.uint16): 65535.0,
    np.dtype(">u2"): 65535.0,
    np.dtype(np.int32): 65535.0,
    np.dtype(np.float32): 1.0,
}


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image suffix: hidden files (``.DS_Store``, editor
    droppings) and notes next to the images are not data."""
    return (
        not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
    )


def _cannot_read(path: Path | str, reason: object) -> DataError:
    where = Path(path).absolute() if isinstance(path, Path) else path
    return DataError(
        f"cannot read image {where}: {reason}. Replace or remove the file "
        "(it may be truncated, still being copied, or not an image)."
    )


def _decode(path: Path | str, source: BinaryIO | None = None) -> Image.Image:
    """Open and fully decode, so that a truncated file fails here and not later.

    `source` is the encoded image in memory (serving); `path` then only names it in errors.
    """
    try:
        with Image.open(path if source is None else source) as image:
            image.load()
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _cannot_read(path, exc) from exc


def _pixels(image: Image.Image) -> tuple[np.ndarray, float]:
    """Raw pixels as HxW (gray) or HxWx3 (colour), plus the value that means full white.

    Alpha is dropped rather than composited: inspection images carry no meaningful
    transparency, and compositing onto an arbitrary background would invent pixels.
    """
    mode = image.mode
    if mode in _TO_GRAY_MODES:
        image = image.convert("L")
    elif not (mode in _GRAY_MODES or mode.startswith("I;16") or mode == "RGB"):
        image = image.convert("RGB")
    pixels = np.asarray(image)
    if pixels.dtype not in _FULL_SCALE:
        raise TypeError(f"unexpected pixel type {pixels.dtype} from PIL mode {image.mode}")
    return pixels, _FULL_SCALE[pixels.dtype]


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to float32 HxWx3 in [0, 1].

    8-bit files are divided by 255 and 16-bit files by 65535, so that the same scene
    gives the same values whatever the bit depth. Gray images are repeated over three
    channels because the teachers are RGB networks. Float ("F") images must already be
    in [0, 1]: there is no safe guess of their range.
    """
    return _float_rgb(_decode(Path(path)), Path(path).absolute())


def read_image_bytes(data: bytes, name: str = "image") -> np.ndarray:
    """Decode an encoded image held in memory (PNG, JPEG, ... bytes) exactly like `read_image`.

    For serving, where images arrive as request bodies; `name` identifies it in errors.
    """
    return _float_rgb(_decode(name, io.BytesIO(data)), name)


def _float_rgb(decoded: Image.Image, where: object) -> np.ndarray:
    pixels, full_scale = _pixels(decoded)
    image = pixels.astype(np.float32) / np.float32(full_scale)
    if full_scale == 1.0 and image.size and not (image.min() >= 0.0 and image.max() <= 1.0):
        raise DataError(
            f"cannot read image {where}: float pixels span "
            f"[{image.min():g}, {image.max():g}], not [0, 1]. Save it as an 8- or 16-bit image."
        )
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    return np.ascontiguousarray(image)


def read_mask(path: Path) -> np.ndarray:
    """Decode a ground-truth mask to bool HxW (True = defect).

    Masks come as 0/255, 0/1, slightly off-white (JPEG-ish 250), 16-bit or RGB, so the
    threshold is half of the *value range*: when the mask's maximum is <= 1 it is a 0/1
    mask and 1 means defect (threshold 0.5); otherwise the threshold is half the dtype's
    full scale (127.5 for 8-bit, 32767.5 for 16-bit). A colour mask is defect where any
    channel is above the threshold, so a red-on-black mask counts.
    """
    pixels, full_scale = _pixels(_decode(Path(path)))
    if pixels.ndim == 3:
        pixels = pixels.max(axis=2)
    threshold = 0.5 if pixels.size and pixels.max() <= 1 else full_scale / 2.0
    return np.asarray(pixels > threshold, dtype=bool)


def image_size_of(path: Path) -> tuple[int, int]:
    """(width, height) read from the file header only, for cheap layout checks."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _cannot_read(Path(path), exc) from exc
