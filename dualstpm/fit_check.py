"""The fit check: a fit that says when it is poor (issue 22, item 5).

After calibration, `fit` pastes synthetic defects (:data:`KINDS`, one defective copy per
image, `dualstpm.ablation.defects.paste_defects` seeded by `seed`) on the calibration part
of the validation images, the good images no training step and no epoch choice has seen,
and measures how well each view of the calibrated model tells the defective copies from
the clean originals: the image AUROC, as the model will score (its statistics and image
score reduction). Below `fit.min_val_auroc` for the view the model decides with
(`fusion.view`), the fit warns, naming the likely cause and the fix from what the fit
trained on (:class:`FitEvidence`): too few optimizer steps, a small image size, few good
images. The warning is said on the console (and in a Prefect task's log) and recorded in
`calibration.json` (`fit_check`), `metrics.json`, the MLflow run (`fit_check.*` metrics and
tags) and the registry version's tags, so a model that cannot separate pasted defects is
never shipped silently.

Synthetic defects are not real ones: a pass says the model has learnt the good parts well
enough to flag a pasted patch, scratch or texture, not that it finds this category's
defects (`dualstpm test` measures those). The `disc` view was trained on the same kinds of
defects (on training images), so its figure is optimistic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dualstpm import metrics
from dualstpm.ablation.defects import KINDS, paste_defects
from dualstpm.sizes import ImageSize, describe, shortest_side

#: images (B, 3, S, S) in [0, 1] -> {view: image scores (B,)} of the calibrated model
ViewScorer = Callable[[Tensor], Mapping[str, Tensor]]

#: below this image size (px) a small image is named as a likely cause (the published recipe's 256)
SMALL_IMAGE_SIZE = 256
#: below this many good training images, few images are named as a likely cause
FEW_TRAIN_IMAGES = 100
#: below this many calibration images the AUROC is said to be rough
FEW_CHECK_IMAGES = 10


@dataclass(frozen=True)
class FitEvidence:
    """What the fit trained on, from which the warning names causes: the concrete recipe
    (`fixed` | `real`), good training images, image size in px, epochs and optimizer steps
    per branch trained, and the real-data recipe's floor of steps (`fit.real.min_steps`)."""

    recipe: str
    train_images: int
    image_size: ImageSize
    epochs: int
    steps: int
    real_min_steps: int


@dataclass(frozen=True)
class FitCheck:
    """The check's figures: `val_auroc` per view (None: not measurable), for the decision
    `view` against the `floor` (`fit.min_val_auroc`), on `good_images` clean and
    `defective_images` defective copies of `kinds`; `warning` None when the view reaches the floor."""

    view: str
    val_auroc: dict[str, float | None]
    floor: float
    good_images: int
    defective_images: int
    kinds: tuple[str, ...]
    evidence: FitEvidence
    warning: str | None

    @property
    def poor(self) -> bool:
        return self.warning is not None

    def summary(self) -> str:
        """One line: the decision view's validation AUROC, the floor and the other views'."""
        others = ", ".join(f"{v} {_fmt(a)}" for v, a in self.val_auroc.items() if v != self.view)
        verdict = "below" if self.poor else "at or above"
        return (f"fit check: validation image AUROC on synthetic defects ({', '.join(self.kinds)}) of the "
                f"{self.good_images} calibration images: {self.view} {_fmt(self.val_auroc.get(self.view))}, "
                f"{verdict} fit.min_val_auroc={self.floor:g} (other views: {others})")

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["kinds"] = list(self.kinds)
        data["poor"] = self.poor
        return data


def _fmt(value: float | None) -> str:
    return "not measurable" if value is None else f"{value:.3f}"


def score_images(score: ViewScorer, images: Tensor, batch_size: int) -> dict[str, np.ndarray]:
    """{view: (N,) float64 image scores} of `images` (N, 3, S, S), scored `batch_size` at a time."""
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        for view, scores in score(images[start : start + batch_size]).items():
            parts.setdefault(view, []).append(scores.detach().float().cpu().numpy().astype(np.float64))
    return {view: np.concatenate(chunks) for view, chunks in parts.items()}


def synthetic_defect_auroc(score: ViewScorer, images: Tensor, kinds: tuple[str, ...], seed: int,
                           batch_size: int) -> dict[str, float | None]:
    """Per view, the image AUROC of one defective copy of each of `images` (N, 3, S, S) good
    images in [0, 1] (`paste_defects` of `kinds`, seeded by `seed`) against the clean images."""
    defective, _, _ = paste_defects(images, list(kinds), 1, seed)
    good, bad = score_images(score, images, batch_size), score_images(score, defective, batch_size)
    labels = np.concatenate([np.zeros(len(images), dtype=np.int64), np.ones(len(defective), dtype=np.int64)])
    return {view: metrics.image_auroc(labels, np.concatenate([good[view], bad[view]])) for view in good}


