"""Calibration math (METHOD.md §4): validation statistics of the six maps, decision thresholds
at a target false-alarm rate, the pixel threshold of defect regions at a target pixel
false-positive rate (`calibrate_pixel_threshold`, docs/regions.md), and the normalised score.

Pure functions and small modules, no files: `dualstpm.training.calibrate` runs them on the
validation maps, the ablation recalibrates a chosen fusion with them, and the inference
module (:mod:`dualstpm.model.inference`) carries :class:`ScoreNormalization`.

Normalised score (METHOD.md §4, issue 12): a raw image score s is mapped to

    n(s) = clip(0.5 * (s - s_min) / (t - s_min), 0, 1)

where t is the stored decision threshold and s_min the lowest image score of the good
validation images under the same fusion. So 0 = the least anomalous validation image,
0.5 = the threshold (``n > 0.5`` exactly when ``s > t``), 1 = as far above the threshold as
the threshold is above s_min, or more. It is monotone (non-decreasing), so it ranks images
as the raw score does; only scores beyond both ends tie (at 0 or 1).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from dualstpm.model.fusion import MapStats

MIN_SPAN = 1e-12  # a threshold equal to the lowest validation score (one validation image)


class MapStatsAccumulator:
    """Streams batches of six maps and yields their per-map mean/std in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.total = torch.zeros(2, 3, dtype=torch.float64)
        self.total_sq = torch.zeros(2, 3, dtype=torch.float64)

    def update(self, maps: Tensor) -> None:
        flat = maps.detach().to(torch.float64).permute(1, 2, 0, 3, 4).reshape(2, 3, -1)
        self.count += flat.shape[-1]
        self.total += flat.sum(-1)
        self.total_sq += (flat**2).sum(-1)

    def result(self) -> MapStats:
        mean = self.total / max(self.count, 1)
        var = (self.total_sq / max(self.count, 1) - mean**2).clamp_min(0)
        return MapStats(mean.float(), var.sqrt().float().clamp_min(1e-12))


def summarize(scores: np.ndarray) -> dict[str, float]:
    """(N,) image scores -> their mean, std, min and max (`Calibration.val_score_summary`)."""
    return {
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),
        "min": float(np.min(scores)),
        "max": float(np.max(scores)),
    }


def allowed_false_alarms(n_images: int, false_alarm_rate: float) -> int:
    """k: how many of n good calibration scores may lie above the threshold so that a new
    good part is flagged with probability at most `false_alarm_rate`; -1 when no k can.

    Split conformal calibration (Vovk, Gammerman, Shafer, "Algorithmic Learning in a Random
    World", 2005; Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction",
    arXiv 2107.07511, §1): for n + 1 exchangeable good scores without ties, the new one
    exceeds the (k+1)-th largest of the other n with probability exactly (k+1)/(n+1). The
    largest k with (k+1)/(n+1) <= rate is floor(rate * (n+1)) - 1.
    """
    return math.floor(false_alarm_rate * (n_images + 1) + 1e-9) - 1  # 1e-9: 0.05 * 20 is 1, not 0.999...


def false_alarm_bound(n_images: int, false_alarm_rate: float) -> float:
    """The probability that a new good part scores above the threshold `calibrate_threshold`
    sets on n good scores: (k+1)/(n+1), at most `false_alarm_rate` when n is at least
    `calibration_images_needed(rate)`, else 1/(n+1) (the threshold is the highest score)."""
    return (max(allowed_false_alarms(n_images, false_alarm_rate), 0) + 1) / (n_images + 1)


def calibration_images_needed(false_alarm_rate: float) -> int:
    """The fewest good calibration images whose threshold keeps `false_alarm_rate`:
    the smallest n with rate * (n+1) >= 1 (99 for 1 %, 19 for 5 %)."""
    return math.ceil(1 / false_alarm_rate - 1e-9) - 1


def calibration_note(n_images: int, false_alarm_rate: float) -> str | None:
    """Why n calibration images cannot keep the target false-alarm rate, and the fix; None when they can."""
    if allowed_false_alarms(n_images, false_alarm_rate) >= 0:
        return None
    return (f"{n_images} calibration images cannot keep calibration.false_alarm_rate={false_alarm_rate:g}: the "
            f"threshold is their highest score, which a new good part exceeds with probability 1/{n_images + 1} = "
            f"{1 / (n_images + 1):.3g}; {calibration_images_needed(false_alarm_rate)} are needed. Add good images "
            "(validation/good, or more train/good with a larger fit.val_fraction), or accept a higher target")


