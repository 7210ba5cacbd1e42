"""Reading one image or mask file into a numpy array, whatever its format.

Inspection datasets mix PNG and JPEG, grayscale and colour, 8- and 16-bit files. Every
caller gets the same thing back (float RGB in [0, 1], or a bool mask), and every file
that cannot be decoded becomes a :class:`DataError` naming that file, so that a damaged
image stops a run with a message instead of a traceback.

Image size is limited by ``data.max_image_pixels`` (passed explicitly as `max_pixels`), not
by PIL's process-wide ``Image.MAX_IMAGE_PIXELS``: headers are read with PIL's guard lifted
under a lock that restores it, the size is checked here, and only images beyond PIL's own
limit are decoded with the guard lifted (:func:`_pil_guard_lifted`).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from dualstpm.config import DEFAULT_MAX_IMAGE_PIXELS
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


def is_hidden(name: str) -> bool:
    """True for a hidden file or folder name (``.DS_Store``, ``.ipynb_checkpoints``, ``._x.png``)."""
    return name.startswith(".")


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image suffix: hidden files (``.DS_Store``, editor
    droppings) and notes next to the images are not data."""
    return (
        not is_hidden(path.name)
        and path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
    )


def list_images(folder: Path, *, recursive: bool = False) -> list[Path]:
    """The image files of `folder` sorted by path: the one listing rule of every reader.

    Hidden files are skipped, and with `recursive` so is everything inside a hidden
    sub-folder (``.ipynb_checkpoints/``, ``.git/``, ``.thumbnails/``); `folder` itself is
    taken as given even when hidden. Symlinked sub-folders are not followed (no cycles).
    Empty when `folder` is not a folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if not recursive:
        return sorted(p for p in folder.iterdir() if is_image_file(p))
    found: list[Path] = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden(d)]  # pruned: never descended into
        found.extend(p for p in map(Path(parent).joinpath, files) if is_image_file(p))
    return sorted(found)


REPLACE_FILE = "Replace or remove the file (it may be truncated, still being copied, or not an image)."
SEND_IMAGE_FILE = "Pass the bytes of an image file (PNG, JPEG, BMP, TIFF), as read from the file."
# How base64 text of a PNG or a JPEG file begins: bytes encoded twice, or sent as text.
_BASE64_IMAGE_STARTS = (b"iVBORw0KGgo", b"/9j/")


def _cannot_read(path: Path | str, reason: object, fix: str = REPLACE_FILE) -> DataError:
    """The error for an image that cannot be decoded: where it is (a file's absolute path,
    or the name given to bytes in memory), why, and `fix` (what to do about it)."""
    where = Path(path).absolute() if isinstance(path, Path) else path
    return DataError(f"cannot read image {where}: {reason}. {fix}")


def _undecodable_bytes(exc: Exception, data: bytes) -> str:
    """Why in-memory `data` is not an image, without PIL's ``<_io.BytesIO object at 0x...>``:
    what it starts with (and when that is base64 text of an image, that it was encoded twice)."""
    if not isinstance(exc, UnidentifiedImageError):
        return f"{exc} ({len(data)} bytes)"
    reason = f"not an image file that PIL can decode ({len(data)} bytes, starting {data[:16]!r})"
    if data.lstrip().startswith(_BASE64_IMAGE_STARTS):
        reason += ", which is base64 text of an image: decode it once more, or encode the file's bytes only once"
    return reason


_PIL_GUARD = threading.Lock()


@contextlib.contextmanager
def _pil_guard_lifted() -> Iterator[int | None]:
    """Lift PIL's process-wide decompression-bomb guard, and put it back on exit; yields
    the limit that was in force (None: none).

    ``Image.MAX_IMAGE_PIXELS`` is a module global: the lock keeps this module's readers
    (threads of a Prefect flow, a serving process) from restoring each other's saved
    value. It is held only while a header is parsed, and while an image already checked
    against `max_pixels` but larger than PIL's own limit is decoded, so other code in
    the process sees the guard lifted only for those moments.
    """
    with _PIL_GUARD:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield saved
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _too_large(where: object, size: tuple[int, int], max_pixels: int) -> DataError:
    width, height = size
    suggestion = 1 << math.ceil(math.log2(width * height))  # next power of two: room for the next frame too
    return DataError(
        f"image {where} is {width} x {height} = {width * height} pixels, above the limit "
        f"data.max_image_pixels = {max_pixels}. The file is not corrupt: the limit guards against "
        f"decompression bombs and memory exhaustion. If images this large are expected, raise it: "
        f"--set data.max_image_pixels={suggestion} (or in params.yaml)."
    )


def _decode(path: Path | str, data: bytes | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
            fix: str = SEND_IMAGE_FILE) -> Image.Image:
    """Open and fully decode, so that a truncated file fails here and not later.

    `data` is the encoded image in memory (serving); `path` then only names it in errors,
    which end with `fix` (a file's errors say to replace or remove it). Raises DataError
    for an undecodable image, and for one above `max_pixels` (width x height) before any
    pixel is decoded.
    """
    where = Path(path).absolute() if isinstance(path, Path) else path
    try:
        with _pil_guard_lifted() as pil_limit:  # read under the lock: never another reader's None
            image = Image.open(path if data is None else io.BytesIO(data))  # header only
        with image:
            pixels = image.size[0] * image.size[1]
            if pixels > max_pixels:
                raise _too_large(where, image.size, max_pixels)
            beyond_pil = pil_limit is not None and pixels > pil_limit
            with _pil_guard_lifted() if beyond_pil else contextlib.nullcontext():
                image.load()  # some formats (TIFF, GIF) check PIL's guard again while decoding
            return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        if data is None:
            raise _cannot_read(path, exc) from exc
        raise _cannot_read(path, _undecodable_bytes(exc, data), fix) from exc


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


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file to float32 HxWx3 in [0, 1].

    8-bit files are divided by 255 and 16-bit files by 65535, so that the same scene
    gives the same values whatever the bit depth. Gray images are repeated over three
    channels because the teachers are RGB networks. Float ("F") images must already be
    in [0, 1]: there is no safe guess of their range. Raises DataError for an unreadable
    file or one of more than `max_pixels` pixels (pass ``data.max_image_pixels``).
    """
    return _float_rgb(_decode(Path(path), max_pixels=max_pixels), Path(path).absolute())


def read_image_bytes(data: bytes, name: str = "image", max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                     fix: str = SEND_IMAGE_FILE) -> np.ndarray:
    """Decode an encoded image held in memory (PNG, JPEG, ... bytes) exactly like `read_image`.

    For serving, where images arrive as request bodies: `name` identifies it in errors
    (e.g. the request's column and row) and `fix` says what to send instead. Raises
    DataError naming `name` for bytes that are not an image file (saying what they start
    with, never PIL's in-memory buffer) or an image above `max_pixels` pixels.
    """
    return _float_rgb(_decode(name, data, max_pixels, fix), name)


def read_frame(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file for scoring, keeping 8-bit pixels as they are: an 8-bit file gives
    its uint8 pixels, HxW (gray) or HxWx3 (colour), 1 or 3 bytes per pixel instead of
    `read_image`'s 12; any other file gives `read_image`'s float32 HxWx3 array.

    `as_float_rgb` turns either into exactly `read_image`'s array (a block of rows at a time
    if need be), and every consumer of `dualstpm predict` (the scoring, the input statistics,
    the overlay) takes either: so a large 8-bit frame is held once, as bytes. Raises as
    `read_image`.
    """
    pixels, full_scale = _pixels(_decode(Path(path), max_pixels=max_pixels))
    if pixels.dtype == np.uint8:
        return pixels
    return as_float_rgb(_in_range(pixels, full_scale, Path(path).absolute()), full_scale)


def as_float_rgb(pixels: np.ndarray, full_scale: float | None = None) -> np.ndarray:
    """Pixels (HxW gray or HxWx3) / `full_scale` as float32 HxWx3: `read_image`'s array.

    `full_scale` None takes what `read_frame` returns: uint8 pixels are divided by 255, a
    float32 HxWx3 image is returned as it is. The result is written straight into place (a
    gray frame is converted once and copied to the other two channels: no intermediate
    frame-sized array).
    """
    if full_scale is None:
        if pixels.dtype != np.uint8:
            return pixels
        full_scale = 255.0
    image = np.empty((*pixels.shape[:2], 3), dtype=np.float32)
    if pixels.ndim == 2:
        np.divide(pixels, np.float32(full_scale), out=image[..., 0], dtype=np.float32)
        image[..., 1] = image[..., 0]
        image[..., 2] = image[..., 0]
    else:
        np.divide(pixels, np.float32(full_scale), out=image, dtype=np.float32)
    return image


def _in_range(pixels: np.ndarray, full_scale: float, where: object) -> np.ndarray:
    """`pixels` as they are; DataError naming `where` for float pixels outside [0, 1]."""
    if full_scale == 1.0 and pixels.size and not (pixels.min() >= 0.0 and pixels.max() <= 1.0):
        raise DataError(
            f"cannot read image {where}: float pixels span "
            f"[{pixels.min():g}, {pixels.max():g}], not [0, 1]. Save it as an 8- or 16-bit image."
        )
    return pixels


def _float_rgb(decoded: Image.Image, where: object) -> np.ndarray:
    """A decoded image's pixels / full scale as float32 HxWx3 (`as_float_rgb`); DataError for
    float pixels outside [0, 1]."""
    pixels, full_scale = _pixels(decoded)
    return as_float_rgb(_in_range(pixels, full_scale, where), full_scale)


# Three or more values within this many levels are class indices (0 background, 1, 2, ...
# defect classes): grey-level masks, antialiased or lossy, span the 8- or 16-bit range.
_CLASS_INDEX_LEVELS = 16


def _foreground(planes: list[np.ndarray]) -> np.ndarray:
    """Defect pixels of a mask given as intensity planes (colour, and alpha when present).

    A plane whose values vary is split halfway between its lowest and highest value
    present (a class-index map: above its lowest value); a pixel is defect when it is
    above that in every varying plane. When no plane varies, the mask is all defect if
    every plane is non-zero, else empty.
    """
    varying = [plane for plane in planes if plane.size and plane.min() != plane.max()]
    if not varying:
        shape = planes[0].shape
        return np.full(shape, all(plane.size and plane.max() > 0 for plane in planes), dtype=bool)
    mask = np.ones(varying[0].shape, dtype=bool)
    for plane in varying:
        low, high = float(plane.min()), float(plane.max())
        class_map = high - low < _CLASS_INDEX_LEVELS and np.unique(plane).size > 2
        mask &= plane > (low if class_map else (low + high) / 2.0)
    return mask


# Lossy compression moves a pixel by a few levels, more at edges: a mask whose defect and
# background differ by less than half the file's range (128 of 255 levels) cannot be told
# apart from that noise (a 0/1 mask saved as JPEG comes back as 0 to 3 where it was 0 or 1,
# or all 0 at PIL's default quality).
LOSSY_MASK_MIN_CONTRAST = 0.5
# PIL formats that are always (or, for JPEG 2000 and AVIF/HEIF, nearly always: PIL does not
# say whether a file was saved reversibly) lossy; WebP and TIFF are decided per file.
_LOSSY_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "JPEG2000": "JPEG 2000", "AVIF": "AVIF", "HEIF": "HEIF"}
_LOSSY_TIFF_COMPRESSIONS = ("jpeg", "tiff_jpeg")


def _webp_is_lossy(path: Path) -> bool:
    """True when the WebP file's image chunk is ``VP8 `` (lossy), False for ``VP8L``
    (lossless), walking the RIFF chunks (an extended file has ``VP8X``, ``ALPH``, ... first)."""
    with open(path, "rb") as handle:
        handle.seek(12)  # "RIFF", size, "WEBP"
        while len(header := handle.read(8)) == 8:
            kind, size = header[:4], struct.unpack("<I", header[4:])[0]
            if kind in (b"VP8 ", b"VP8L"):
                return kind == b"VP8 "
            handle.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to an even size
    return True  # no image chunk found: PIL decoded it anyway; do not vouch for it


def lossy_format(image: Image.Image, path: Path) -> str | None:
    """The lossy format `image` (opened from `path`) was decoded from: ``JPEG``, ``lossy
    WebP``, ``TIFF with JPEG compression``, ``JPEG 2000``, ``AVIF`` or ``HEIF``; None for a
    lossless one (PNG, BMP, GIF, lossless WebP, TIFF without JPEG compression). Decided by
    the file's content as PIL reads it, not its suffix."""
    if image.format in _LOSSY_FORMATS:
        return _LOSSY_FORMATS[image.format]
    if image.format == "WEBP":
        return "lossy WebP" if _webp_is_lossy(path) else None
    if image.format == "TIFF" and str(image.info.get("compression", "")).lower() in _LOSSY_TIFF_COMPRESSIONS:
        return "TIFF with JPEG compression"
    return None


@dataclass(frozen=True)
class MaskFile:
    """A decoded mask file and what its encoding can be trusted with.

    `mask`: bool HxW (see `read_mask`). `lossy`: the lossy format of the file
    (`lossy_format`), None when lossless. `contrast`: the brightness (brightest channel)
    between the darkest and the brightest value present, as a fraction of the file's full
    scale (a mask holding one value: that value), in [0, 1].
    """

    path: Path
    mask: np.ndarray
    lossy: str | None
    contrast: float

    @property
    def compression_damaged(self) -> bool:
        """True when the file is lossy and its contrast is below `LOSSY_MASK_MIN_CONTRAST`:
        what compression moved cannot be told from defect, and was lost for good (a 0/1
        mask saved as JPEG); a 0/255 mask keeps its defect pixels through compression."""
        return self.lossy is not None and self.contrast < LOSSY_MASK_MIN_CONTRAST


def read_mask(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """`read_mask_file`'s bool HxW mask (True = defect; bright and opaque = defect)."""
    return read_mask_file(path, max_pixels).mask


def read_mask_file(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> MaskFile:
    """Decode a ground-truth mask to bool HxW (True = defect; bright and opaque = defect),
    with its format's lossiness and its contrast (`MaskFile`).

    Foreground is decided from the values actually present, not from the file's bit
    depth: the threshold is halfway between the lowest and the highest value in the mask.
    That reads every convention alike (0/1, 0/255, 0/65535, 16-bit files holding 0/255,
    1-bit), does not depend on how small the defect is (Otsu's threshold drifts into the
    background's noise when one class is a few pixels), and ignores compression noise
    smaller than half the contrast (JPEG masks). Colour masks (RGB, and palette masks
    through their colours, not their indices) are defect where the brightest channel is
    above the threshold, so red-on-black counts. With an alpha channel, transparent pixels
    are background: where alpha varies a pixel must also be above alpha's halfway value
    (a constant colour with a varying alpha, e.g. strokes on a transparent layer, is
    decided by alpha alone). A mask holding a single value is empty when that value
    (or its alpha) is 0, and all defect otherwise (a wholly defective part). A class-index
    map (three or more values spanning fewer than 16 levels, e.g. 0 background, 1 scratch,
    2 dent) counts every class above the lowest value as defect. Raises
    DataError for an unreadable file or one above `max_pixels` pixels.

    A mask in a lossy format (JPEG, lossy WebP, ...) whose contrast is below
    `LOSSY_MASK_MIN_CONTRAST` is read all the same, and marked `compression_damaged`: the
    callers report it (`decode_masks`).
    """
    image = _decode(Path(path), max_pixels=max_pixels)
    lossy = lossy_format(image, Path(path))
    if image.mode in ("P", "PA", "RGBa", "La"):  # palette indices are not brightness; premultiplied alpha
        image = image.convert("LA" if image.mode == "La" else "RGBA")
    alpha = np.asarray(image.getchannel("A")) if "A" in image.getbands() else None
    pixels, full_scale = _pixels(image)
    if pixels.ndim == 3:
        pixels = pixels.max(axis=2)
    low, high = (float(pixels.min()), float(pixels.max())) if pixels.size else (0.0, 0.0)
    contrast = (high - low if high > low else high) / full_scale
    mask = _foreground([pixels] if alpha is None else [pixels, alpha])
    return MaskFile(Path(path), mask, lossy, contrast)


def image_size_of(path: Path) -> tuple[int, int]:
    """(width, height) read from the file header only, for cheap layout checks (any size:
    nothing is decoded, so PIL's decompression-bomb guard does not apply)."""
    try:
        with _pil_guard_lifted(), Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _cannot_read(Path(path), exc) from exc