def poor_fit_warning(view: str, auroc: float | None, floor: float, evidence: FitEvidence, n_images: int) -> str | None:
    """The warning for a decision view whose validation AUROC is below `floor` (or could not be
    measured), with the likely causes and their fixes read off `evidence`; None when it reaches it."""
    if auroc is not None and auroc >= floor:
        return None
    causes, fixes = [], []
    if evidence.steps < evidence.real_min_steps:
        epochs = f"{evidence.epochs} epoch" + ("" if evidence.epochs == 1 else "s")
        causes.append(f"too little training ({evidence.steps} optimizer steps per branch in {epochs}, "
                      f"recipe {evidence.recipe})")
        fixes.append(f"train longer: --set fit.recipe=real (at least fit.real.min_steps={evidence.real_min_steps} "
                     "steps, early stopping on validation) or a larger fit.epochs")
    elif evidence.recipe == "real":
        causes.append(f"training may still be short ({evidence.steps} steps per branch)")
        fixes.append("raise fit.real.min_steps and fit.real.max_steps")
    if shortest_side(evidence.image_size) < SMALL_IMAGE_SIZE:
        causes.append(f"a small image size ({describe(evidence.image_size)}: a small defect covers few feature-map "
                      "cells)")
        key = "fit.real.image_size" if evidence.recipe == "real" else "image_size"
        fixes.append(f"a larger size: --set {key}={SMALL_IMAGE_SIZE}")
    if evidence.train_images < FEW_TRAIN_IMAGES:
        causes.append(f"few good training images ({evidence.train_images})")
        fixes.append("more good images in train/good (every good part photographed as in production)")
    if not causes:
        causes.append("the teachers' features may not suit these parts, or the synthetic defects differ from them")
        fixes.append("check on real defective parts with `dualstpm test`, and try another teacher pair (model.t1, model.t2)")
    measured = ("could not be measured" if auroc is None else f"is {auroc:.3f}, below fit.min_val_auroc={floor:g}")
    rough = f" (on only {n_images} calibration images the figure is rough)" if n_images < FEW_CHECK_IMAGES else ""
    return (f"poor fit: the `{view}` view's image AUROC on synthetic defects pasted on the calibration images "
            f"{measured}{rough}, so it is unlikely to catch real defects. Likely cause: {'; '.join(causes)}. "
            f"Fix: {'; '.join(fixes)}.")


def check_fit(score: ViewScorer, images: Tensor, view: str, floor: float, seed: int, batch_size: int,
              evidence: FitEvidence, kinds: tuple[str, ...] = KINDS) -> FitCheck:
    """The fit check of a calibrated model scored by `score`, on good `images` (N, 3, S, S) in
    [0, 1], for the decision `view` against `floor` (module docstring). Raises ValueError
    for non-finite scores (`dualstpm.metrics`)."""
    with torch.no_grad():
        auroc = synthetic_defect_auroc(score, images, kinds, seed, batch_size)
    if view not in auroc:
        raise ValueError(f"the model has no view {view!r} to check (its views: {', '.join(auroc)})")
    warning = poor_fit_warning(view, auroc[view], floor, evidence, len(images))
    return FitCheck(view, auroc, float(floor), len(images), len(images), tuple(kinds), evidence, warning)


def fit_check_metrics(record: Mapping[str, Any] | None) -> dict[str, float]:
    """`fit_check.val_auroc.<view>` of a recorded check (`FitCheck.to_json`), for MLflow; {} without one."""
    if not record:
        return {}
    return {f"fit_check.val_auroc.{view}": float(value) for view, value in record["val_auroc"].items()
            if value is not None}


def fit_check_tags(record: Mapping[str, Any] | None, prefix: str) -> dict[str, str]:
    """Tags of a recorded check: `<prefix>fit_check` = `poor` | `ok`, its decision view's AUROC,
    and the warning (empty when ok); {} for a model fitted before the check existed."""
    if not record:
        return {}
    value = record["val_auroc"].get(record["view"])
    return {f"{prefix}fit_check": "poor" if record["poor"] else "ok",
            f"{prefix}fit_check.val_auroc": "null" if value is None else repr(float(value)),
            f"{prefix}fit_check.warning": record["warning"] or ""}
