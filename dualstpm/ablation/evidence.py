"""What the ablation chooses on: real validation defects when the category has them, else synthetic ones.

The selection set is always the normal validation images of the selection part followed
by defective images:

- *real* (`RUN/maps/val_defects.npz`, stored by `dualstpm test` from the category's
  ``validation/<defect_type>/``; `dualstpm.real_defects`): every real defect adds image
  evidence (image AUROC, F1-max); only those with a mask add pixel evidence (pixel AUROC,
  AUPRO). When some have a mask and some not, the pixel metrics are measured on the good
  images plus the masked defects alone (`Evidence.pixels`): a defect without a mask must
  not count its defect pixels as good ones.
- *synthetic* (no real defects): the defective copies pasted on those same normal images
  (`selection.synthetic_maps`), each with its exact mask.

Real defects are never pasted on, trained on or tested on; the test split is not read here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from dualstpm.ablation.grid import Candidate
from dualstpm.ablation.margin import Contributions, contributions
from dualstpm.ablation.rescore import Metrics, SplitScorer
from dualstpm.ablation.selection import selection_set, source_units, subset
from dualstpm.data import real_evidence_label
from dualstpm.maps import MapSet
from dualstpm.rundir import MAPS_DIR, VAL_DEFECT_MAPS
from dualstpm.model.fusion import ScoreSpec
from dualstpm.model.inference import MapViews

SYNTHETIC = "synthetic"
SYNTHETIC_NOTE = "chosen on normal validation images plus synthetic defects pasted on them; the test split is not used"
REAL_NOTE = ("chosen on normal validation images plus the category's real defects (validation/<defect_type>/); "
             "the test split is not used")
PIXEL_METRICS = ("pixel_auroc", "aupro")


@dataclass(frozen=True)
class Evidence:
    """The selection set: `images` (normal, then defective) for every metric, except that
    when `pixels` is given the pixel metrics come from it (the normal images plus only the
    defects that have a mask). `label`: ``synthetic`` or ``real: N images of K defect types``."""

    images: MapSet
    pixels: MapSet | None
    label: str
    note: str

    @property
    def real(self) -> bool:
        return self.label != SYNTHETIC

    def scorer(self, views: MapViews) -> SplitScorer | EvidenceScorer:
        """What `score_grid` and the reduction table score the selection set with."""
        return SplitScorer(self.images, views) if self.pixels is None else EvidenceScorer(self, views)

    def contributions(self, views: MapViews, spec: Candidate) -> Contributions:
        """`margin.contributions` of `spec` on the selection set, resampled by source image
        (`selection.source_units`); pixel figures from `pixels` when given."""
        units, n_units = source_units(self.images)
        fused, scores = views.stack(self.images.raw, spec)
        found = contributions(scores, self.images.labels, units, n_units, fused, self.images.masks)
        if self.pixels is None:
            return found
        unit_of = dict(zip(np.asarray(self.images.paths, dtype=str), units, strict=True))
        pixel_units = np.array([unit_of[p] for p in np.asarray(self.pixels.paths, dtype=str)], dtype=np.int64)
        fused, scores = views.stack(self.pixels.raw, spec)
        pixel = contributions(scores, self.pixels.labels, pixel_units, n_units, fused, self.pixels.masks)
        return replace(found, good_hist=pixel.good_hist, defect_hist=pixel.defect_hist,
                       coverage_hist=pixel.coverage_hist, regions=pixel.regions)

    def describe(self) -> dict:
        """summary.json's `selection_set` counts (the caller adds the calibration part's)."""
        labels = self.images.labels
        described = {"validation_evidence": self.label, "normal_validation_images": int((labels == 0).sum())}
        if not self.real:
            return {**described, "synthetic_defects": int((labels == 1).sum())}
        defects = np.asarray(self.images.defect_types, dtype=str)[labels == 1]
        with_masks = int((self.pixels.labels == 1).sum()) if self.pixels is not None else (
            len(defects) if self.images.masks is not None else 0)
        return {**described, "real_defects": len(defects), "real_defects_with_masks": with_masks,
                "defect_types": dict(sorted(Counter(defects.tolist()).items()))}


class EvidenceScorer:
    """A `SplitScorer` of `Evidence.images` whose pixel metrics come from `Evidence.pixels`."""

    def __init__(self, evidence: Evidence, views: MapViews) -> None:
        self.image = SplitScorer(evidence.images, views)
        self.pixel = SplitScorer(evidence.pixels, views)

    def score(self, spec: Candidate) -> Metrics:
        pixel = self.pixel.score(spec)
        return {**self.image.score(spec), **{m: pixel[m] for m in PIXEL_METRICS}}

    def reductions(self, spec: Candidate, scores: list[ScoreSpec]) -> list[Metrics]:
        return self.image.reductions(spec, scores)


def load_real_defects(run_dir: Path) -> MapSet | None:
    """`RUN/maps/val_defects.npz`, or None when the tested category had no real validation defects."""
    path = Path(run_dir) / MAPS_DIR / VAL_DEFECT_MAPS
    return MapSet.load(path) if path.is_file() else None


def synthetic_evidence(good: MapSet, synthetic: MapSet) -> Evidence:
    """`good` (the selection part's normal images) plus the synthetic copies pasted on them."""
    return Evidence(selection_set(good, synthetic), None, SYNTHETIC, SYNTHETIC_NOTE)


def real_evidence(good: MapSet, real: MapSet) -> Evidence:
    """`good` plus every real defect of `real` (`load_real_defects`; `meta["with_mask"]`
    says which have a mask): masks on the whole set when every defect has one, none when
    none has, else the pixel evidence apart (`Evidence.pixels`)."""
    with_mask = np.asarray(real.meta["with_mask"], dtype=bool)
    joined = selection_set(good, real)
    label = real_evidence_label(len(real), len(set(np.asarray(real.defect_types, dtype=str).tolist())))
    if with_mask.all():
        return Evidence(joined, None, label, REAL_NOTE)
    pixels = selection_set(good, subset(real, np.flatnonzero(with_mask))) if with_mask.any() else None
    return Evidence(replace(joined, masks=None), pixels, label, REAL_NOTE)