def calibrate_threshold(val_scores: np.ndarray, false_alarm_rate: float) -> float:
    """The threshold that flags a new good part with probability at most `false_alarm_rate`.

    A part is defective when its score is strictly above the threshold. With n good
    calibration scores the threshold is the (k+1)-th largest, k = `allowed_false_alarms`
    (split conformal calibration: the promise holds for new parts, not only on these n);
    with too few images for the rate (k < 0) it is the maximum, and a new good part is
    flagged with probability 1/(n+1) (`false_alarm_bound`, `calibration_note`).
    Raises ValueError without scores.
    """
    ordered = np.sort(np.asarray(val_scores, dtype=np.float64))
    if len(ordered) == 0:
        raise ValueError("no validation scores to calibrate on")
    allowed = max(allowed_false_alarms(len(ordered), false_alarm_rate), 0)
    return float(ordered[len(ordered) - 1 - allowed])


def calibrate_pixel_threshold(good_maps: np.ndarray, pixel_fpr: float) -> float:
    """The pixel threshold of defect regions: the value a good pixel exceeds with probability
    about `pixel_fpr`, from the anomaly maps of good calibration images (any shape; every
    value is one good pixel). A pixel is defective when its map value is strictly above it.

    The same split conformal order statistic as the image threshold (`calibrate_threshold`),
    over the N pooled good pixels: the (k+1)-th largest, k = `allowed_false_alarms(N,
    pixel_fpr)` = floor(pixel_fpr * (N + 1)) - 1 (the maximum when k < 0, i.e. N < 1/pixel_fpr - 1).
    E.g. 12 good pixels 1, 2, ..., 12 at pixel_fpr 0.25: k = floor(3.25) - 1 = 2, threshold 10.

    What it promises (docs/regions.md): the image threshold's exact (k+1)/(N+1) needs the new
    score exchangeable with the calibration scores, and neighbouring pixels of one image are
    not independent draws. What holds when the images are exchangeable (m calibration
    images of P pixels each, N = m P): a new good image's expected share of pixels above
    the threshold is at most (k + P) / ((m + 1) P), since among the pooled (m + 1) P pixels
    at most k + P have k or fewer pixels of *other* images above them. That bound is
    about 1/(m+1) + pixel_fpr; `pixel_fpr` itself is the pooled rate the threshold is set
    at, which `dualstpm test` measures on the good test pixels.

    Selected with `np.partition` (linear time, one copy of the pixels as float32).
    Raises ValueError without pixels or with a NaN/inf among them.
    """
    pixels = np.asarray(good_maps, dtype=np.float32).reshape(-1)
    if pixels.size == 0:
        raise ValueError("no good pixels to calibrate the pixel threshold on")
    if not np.isfinite(pixels).all():
        raise ValueError("the good anomaly maps hold NaN or inf: the pixel threshold needs finite values")
    position = pixels.size - 1 - max(allowed_false_alarms(pixels.size, pixel_fpr), 0)
    return float(np.partition(pixels, position)[position])


def pixel_false_positive_bound(n_images: int, pixels_per_image: int, pixel_fpr: float) -> float:
    """(k + P) / ((m + 1) P): the bound on a new good image's expected share of pixels above
    the threshold `calibrate_pixel_threshold` sets on m images of P pixels (its docstring)."""
    n_pixels = n_images * pixels_per_image
    allowed = max(allowed_false_alarms(n_pixels, pixel_fpr), 0)
    return (allowed + pixels_per_image) / ((n_images + 1) * pixels_per_image)


class ScoreNormalization(nn.Module):
    """Raw image scores (B,) -> normalised scores in [0, 1], 0.5 at the threshold (module docstring).

    Args:
        threshold: the stored decision threshold t (raw score units).
        val_min: the lowest raw score of the good validation images under the same fusion.
    """

    def __init__(self, threshold: float, val_min: float) -> None:
        super().__init__()
        self.threshold = float(threshold)
        self.val_min = min(float(val_min), self.threshold)
        self.span = max(self.threshold - self.val_min, MIN_SPAN)

    def forward(self, scores: Tensor) -> Tensor:
        return (0.5 * (scores - self.val_min) / self.span).clamp(0.0, 1.0)

    def to_json(self) -> dict[str, float | str]:
        """What an export's metadata records about it."""
        return {"formula": "clip(0.5 * (score - val_min) / (threshold - val_min), 0, 1)",
                "threshold": self.threshold, "val_min": self.val_min}

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.6g}, val_min={self.val_min:.6g}"
