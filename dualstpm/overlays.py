"""Heat-map overlays an inspector can read: the one drawing function of every overlay.

`dualstpm predict`, the test figures (`RUN/plots/overlays*`), the ablation's redrawn
overlays (`RUN/ablation/overlays*`), the report and MLflow all show pictures drawn by
:func:`draw_overlay`, from the model's decision view (the detector's fused view, with an
applied chosen fusion) at the image's own size and aspect ratio.

The colour scale is fixed by the model, not by the picture (:class:`OverlayScale`):

- ``low``: the decision view's level at a typical good pixel, i.e. its value for six maps
  each at its validation mean (``calibration.json``'s ``map_stats``; the scorer's
  ``typical_level``, :meth:`dualstpm.model.inference.MapViews.typical_level`). At or below
  it the image is left untouched.
- ``threshold``: the model's decision threshold (a part is defective when its image score,
  the map's max, top-k mean or smoothed max: map units, is above it). Opacity grows
  linearly from 0 at ``low`` to :data:`OVERLAY_ALPHA` at the threshold and stays there above it.
- ``high`` = ``threshold + (threshold - low) / 2``: the top of the colour bar, so the
  threshold sits at two thirds of it (jet: yellow-orange; above it orange to dark red).

A threshold the user chooses instead (``dualstpm predict --threshold``) is the
``decision``: it labels the parts and is marked on the colour bar, while the colours keep
the model's scale, so pictures of one model always compare. Below the picture a band
carries the caption (name, score, label, decision threshold) and the colour bar.

Defect regions (``dualstpm predict`` on a model with a pixel threshold, docs/regions.md)
are outlined in magenta, each of the largest :data:`MAX_REGION_LABELS` labelled with its
area (mm² when the pixel scale is known, else image px); under a region rule the regions
below its minimum area are outlined in grey, and a caption line gives the count, the rule
and its verdict. The outline follows the region's map pixels, each drawn as the rectangle
of the image it covers (nearest-neighbour upscaling, as the regions' boxes are scaled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from dualstpm.data.images import as_float_rgb
from dualstpm.errors import RunError
from dualstpm.model.fusion import FusionSpec
from dualstpm.model.inference import Scorer
from dualstpm.model.regions import Region, RegionMap, RegionSpec

if TYPE_CHECKING:
    from dualstpm.detector import Detector

OVERLAY_ALPHA = 0.6
COLORMAP = "jet"
MIN_WIDTH = 256  # narrower images are enlarged for display, so the caption fits
MAX_SIDE = 2048  # larger images are shown smaller, so that an overlay stays a picture one can open
GRID_CELL_WIDTH = 320
GRID_GAP = 8
LABEL_COLOURS = {"defective": (190, 0, 40), "good": (0, 120, 0)}  # colours jet never has
REGION_COLOUR = (255, 0, 255)  # magenta: a defect region (jet never has it; white is the ground truth)
SMALL_REGION_COLOUR = (160, 160, 160)  # grey: a region below the region rule's minimum area
MAX_REGION_LABELS = 10  # regions labelled with their area, largest first


@dataclass(frozen=True)
class RegionsShown:
    """The defect regions of one image (`found`, at the map's resolution) and the spec that
    found them (its rule colours them, its scale gives their areas in mm²)."""

    found: RegionMap
    spec: RegionSpec

    def caption(self) -> str:
        """E.g. `rule region area >= 50 px: defective; 3 regions above pixel threshold 0.412`
        (the verdict first, so that a narrow picture's cut caption keeps it), or without a
        rule `3 regions above pixel threshold 0.412`."""
        n = len(self.found.regions)
        text = f"{n} region{'s' if n != 1 else ''} above pixel threshold {self.spec.pixel_threshold:.4g}"
        verdict = self.spec.verdict(self.found.regions)
        return text if verdict is None else f"rule {self.spec.rule_text()}: {verdict}; {text}"


@dataclass(frozen=True)
class OverlayScale:
    """The colour scale of a model's overlays, in fused-map units: low < threshold < high;
    `decision`, when given, is another threshold the labels were decided at."""

    low: float
    threshold: float
    decision: float | None = None

    @property
    def high(self) -> float:
        return self.threshold + (self.threshold - self.low) / 2

    @property
    def decided_at(self) -> float:
        """The threshold the labels were decided at: `decision`, else the model's."""
        return self.threshold if self.decision is None else self.decision

    @property
    def decision_on_bar(self) -> bool:
        """Whether that threshold lies on the colour bar, [low, high], to be marked there."""
        return self.low <= self.decided_at <= self.high

    @classmethod
    def of_level(cls, low: float, threshold: float, decision: float | None = None) -> OverlayScale:
        """The scale from the decision view's typical good level `low` (its map where every
        map is at its validation mean), the model's `threshold` and the `decision` threshold
        (default: it). Raises RunError when the model's threshold is not above `low` (its
        calibration is broken: every part would be flagged), naming both values."""
        if not threshold > low:
            raise RunError(f"the model's threshold {threshold:.6g} is not above the fused level of a typical good "
                           f"pixel ({low:.6g}) in its calibration.json: every part would be flagged; retrain it")
        return cls(low, float(threshold), None if decision is None else float(decision))

    def opacity(self, values: np.ndarray) -> np.ndarray:
        """0 at or below `low`, rising linearly to OVERLAY_ALPHA at the threshold, flat above."""
        return OVERLAY_ALPHA * np.clip((values - self.low) / (self.threshold - self.low), 0.0, 1.0)

    def colours(self, values: np.ndarray) -> np.ndarray:
        """RGB in [0, 1] of the colour map at `values` clipped to [low, high]; shape (..., 3)."""
        level = np.clip((values - self.low) / (self.high - self.low), 0.0, 1.0)
        return matplotlib.colormaps[COLORMAP](level)[..., :3]


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font, width: float) -> str:
    """`text`, cut with an ellipsis so that it is at most `width` px wide."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask (inside the mask, next to a pixel outside it)."""
    padded = np.pad(mask, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _area_text(region: Region) -> str:
    """A region's area for its label: mm² when known, else image px."""
    return f"{region.area_mm2:.3g} mm²" if region.area_mm2 is not None else f"{region.area_px:.0f} px"


def _draw_regions(pixels: np.ndarray, shown: RegionsShown) -> Image.Image:
    """`pixels` (the displayed overlay, (height, width, 3) uint8) with the regions outlined and
    the largest labelled with their areas (module docstring)."""
    height, width = pixels.shape[:2]
    labels = _nearest(shown.found.labels, (width, height))
    padded = np.pad(labels, 1, mode="edge")
    edge = (labels > 0) & ((padded[:-2, 1:-1] != labels) | (padded[2:, 1:-1] != labels)
                           | (padded[1:-1, :-2] != labels) | (padded[1:-1, 2:] != labels))
    small = [r.id for r in shown.found.regions if shown.spec.is_defect(r) is False]
    pixels = pixels.copy()
    pixels[edge] = REGION_COLOUR
    pixels[edge & np.isin(labels, small)] = SMALL_REGION_COLOUR
    picture = Image.fromarray(pixels)
    draw = ImageDraw.Draw(picture)
    font = _font(int(np.clip(width / 32, 10, 18)))
    image_h, image_w = shown.found.image_shape
    largest = sorted(shown.found.regions, key=lambda r: -r.map_pixels)[:MAX_REGION_LABELS]
    for region in largest:
        x0, y0 = region.bbox[0] * width / image_w, region.bbox[1] * height / image_h
        text = _area_text(region)
        box = draw.textbbox((0, 0), text, font=font)
        text_w, text_h = box[2] - box[0], box[3] - box[1]
        x = float(np.clip(x0, 0, max(width - text_w - 2, 0)))
        y = y0 - text_h - 3 if y0 - text_h - 3 >= 0 else y0 + 2  # above the box, else inside its top
        draw.rectangle((x, y, x + text_w + 2, y + text_h + 3), fill="black")
        colour = SMALL_REGION_COLOUR if shown.spec.is_defect(region) is False else REGION_COLOUR
        draw.text((x + 1, y + 1 - box[1]), text, fill=colour, font=font)
    return picture


def _nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) label array at `size` = (width, height), nearest neighbour: output pixel i
    takes source pixel floor((i + 0.5) * H / height), PIL's rule (which may round an exact
    integer down); sampled by index, so a
    frame-sized array is never copied."""
    rows = np.minimum(((np.arange(size[1]) + 0.5) * labels.shape[0] / size[1]).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum(((np.arange(size[0]) + 0.5) * labels.shape[1] / size[0]).astype(np.int64), labels.shape[1] - 1)
    return labels[np.ix_(rows, cols)]


def _resized(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """An image resized to `size` = (width, height): float (H, W) or (H, W, 3) channel by
    channel, 8-bit pixels (uint8 (H, W) or (H, W, 3)) as they are (no float copy of a frame)."""
    if array.dtype == np.uint8:
        return np.asarray(Image.fromarray(array).resize(size, resample))
    if array.ndim == 2:
        return np.asarray(Image.fromarray(np.asarray(array, dtype=np.float32), mode="F").resize(size, resample))
    return np.stack([_resized(array[..., c], size, resample) for c in range(array.shape[-1])], axis=-1)


def _resized_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) map resized to `size` = (width, height), bilinear, antialiased when shrinking
    (what PIL's bilinear does); torch reads the map in place, so a frame-sized map is not copied."""
    values = torch.from_numpy(np.asarray(anomaly_map, dtype=np.float32))[None, None]
    shrinking = size[0] < anomaly_map.shape[1] or size[1] < anomaly_map.shape[0]
    return F.interpolate(values, size=(size[1], size[0]), mode="bilinear", align_corners=False,
                         antialias=shrinking)[0, 0].numpy()


