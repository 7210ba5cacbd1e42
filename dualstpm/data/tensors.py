"""From decoded arrays to fixed-size tensors, and whole file lists decoded once.

Images are resized to the model's input size without cropping (METHOD.md section 1), so
that the whole part stays in view and maps line up with the ground truth at any input size.
A size is one side (a square) or (height, width): `dualstpm.sizes`.
Normalisation is not done here: it belongs to the teacher (its own mean and std).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from dualstpm.config import DEFAULT_MAX_IMAGE_PIXELS
from dualstpm.data.images import LOSSY_MASK_MIN_CONTRAST, as_float_rgb, image_size_of, read_image, read_mask_file
from dualstpm.data.mvtec import Sample
from dualstpm.progress import stage
from dualstpm.sizes import ImageSize, describe, hw, to_json

T = TypeVar("T")


def resize_image(image: np.ndarray, size: ImageSize) -> torch.Tensor:
    """A decoded image -> (3, h, w) at `size` ((h, w), or an int side: a square), bilinear with
    antialiasing (no aliasing when shrinking large inspection images, which would add fake
    texture).

    `image` is `read_image`'s float32 HxWx3 in [0, 1], or `read_frame`'s 8-bit pixels (uint8
    HxW or HxWx3). An image already at `size` is returned as a view of it, no copy (a frame
    under tiling): float32, or uint8 (a gray frame's one plane seen three times) which the
    scoring divides by 255 a batch of tiles at a time (`dualstpm.model.inference.scale_images`),
    giving exactly the values of the float image. Any other is resized in float32."""
    if image.dtype == np.uint8 and tuple(image.shape[:2]) == hw(size):
        with warnings.catch_warnings():  # PIL's pixels are read-only; nothing writes into a frame
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            pixels = torch.from_numpy(image)
        return pixels.expand(3, *pixels.shape) if pixels.ndim == 2 else pixels.permute(2, 0, 1)
    tensor = torch.from_numpy(np.ascontiguousarray(as_float_rgb(image), dtype=np.float32)).permute(2, 0, 1)
    if tuple(tensor.shape[-2:]) == hw(size):  # already at size: a view, not a copy (a frame under tiling)
        return tensor
    resized = F.interpolate(tensor[None], size=hw(size), mode="bilinear",
                            antialias=True, align_corners=False)
    return resized[0].contiguous()


def resize_map(anomaly_map: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (h, w) anomaly map at the model's input size -> (H, W) float32 at an image's own
    `size` = (H, W), bilinear: how predict and the overlays show a map on its image."""
    tensor = torch.as_tensor(anomaly_map)[None, None].float()
    if tuple(tensor.shape[-2:]) == tuple(size):  # already at the image's size
        return tensor[0, 0].cpu().numpy()
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].cpu().numpy()


