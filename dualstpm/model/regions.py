"""Defect regions: an anomaly map and a pixel threshold in, connected defect regions out.

Pure functions and small records (numpy and scipy only, no files, no params object): what
`dualstpm predict`, `dualstpm test`, the MLflow model and every exported deployment run on
the decision view's anomaly map, so all find the same regions (docs/regions.md).

- **Defect mask**: a pixel is defective when its map value is strictly above the pixel
  threshold (``map > pixel_threshold``, the image decision's rule for pixels); the threshold
  is calibrated on good pixels (:func:`dualstpm.model.calibration.calibrate_pixel_threshold`).
- **Regions**: the mask's 8-connected components (``scipy.ndimage.label`` with a 3x3
  structure of ones: pixels touching by an edge or a corner are one region, as MVTec AD's
  ``compute_pro`` labels its ground truth). Region ids are the labels, 1, 2, ... in raster
  order of each region's first pixel (top row first, left to right).
- **Coordinates**: the map is at the model's resolution (h, w), the image at its own (H, W).
  Map pixel (r, c) covers the image's rectangle ``[c * W/w, (c+1) * W/w) x [r * H/h, (r+1) * H/h)``
  (the area rule of the resize, no crop). So a region's bounding box
  ``[x0, y0, x1, y1]`` (half-open: x0 <= x < x1, as a slice or PIL's box) is its map box
  scaled by W/w and H/h, rounded outwards to whole image pixels (floor for x0, y0; ceil for x1,
  y1: the box covers every image pixel the region touches); its centroid is the mean of its
  map pixels' centres in image pixel coordinates (pixel (0, 0)'s centre is (0, 0)):
  ``x = (c_mean + 0.5) * W/w - 0.5``, likewise y; its area in image pixels is its number of
  map pixels times ``(W * H) / (w * h)`` (exact, not rounded), and in mm² that times
  ``mm_per_px ** 2``.
- **Peak and mean**: the largest and the mean map value over the region's map pixels (raw
  map units, those of the pixel threshold).
- **Acceptance rule** (:class:`RegionSpec`): with ``min_area_px`` (or ``min_area_mm2``) set,
  a part is defective exactly when at least one region has an area >= it; without a rule
  the image score's threshold decides, and regions only describe where.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

#: 8-connectivity: a 3x3 structure of ones
CONNECTIVITY = 8
_STRUCTURE = np.ones((3, 3), dtype=bool)
DEFECTIVE, GOOD = "defective", "good"


@dataclass(frozen=True)
class Region:
    """One connected defect region, in the original image's pixel coordinates (module docstring).

    Attributes:
        id: its label, 1-based, raster order of its first map pixel.
        map_pixels: its size in map pixels (model resolution).
        area_px: its area in image pixels, map_pixels * (W * H) / (w * h).
        area_mm2: area_px * mm_per_px ** 2; None without a pixel scale.
        bbox: (x0, y0, x1, y1) half-open box in image pixels.
        centroid: (x, y) mean of its pixel centres in image pixel coordinates.
        peak: the largest map value in it; mean: the mean map value in it (raw map units).
    """

    id: int
    map_pixels: int
    area_px: float
    area_mm2: float | None
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    peak: float
    mean: float

    def to_json(self) -> dict:
        """Its fields as JSON values (lists for the box and the centroid)."""
        return {"region": self.id, "area_px": self.area_px, "area_mm2": self.area_mm2, "map_pixels": self.map_pixels,
                "bbox": list(self.bbox), "centroid": list(self.centroid), "peak": self.peak, "mean": self.mean}


@dataclass(frozen=True)
class RegionMap:
    """The regions of one anomaly map: `labels` (h, w) int32 at the map's resolution (0 =
    no defect, k = the region with id k), `regions` in id order, and `image_shape` (H, W)
    the original image's size their coordinates are in."""

    labels: np.ndarray
    regions: tuple[Region, ...]
    image_shape: tuple[int, int]

    @property
    def mask(self) -> np.ndarray:
        """(h, w) bool: the binary defect mask."""
        return self.labels > 0


