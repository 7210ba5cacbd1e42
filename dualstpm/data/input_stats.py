"""What the camera saw, in two numbers per image: the input statistics that monitoring
compares with the training images (`dualstpm.monitor`, the *input drift* test).

A lighting change (a lamp ageing, a new supplier's finish, an open door) moves these
before, or without, moving the anomaly scores: a darker, flatter image can even score
*lower*. And the training images are many where the validation scores, the score drift
test's reference, are few (5 on a category of 30 good images).

Both statistics are of the luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601) of the
decoded image (`dualstpm.data.images.read_image`: float RGB in [0, 1], at the image's own
size, before any resize):

- ``brightness``: the mean of Y, in [0, 1];
- ``contrast``: the standard deviation of Y, the RMS contrast (E. Peli, "Contrast in
  complex images", JOSA A 7(10), 1990), in [0, 0.5].
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dualstpm.data.images import as_float_rgb, read_image

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B
INPUT_STATISTICS = ("brightness", "contrast")
LUMA_BLOCK = 2**20  # pixels converted to float64 at a time
MAX_REFERENCE = 1000  # values kept per statistic: the empirical quantiles beyond that many images


def image_statistics(image: np.ndarray) -> dict[str, float]:
    """``{"brightness", "contrast"}`` of a decoded image (module docstring): `read_image`'s float
    HxWx3 in [0, 1], or `read_frame`'s 8-bit pixels (uint8 HxW or HxWx3), which give the same
    figures as their float image. The luma is made a block of rows at a time (LUMA_BLOCK
    pixels), in two passes (the mean, then the deviations from it), so a large frame needs no
    frame-sized float copy. Raises ValueError for an array that is neither."""
    image = np.asarray(image)
    if not (image.ndim == 3 and image.shape[2] == 3 or image.ndim == 2 and image.dtype == np.uint8):
        raise ValueError(f"expected an HxWx3 image (or HxW 8-bit gray pixels), got shape {image.shape}")
    step = max(1, LUMA_BLOCK // max(1, image.shape[1]))

    def lumas() -> Iterator[np.ndarray]:  # float64 luma of each block of rows, as read_image's pixels give it
        for start in range(0, len(image), step):
            yield as_float_rgb(image[start : start + step]).astype(np.float64) @ np.asarray(LUMA)

    n = image.shape[0] * image.shape[1]
    mean = sum(luma.sum() for luma in lumas()) / n
    deviation = sum(np.square(luma - mean).sum() for luma in lumas()) / n
    return {"brightness": float(mean), "contrast": float(np.sqrt(deviation))}


def input_reference(paths: Sequence[Path], max_pixels: int) -> dict[str, Any]:
    """The training side of the input drift test: each statistic of the good images `paths`
    (read as `read_image` reads them, so `max_pixels` as in ``data.max_image_pixels``),
    sorted, rounded to 6 decimals; beyond `MAX_REFERENCE` images, that many of their
    empirical quantiles (evenly spaced), so a large category keeps a small calibration.json.
    Stored in ``calibration.json`` as ``input_reference``. Raises DataError for an
    unreadable image."""
    values = {name: [] for name in INPUT_STATISTICS}
    for path in paths:
        for name, value in image_statistics(read_image(path, max_pixels)).items():
            values[name].append(value)
    kept = {}
    for name, found in values.items():
        ordered = np.sort(np.asarray(found, dtype=np.float64))
        if len(ordered) > MAX_REFERENCE:
            ordered = np.quantile(ordered, np.linspace(0.0, 1.0, MAX_REFERENCE))
        kept[name] = [round(float(v), 6) for v in ordered]
    return {"what": "luma mean (brightness) and standard deviation (contrast) of the good images the model "
                    "trained and calibrated on (dualstpm.data.input_stats)",
            "images": len(paths), **kept}