def resize_mask(mask: np.ndarray, size: ImageSize) -> torch.Tensor:
    """HxW bool -> (h, w) bool at `size` (an int side: a square): a pixel is defect when any
    source pixel of its footprint is.

    Area resampling (torch's "area", adaptive average pooling) followed by ``> 0`` is a
    max-pool over each target pixel's footprint, so a defect region never disappears,
    however thin or small (a 1-px scratch stays at least one pixel wide). The price is a
    border of up to one target pixel around regions, and neighbouring regions that may
    merge; nearest-neighbour resampling instead drops regions between sample points.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    resized = F.interpolate(tensor, size=hw(size), mode="area")
    return resized[0, 0] > 0


def _stack(items: Sequence[T], decode: Callable[[T], torch.Tensor], shape: tuple[int, ...],
           dtype: torch.dtype, description: str) -> torch.Tensor:
    """Decode every item once into one preallocated tensor (no list of copies)."""
    out = torch.empty((len(items), *shape), dtype=dtype)
    with stage(description, len(items)) as progress:
        for index, item in enumerate(items):
            out[index] = decode(item)
            progress.advance()
    return out


def image_shapes(paths: Sequence[Path], description: str = "reading image sizes") -> list[tuple[int, int]]:
    """(width, height) of each image file from its header (nothing decoded), with a progress
    stage: what the fit plans its input size and aspect note from. DataError naming the
    first file that cannot be read."""
    shapes = []
    with stage(description, len(paths)) as progress:
        for path in paths:
            shapes.append(image_size_of(path))
            progress.advance()
    return shapes


def decode_images(paths: Sequence[Path], size: ImageSize, description: str = "decoding images",
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """(N, 3, h, w) float32 in [0, 1] for a list of image files at `size`; DataError for a
    file above `max_pixels` pixels (pass ``data.max_image_pixels``)."""
    return _stack(paths, lambda path: resize_image(read_image(path, max_pixels), size),
                  (3, *hw(size)), torch.float32, description)


_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # regions as AUPRO counts them (metrics.py)


def _count_regions(mask: np.ndarray | torch.Tensor) -> int:
    return int(ndimage.label(np.asarray(mask), structure=_EIGHT_CONNECTED)[1])


@dataclass(frozen=True)
class GroundTruthReport:
    """What the ground truth of a test set holds, in the files and at the metric resolution.

    `empty_masks`: paths of defective images' masks without a single defect pixel.
    `regions`: 8-connected defect regions in the mask files; `regions_at_size`: at `size`
    px, where none is lost (see `resize_mask`) but neighbours closer than the footprint
    of a target pixel merge, so it can be smaller. `lossy_masks`: paths of masks saved in
    a lossy format with too little contrast to survive its compression
    (`MaskFile.compression_damaged`), and `lossy_formats` those formats.
    """

    size: ImageSize
    n_masks: int
    empty_masks: tuple[str, ...]
    regions: int
    regions_at_size: int
    lossy_masks: tuple[str, ...] = ()
    lossy_formats: tuple[str, ...] = ()

    def note(self) -> str | None:
        """One sentence per thing a reader of the pixel metrics must know; None when all is plain."""
        notes = []
        if self.lossy_masks:
            notes.append(f"{len(self.lossy_masks)} of {self.n_masks} defect masks are saved in a lossy format "
                         f"({', '.join(self.lossy_formats)}) with too little contrast to survive its compression "
                         f"(defect and background differ by less than {LOSSY_MASK_MIN_CONTRAST:.0%} of the file's "
                         f"range, e.g. 0/1): {_shown(self.lossy_masks)} (all in ground_truth.lossy_masks of "
                         "metrics.json); compression has moved defect pixels into the background and back, so the "
                         "pixel metrics are measured against altered masks. Save masks as PNG (lossless), "
                         "defect 255 on background 0")
        if self.empty_masks:
            notes.append(f"{len(self.empty_masks)} of {self.n_masks} defect masks are empty (no defect pixel): "
                         f"{_shown(self.empty_masks)}; their images count as defective for image metrics but add no "
                         "defect pixel")
        if self.regions_at_size == 0 and self.n_masks:
            notes.append("no test pixel is defect, so pixel AUROC and AUPRO are null")
        if self.regions_at_size < self.regions:
            notes.append(f"{self.regions - self.regions_at_size} of {self.regions} defect regions merged with a "
                         f"neighbour when masks were resized to {describe(self.size)} (none is lost: a pixel is defect "
                         "when any pixel of its footprint is)")
        return "; ".join(notes) or None

    def to_dict(self) -> dict:
        """JSON-ready: the counts, with the empty masks' paths."""
        return {"size": to_json(self.size), "n_masks": self.n_masks, "empty_masks": list(self.empty_masks),
                "regions": self.regions, "regions_at_size": self.regions_at_size,
                "lossy_masks": list(self.lossy_masks)}


def _shown(paths: Sequence[str], limit: int = 3) -> str:
    """The first `limit` of `paths`, comma-separated, with ", ..." when there are more."""
    return ", ".join(paths[:limit]) + (", ..." if len(paths) > limit else "")


def decode_masks(samples: Sequence[Sample], size: ImageSize,
                 max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[torch.Tensor, GroundTruthReport]:
    """(N, h, w) bool ground truth at `size`, and what it holds; a sample without a mask (good, or a
    category without ground_truth) is all False. Masks are resized by `resize_mask`. Masks
    that lossy compression has damaged (`MaskFile.compression_damaged`) are read as they
    are and listed in the report (its `note` says to save them as PNG)."""
    empty: list[str] = []
    lossy: dict[str, str] = {}  # path -> its lossy format
    counts = [0, 0]  # regions in the files, regions at `size`

    def decode(sample: Sample) -> torch.Tensor:
        if sample.mask_path is None:
            return torch.zeros(hw(size), dtype=torch.bool)
        read = read_mask_file(sample.mask_path, max_pixels)
        resized = resize_mask(read.mask, size)
        counts[0] += _count_regions(read.mask)
        counts[1] += _count_regions(resized)
        if not read.mask.any():
            empty.append(str(sample.mask_path))
        if read.compression_damaged:
            lossy[str(sample.mask_path)] = str(read.lossy)
        return resized

    masks = _stack(samples, decode, hw(size), torch.bool, "decoding masks")
    n_masks = sum(sample.mask_path is not None for sample in samples)
    return masks, GroundTruthReport(size, n_masks, tuple(empty), counts[0], counts[1], tuple(lossy),
                                    tuple(sorted(set(lossy.values()))))