def defect_mask(anomaly_map: np.ndarray, pixel_threshold: float) -> np.ndarray:
    """(h, w) anomaly map -> (h, w) bool defect mask, ``map > pixel_threshold``."""
    return np.asarray(anomaly_map) > pixel_threshold


def _outward(start: int, stop: int, size: int, map_size: int) -> tuple[int, int]:
    """Map pixels [start, stop) -> the image pixels they cover, [floor(start * s), ceil(stop * s))
    with s = size / map_size, in exact integer arithmetic."""
    return (start * size) // map_size, -((-stop * size) // map_size)


def find_regions(anomaly_map: np.ndarray, pixel_threshold: float, image_shape: tuple[int, int] | None = None,
                 mm_per_px: float | None = None) -> RegionMap:
    """The 8-connected regions of ``anomaly_map > pixel_threshold`` (module docstring).

    Args:
        anomaly_map: (h, w) float map at the model's resolution (raw units).
        pixel_threshold: in the map's units; a pixel strictly above it is defective.
        image_shape: (H, W) of the original image the coordinates and areas refer to;
            None = the map's own (h, w).
        mm_per_px: image pixel side in mm, for `area_mm2`; None = no mm² area.
    Raises ValueError for a map that is not 2-D, holds NaN or inf, an image shape that is
    not two positive sizes, or a non-positive `mm_per_px`.
    """
    values = np.asarray(anomaly_map)
    if values.ndim != 2:
        raise ValueError(f"an anomaly map is (h, w), got shape {values.shape}")
    if values.size and not (np.isfinite(values.max()) and np.isfinite(values.min())):  # NaN spreads: no frame-sized mask
        raise ValueError("the anomaly map holds NaN or inf: regions need finite map values")
    h, w = values.shape
    height, width = (h, w) if image_shape is None else (int(image_shape[0]), int(image_shape[1]))
    if height < 1 or width < 1:
        raise ValueError(f"image shape {image_shape} is not two positive sizes (H, W)")
    if mm_per_px is not None and not mm_per_px > 0:
        raise ValueError(f"mm_per_px={mm_per_px} must be > 0 (mm per image pixel)")
    labels, count = ndimage.label(defect_mask(values, pixel_threshold), structure=_STRUCTURE)
    labels = labels.astype(np.int32, copy=False)
    if count == 0:
        return RegionMap(labels, (), (height, width))
    pixel_area = (width * height) / (w * h)
    regions = []
    for k, box in enumerate(ndimage.find_objects(labels)):  # each region's statistics within its box only
        rows, cols = box
        inside = labels[box] == k + 1  # no other frame-sized copy: a region may span the frame
        per_row, per_col = inside.sum(axis=1), inside.sum(axis=0)
        size = int(per_row.sum())
        x0, x1 = _outward(cols.start, cols.stop, width, w)
        y0, y1 = _outward(rows.start, rows.stop, height, h)
        # the mean map-pixel centre, in exact integer sums
        row_mean = int(per_row @ np.arange(rows.start, rows.stop)) / size
        col_mean = int(per_col @ np.arange(cols.start, cols.stop)) / size
        area_px = float(size) * pixel_area
        regions.append(Region(
            id=k + 1, map_pixels=size, area_px=area_px,
            area_mm2=None if mm_per_px is None else area_px * mm_per_px**2,
            bbox=(int(x0), int(y0), int(x1), int(y1)),
            centroid=(float((col_mean + 0.5) * width / w - 0.5), float((row_mean + 0.5) * height / h - 0.5)),
            peak=float(np.max(values[box], where=inside, initial=-np.inf)),
            mean=float(np.sum(values[box], where=inside, dtype=np.float64) / size),
        ))
    return RegionMap(labels, tuple(regions), (height, width))


