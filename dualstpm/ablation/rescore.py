"""Re-scoring stored maps under every configuration: array arithmetic, no network.

Per configuration and split: one vectorised fusion of the whole (N, 2, 3, S, S) stack
(`MapViews.stack` of the inference module, i.e. `fusion.fuse`; for a memory view, that view
of the stored memory maps), image scores by the model's
calibrated reduction (`fusion.image_score`; the score-reduction table varies it instead), and the metrics of
`dualstpm.metrics`. The ground truth is prepared once per split (`metrics.PixelTruth`:
connected regions labelled once, not per configuration or threshold), and a
configuration whose `FusionSpec` equals an earlier one is not scored twice.

Configurations are independent, so they are scored in parallel threads (NumPy's sort,
most of the work, and PyTorch's kernels release the GIL). The threads leave torch's thread
count alone: it is process-wide for every thread that starts using torch, so lowering it
here would give a fit started meanwhile in a threaded Prefect flow fewer threads, and a
fit's figures depend on its thread count (the order of its float sums).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from dualstpm import metrics
from dualstpm.ablation.grid import Candidate, Config
from dualstpm.maps import MapSet
from dualstpm.model.fusion import ScoreSpec
from dualstpm.model.inference import MapViews, stack_scores
from dualstpm.progress import stage

Metrics = dict[str, float | None]


class SplitScorer:
    """Scores one split's stored maps under any fusion (or memory view), with the masks prepared once, through
    the model's `views` (its validation statistics; image scores by its reduction,
    `Calibration.score`)."""

    def __init__(self, stored: MapSet, views: MapViews) -> None:
        self.stored = stored
        self.views = views
        self.labels = stored.labels.astype(bool)
        self.truth = metrics.PixelTruth(stored.masks) if stored.masks is not None else None
        if self.truth is not None:
            self.truth.regions  # noqa: B018 - label the regions now, once, before threads share them
        self._memo: dict[Candidate, Metrics] = {}

    def score(self, spec: Candidate) -> Metrics:
        if spec not in self._memo:
            fused, scores = self.views.stack(self.stored.raw, spec)
            pixel, pro = metrics.pixel_metrics(self.truth, fused) if self.truth is not None else (None, None)
            image = self.image_metrics(scores)
            self._memo[spec] = {"image_auroc": image["image_auroc"], "pixel_auroc": pixel, "aupro": pro,
                                "image_f1_max": image["image_f1_max"]}
        return self._memo[spec]

    def image_metrics(self, scores: np.ndarray) -> Metrics:
        """Image AUROC and F1-max of (N,) image scores of this split (None where undefined)."""
        best = metrics.f1_max(self.labels, scores)
        return {"image_auroc": metrics.image_auroc(self.labels, scores), "image_f1_max": None if best is None else best[0]}

    def reductions(self, spec: Candidate, scores: Sequence[ScoreSpec]) -> list[Metrics]:
        """Image metrics of `spec`'s fused maps under each reduction in `scores` (fused once;
        pixel metrics do not depend on the reduction, so they are not computed)."""
        fused = self.views.stack_maps(self.stored.raw, spec)
        return [self.image_metrics(stack_scores(fused, score)) for score in scores]


def default_workers() -> int:
    """One thread per core this process may use, at most 8 (each holds a few fused stacks)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


def score_grid(configs: Sequence[Config], splits: dict[str, SplitScorer], workers: int = 0) -> pd.DataFrame:
    """One row per configuration, in order: its description, then `<split>_<metric>` for
    each split (the test split's columns carry no prefix). `workers` 0: `default_workers()`."""

    def row(config: Config) -> dict:
        described = config.row()
        for split, scorer in splits.items():
            prefix = "" if split == "test" else f"{split}_"
            described.update({f"{prefix}{k}": v for k, v in scorer.score(config.spec).items()})
        return described

    rows = []
    with (ThreadPoolExecutor(workers or default_workers()) as pool,
          stage("scoring fusion configurations", len(configs), "configurations") as progress):
        for described in pool.map(row, configs):  # in order, as each is done
            rows.append(described)
            progress.advance()
    return pd.DataFrame(rows)