def _band(width: int, scale: OverlayScale, lines: Sequence[tuple[str, tuple[int, int, int]]]) -> Image.Image:
    """The caption lines and the colour bar (threshold marked) under a picture `width` px wide."""
    size = int(np.clip(width / 24, 11, 22))
    font, small = _font(size), _font(max(size - 3, 9))
    pad, line_h, bar_h = size // 2, int(size * 1.3), size
    height = pad + line_h * len(lines) + pad // 2 + bar_h + int(size * 1.2) + pad
    band = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(band)
    y = pad
    for text, colour in lines:
        draw.text((pad, y), _fit_text(draw, text, font, width - 2 * pad), fill=colour, font=font)
        y += line_h
    y += pad // 2
    x0, x1 = pad, width - pad
    values = np.linspace(scale.low, scale.high, x1 - x0)
    bar = (scale.colours(values) * 255).round().astype(np.uint8)
    band.paste(Image.fromarray(np.repeat(bar[None], bar_h, axis=0)), (x0, y))
    low_text, high_text = f"typical good {scale.low:.3g}", f"{scale.high:.3g}"
    mark = None
    if scale.decision_on_bar:
        mark = x0 + round((x1 - x0) * (scale.decided_at - scale.low) / (scale.high - scale.low))
        draw.rectangle((mark - 1, y - 3, mark + 1, y + bar_h + 2), fill="black")
    y += bar_h + 2
    draw.text((x0, y), low_text, fill="black", font=small)
    draw.text((x1, y), high_text, fill="black", font=small, anchor="ra")
    if mark is not None:  # centred under the mark, shifted clear of the end labels (left out if no room)
        free_from = x0 + draw.textlength(low_text, font=small) + 4
        free_to = x1 - draw.textlength(high_text, font=small) - 4
        label_w = draw.textlength("threshold", font=small)
        if free_to - free_from >= label_w:
            draw.text((float(np.clip(mark - label_w / 2, free_from, free_to - label_w)), y), "threshold",
                      fill="black", font=small)
    return band