@dataclass(frozen=True)
class RegionSpec:
    """How a model finds regions and, with a rule, decides with them.

    Attributes:
        pixel_threshold: the decision view's pixel threshold (raw map units).
        pixel_fpr: the good-pixel false-positive rate it was calibrated for (a record).
        mm_per_px: image pixel side in mm (`data.mm_per_px`); None = unknown.
        min_area_px / min_area_mm2: the acceptance rule (`decision.*`), at most one set.
    Raises ValueError for both rules at once, or an mm² rule without `mm_per_px`.
    """

    pixel_threshold: float
    pixel_fpr: float | None = None
    mm_per_px: float | None = None
    min_area_px: float | None = None
    min_area_mm2: float | None = None

    def __post_init__(self) -> None:
        if self.min_area_px is not None and self.min_area_mm2 is not None:
            raise ValueError("a region rule is in px or in mm², not both")
        if self.min_area_mm2 is not None and self.mm_per_px is None:
            raise ValueError("a region rule in mm² needs mm_per_px")

    @property
    def has_rule(self) -> bool:
        """Whether an acceptance rule decides the part (else the image score does)."""
        return self.min_area_px is not None or self.min_area_mm2 is not None

    @property
    def area_unit(self) -> str:
        """`mm2` for an mm² rule, else `px`: the unit of :meth:`area` and :meth:`largest_area`."""
        return "mm2" if self.min_area_mm2 is not None else "px"

    def find(self, anomaly_map: np.ndarray, image_shape: tuple[int, int] | None = None) -> RegionMap:
        """:func:`find_regions` of `anomaly_map` at this threshold and scale."""
        return find_regions(anomaly_map, self.pixel_threshold, image_shape, self.mm_per_px)

    def area(self, region: Region) -> float:
        """A region's area in the rule's unit (`area_unit`)."""
        return region.area_mm2 if self.area_unit == "mm2" else region.area_px

    def largest_area(self, regions: tuple[Region, ...]) -> float:
        """The largest region's area in the rule's unit; 0 without regions (a region-based image score)."""
        return max((self.area(r) for r in regions), default=0.0)

    def is_defect(self, region: Region) -> bool | None:
        """Whether the region alone makes the part defective (area >= the rule's minimum);
        None without a rule."""
        if not self.has_rule:
            return None
        minimum = self.min_area_mm2 if self.area_unit == "mm2" else self.min_area_px
        return self.area(region) >= minimum

    def verdict(self, regions: tuple[Region, ...]) -> str | None:
        """`defective` when a region meets the rule, else `good`; None without a rule (the
        image score's label stands)."""
        if not self.has_rule:
            return None
        return DEFECTIVE if any(self.is_defect(r) for r in regions) else GOOD

    def rule_text(self) -> str:
        """The rule in words, e.g. `region area >= 50 px`; `no region rule` without one."""
        if not self.has_rule:
            return "no region rule"
        return (f"region area >= {self.min_area_mm2:g} mm²" if self.area_unit == "mm2"
                else f"region area >= {self.min_area_px:g} px")

    def to_json(self) -> dict:
        """What an export's metadata records (read back by :meth:`from_json`)."""
        return {"pixel_threshold": self.pixel_threshold, "pixel_fpr": self.pixel_fpr, "mm_per_px": self.mm_per_px,
                "min_defect_area_px": self.min_area_px, "min_defect_area_mm2": self.min_area_mm2,
                "connectivity": CONNECTIVITY, "function": "dualstpm.model.regions.find_regions"}

    @classmethod
    def from_json(cls, data: dict) -> RegionSpec:
        """From :meth:`to_json`'s record. Raises KeyError, TypeError or ValueError for a bad one."""
        def number(key: str) -> float | None:
            return None if data.get(key) is None else float(data[key])

        return cls(float(data["pixel_threshold"]), number("pixel_fpr"), number("mm_per_px"),
                   number("min_defect_area_px"), number("min_defect_area_mm2"))
