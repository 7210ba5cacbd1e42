"""Real validation defects as evidence: decoded once, scored per epoch and per view.

A category may hold real defective parts for validation (``validation/<defect_type>/``,
masks optional in ``validation_ground_truth/``: `Category.validation_defects`; `dualstpm
feedback apply` files reviewed defects there). When it does, they are the evidence that
chooses, in place of what is used without them:

- `training.fit` keeps, per branch, the epoch with the best *selection value*: the mean of
  the image AUROC (every real defect against the good images of the selection part) and,
  when some defects have a mask, the pixel AUROC (the masked defects' pixels against every
  other pixel of those images and of the good ones). Without real defects the epoch with
  the lowest mean good-image score is kept (`fit.select`), as before.
- After calibration, `fit` prints and records (``calibration.json``'s
  ``validation_evidence``) these AUROCs for every view.
- `dualstpm ablate` chooses and adopts its fusion on them (`dualstpm.ablation.real`)
  instead of synthetic defects pasted on the validation images.

A defect without a mask is image-level evidence only: it adds to image AUROC and to
nothing else. The real defects are never training data for the students, and never test
data (the test split stays the only measure of the shipped model).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from dualstpm import metrics
from dualstpm.config import DEFAULT_MAX_IMAGE_PIXELS
from dualstpm.data import Sample, decode_images, decode_masks, real_evidence_label
from dualstpm.model.inference import MapViews, RawMaps

#: `validation_evidence.evidence` of a fit without real defects: its epochs were selected on good images alone
GOOD_IMAGES_ONLY = "good images only"
IMAGE_AUROC, PIXEL_AUROC = "image_auroc", "pixel_auroc"


@dataclass(frozen=True)
class RealDefects:
    """The real defective validation images of a category at the model's input size."""

    samples: tuple[Sample, ...]
    images: Tensor  # (D, 3, S, S) float32 in [0, 1]
    masks: np.ndarray  # (D, S, S) bool; all False for a defect without a mask
    has_mask: np.ndarray  # (D,) bool: which defects have a mask (pixel evidence)

    @classmethod
    def decode(cls, samples: Sequence[Sample], size: int,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> RealDefects | None:
        """Decode `samples` (`Category.validation_defects`) at `size` px; None when there are
        none. Raises DataError for an image or mask above `max_pixels` pixels or unreadable."""
        if not samples:
            return None
        images = decode_images([s.path for s in samples], size, "decoding real validation defects", max_pixels)
        masks, _ = decode_masks(samples, size, max_pixels)
        return cls(tuple(samples), images, masks.numpy(), np.array([s.mask_path is not None for s in samples]))

    @property
    def label(self) -> str:
        """``real: N images of K defect types``."""
        return real_evidence_label(len(self.samples), len({s.defect_type for s in self.samples}))

    @property
    def rule(self) -> str:
        """What selects on these defects: ``image AUROC``, or with masks the mean of both AUROCs."""
        return "mean of image AUROC and pixel AUROC" if self.has_mask.any() else "image AUROC"

    def describe(self) -> dict:
        """JSON-ready: the label, counts per defect type and how many have a mask."""
        return {"evidence": self.label, "images": len(self.samples), "with_masks": int(self.has_mask.sum()),
                "defect_types": dict(sorted(Counter(s.defect_type for s in self.samples).items()))}

    def auroc(self, good_scores: np.ndarray, good_maps: np.ndarray, defect_scores: np.ndarray,
              defect_maps: np.ndarray) -> dict[str, float | None]:
        """Image AUROC of (G,) good against (D,) defect image scores; with masked defects, the
        pixel AUROC of the (G, S, S) good maps and the masked defects' (D, S, S) maps against
        their masks. None where undefined (e.g. every mask empty)."""
        labels = np.concatenate([np.zeros(len(good_scores), np.int8), np.ones(len(defect_scores), np.int8)])
        result = {IMAGE_AUROC: metrics.image_auroc(labels, np.concatenate([good_scores, defect_scores]))}
        if self.has_mask.any():
            maps = np.concatenate([good_maps, defect_maps[self.has_mask]]).astype(np.float32, copy=False)
            masks = np.concatenate([np.zeros(good_maps.shape, bool), self.masks[self.has_mask]])
            result[PIXEL_AUROC] = metrics.pixel_auroc(masks, maps)
        return result


def selection_value(evidence: dict[str, float | None]) -> float:
    """The mean of the defined AUROCs of `RealDefects.auroc` (higher is better); NaN when none is."""
    defined = [v for v in evidence.values() if v is not None]
    return float(np.mean(defined)) if defined else float("nan")


def view_evidence(views: MapViews, maps_of: Callable[[Tensor], Tensor | RawMaps], good_images: Tensor,
                  real: RealDefects, batch_size: int) -> dict[str, dict[str, float | None]]:
    """{view: `RealDefects.auroc`} for every view of `views` (the calibrated model's), from the
    six maps (or :class:`RawMaps`, which the memory views need) `maps_of` gives for (N, 3, S, S)
    images, `batch_size` at a time."""
    scored = {name: _scores_and_maps(views, maps_of, images, batch_size)
              for name, images in (("good", good_images), ("defect", real.images))}
    return {view: real.auroc(scored["good"][view][0], scored["good"][view][1],
                             scored["defect"][view][0], scored["defect"][view][1]) for view in views.views}


def _scores_and_maps(views: MapViews, maps_of: Callable[[Tensor], Tensor | RawMaps], images: Tensor,
                     batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    parts: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {v: ([], []) for v in views.views}
    for start in range(0, len(images), batch_size):
        scored = views.score_maps(maps_of(images[start : start + batch_size]), views.views)
        for view in views.views:
            parts[view][0].append(scored.scores[view].detach().cpu().numpy())
            parts[view][1].append(scored.maps[view].detach().cpu().float().numpy())
    return {v: (np.concatenate(s), np.concatenate(m)) for v, (s, m) in parts.items()}


def describe_views(evidence: dict[str, dict[str, float | None]]) -> str:
    """One line: ``fused image 0.912 pixel 0.950; stpm image ...`` (``n/a`` where undefined)."""
    def number(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    return "; ".join(f"{view} " + " ".join(f"{k.removesuffix('_auroc')} {number(v)}" for k, v in figures.items())
                     for view, figures in evidence.items())