def draw_overlay(image: np.ndarray, anomaly_map: np.ndarray, scale: OverlayScale, score: float,
                 label: str, title: str | None = None, mask: np.ndarray | None = None,
                 width: int | None = None, regions: RegionsShown | None = None) -> Image.Image:
    """The heat-map overlay of one image, with its caption and colour bar below it.

    image: (H, W, 3) float RGB in [0, 1] (`read_image`), or 8-bit pixels (`read_frame`: uint8
    (H, W) gray or (H, W, 3)); anomaly_map: (H, W) fused map of the decision
    view at the image's size; score and label: the image's decision; title: e.g. its
    name; mask: optional (h, w) ground truth at any size, outlined in white; width: the
    displayed width in px (default: the image's own, at least MIN_WIDTH, and at most what keeps
    the longer side within MAX_SIDE); regions: its
    defect regions, outlined with their areas and described in a caption line. The picture
    keeps the image's aspect ratio: its top `round(H * width / W)` rows are the overlay,
    pixel for pixel (a map at or below `scale.low` leaves the image unchanged), and the
    caption band follows. Returns an RGB PIL image.
    """
    height_in, width_in = anomaly_map.shape
    if image.shape[:2] != (height_in, width_in):
        raise ValueError(f"image {image.shape[:2]} and anomaly map {anomaly_map.shape} differ in size")
    width = width or min(max(width_in, MIN_WIDTH), max(1, round(width_in * MAX_SIDE / max(height_in, width_in))))
    height = max(1, round(height_in * width / width_in))
    if (width, height) != (width_in, height_in):
        image = _resized(image, (width, height), Image.Resampling.BILINEAR)
        anomaly_map = _resized_map(anomaly_map, (width, height))
    image = as_float_rgb(image)
    alpha = scale.opacity(anomaly_map)[..., None]
    blended = (1 - alpha) * np.clip(image, 0.0, 1.0) + alpha * scale.colours(anomaly_map)
    pixels = (blended * 255).round().astype(np.uint8)
    if mask is not None and mask.any():
        shown = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height),
                                                                              Image.Resampling.NEAREST)) > 127
        pixels[_outline(shown)] = 255
    lines = [(title, (0, 0, 0))] if title else []
    off_bar = "" if scale.decision_on_bar else ", off scale"
    lines.append((f"score {score:.4g}: {label} (threshold {scale.decided_at:.4g}{off_bar})",
                  LABEL_COLOURS.get(label, (0, 0, 0))))
    if regions is not None:
        verdict = regions.spec.verdict(regions.found.regions)
        lines.append((regions.caption(), LABEL_COLOURS.get(verdict, (0, 0, 0))))
    band = _band(width, scale, lines)
    picture = Image.new("RGB", (width, height + band.height), "white")
    picture.paste(_draw_regions(pixels, regions) if regions is not None else Image.fromarray(pixels), (0, 0))
    picture.paste(band, (0, height))
    return picture


def overlay_grid(pictures: Sequence[Image.Image], heading: str, columns: int = 4) -> Image.Image:
    """Pictures from :func:`draw_overlay` tiled `columns` to a row under a heading line,
    each at its own size (nothing is stretched); rows are as tall as their tallest picture."""
    if not pictures:
        raise ValueError("no pictures to tile")
    rows = [pictures[i : i + columns] for i in range(0, len(pictures), columns)]
    cell_w = max(p.width for p in pictures)
    font = _font(14)
    top = 2 * GRID_GAP + 16
    width = columns * cell_w + (columns + 1) * GRID_GAP
    heights = [max(p.height for p in row) for row in rows]
    grid = Image.new("RGB", (width, top + sum(heights) + len(rows) * GRID_GAP), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((GRID_GAP, GRID_GAP), _fit_text(draw, heading, font, width - 2 * GRID_GAP), fill="black", font=font)
    y = top
    for row, row_h in zip(rows, heights, strict=True):
        for k, picture in enumerate(row):
            grid.paste(picture, (GRID_GAP + k * (cell_w + GRID_GAP), y))
        y += row_h + GRID_GAP
    return grid


def overlay_scale(scorer: Scorer, threshold: float | None = None) -> OverlayScale:
    """The overlay scale of `scorer`'s decision view (a `Detector` or an export: its typical
    good level and threshold); `threshold` overrides the decision threshold only. Raises
    RunError as :meth:`OverlayScale.of_level` does."""
    return OverlayScale.of_level(scorer.typical_level(), scorer.threshold, threshold)


def decision_label(score: float, threshold: float) -> str:
    """`defective` when `score` is above `threshold` (the decision rule), else `good`."""
    return "defective" if score > threshold else "good"


def _weights(spec: FusionSpec) -> str:
    return ", ".join(f"{name} {'/'.join(f'{w:g}' for w in row)}" for name, row in zip(("A", "B"), spec.weights, strict=True))


def view_description(view: str, spec: FusionSpec, chosen_config: str | None = None) -> str:
    """What a decision view is, in words: `fused` (`spec`: the params' fusion), `chosen`
    (the ablation's `chosen_config`, fused by `spec`), one branch alone, the discriminative
    stage, or a memory view (said to be the ablation's choice when `chosen_config` names it)."""
    if view == "fused":
        return (f"fused view: {spec.mode} fusion, the trained model's fusion.* (level weights {_weights(spec)}, "
                f"normalize {spec.normalize}{f', sigma {spec.sigma:g} px' if spec.sigma else ''})")
    if view == "chosen":
        return f"chosen view: fusion {chosen_config or 'chosen'} chosen by `dualstpm ablate` ({spec.mode})"
    described = {"stpm": "stpm view: branch A (STPM) alone", "recon": "recon view: branch B (reconstruction) alone",
                 "disc": "disc view: the discriminative stage",
                 "memory": "memory view: distance to the nearest good patch of the memory bank (PatchCore on T1)",
                 "fused_memory": "fused_memory view: the fused and memory maps, each standardised, summed",
                 }.get(view, f"{view} view")
    return described + (" (chosen by `dualstpm ablate`)" if chosen_config == view else "")


def grid_heading(category: str, view: str, spec: FusionSpec, threshold: float, score_label: str,
                 chosen_config: str | None = None) -> str:
    """The heading of an overlay grid: the category, the decision view (:func:`view_description`),
    the threshold in image-score units (`score_label`, e.g. ``topk_mean(topk=0.01)``) and the legend."""
    return (f"{category}: {view_description(view, spec, chosen_config)}; threshold {threshold:.4g} "
            f"on the image score {score_label}; white outline: ground truth")


def detector_heading(detector: Detector, category: str) -> str:
    """:func:`grid_heading` of `detector`'s decision view, on test images of `category`."""
    chosen = detector.chosen.source.get("config") if detector.chosen else None
    return grid_heading(category, detector.decision_view, detector.spec, detector.threshold,
                        detector.score_spec.label, chosen)
