"""The adoption margin: does a fusion beat the default on validation robustly, not by luck?

The ablation's best configuration on the selection set wins by some difference in the
selection metric; with a few dozen validation images one image can make that
difference. So the validation images are resampled with replacement (a percentile
bootstrap, Efron & Tibshirani, "An Introduction to the Bootstrap", 1993, ch. 13) and both
configurations are scored on each resample. The candidate is adopted only when the
lower bound of the one-sided `confidence` interval of (candidate - default), the
(1 - confidence) quantile of the resampled differences, is > 0.

Too few images to show anything: with n units, the strongest evidence n units can give
is all n favouring the candidate, which under "no difference" (each unit's sign a fair coin)
happens with probability 2^-n (the sign test). When 2^-n > 1 - confidence no test at that
confidence can reject, so no resampling can either: the percentile bootstrap of a handful
of units is then only noise (with 3 units it has 10 distinct resamples, and a third of its
draws repeat one unit three times). `min_units` = ceil(log2(1 / (1 - confidence))) (5 at
0.95) is the floor below which the default is kept whatever the bootstrap says.

Resampling unit: a *source image*: a normal validation image together with the
defective copies pasted on it (`defects.paste_defects`), so a copy and its base are
drawn together. (A cut-paste patch may come from another validation image; that weak
link is ignored.)

Cost: a resample is a vector of weights (how often each unit was drawn), and every
metric is a weighted sum of per-unit contributions computed once per configuration:

- image AUROC, exactly: C[u, v] = sum over good images g of unit u and defective images
  d of unit v of 1[s_d > s_g] + 0.5 * 1[s_d = s_g]; AUROC(w) = w'Cw / ((w.n_good)(w.n_def));
- image F1-max, exactly: weighted true and false positives over the sorted scores;
- pixel AUROC and AUPRO, on PIXEL_BINS quantile bins of the pooled pixel scores of the
  configuration: per unit, histograms of its good pixels, its defect pixels and its
  regions' pixels (each region weighted 1 / its size). Scores within a bin count as tied
  (0.5 for AUROC), and the PRO curve is taken at the bin edges, so these two are
  approximations; `contributions` with all weights 1 reproduces `metrics.pixel_auroc` and
  `metrics.aupro` within a few 1e-3 (tests/test_choices.py).

A resample then costs O(units^2 + units * PIXEL_BINS), whatever the image size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from dualstpm.ablation.selection import SELECTION_METRICS
from dualstpm.metrics import FPR_LIMIT, PixelTruth, _area_up_to

PIXEL_BINS = 2048


@dataclass(frozen=True)
class Contributions:
    """One configuration's per-unit contributions on a selection set of U units."""

    pair_wins: np.ndarray  # (U, U) image AUROC numerators C[u, v] (good of u vs defective of v)
    n_good: np.ndarray  # (U,) good images per unit
    n_defective: np.ndarray  # (U,) defective images per unit
    image_scores: np.ndarray  # (N,) image scores, sorted descending
    image_labels: np.ndarray  # (N,) 1 = defective, in the same order
    image_units: np.ndarray  # (N,) unit of each image, in the same order
    good_hist: np.ndarray | None  # (U, B) good pixels per score bin; None without masks
    defect_hist: np.ndarray | None  # (U, B) defect pixels per score bin
    coverage_hist: np.ndarray | None  # (U, B) region pixels per bin, each weighted 1 / its region's size
    regions: np.ndarray | None  # (U,) defect regions per unit


def _pair_wins(scores: np.ndarray, labels: np.ndarray, units: np.ndarray, n_units: int) -> np.ndarray:
    good, defective = labels == 0, labels == 1
    g, d = scores[good][:, None], scores[defective][None, :]
    wins = (d > g) + 0.5 * (d == g)  # (good, defective)
    per_good_unit = np.zeros((n_units, wins.shape[1]))
    np.add.at(per_good_unit, units[good], wins)
    out = np.zeros((n_units, n_units))
    np.add.at(out.T, units[defective], per_good_unit.T)
    return out


def _unit_hist(bins: np.ndarray, units: np.ndarray, n_units: int, weights: np.ndarray | None = None) -> np.ndarray:
    flat = units.astype(np.int64) * PIXEL_BINS + bins
    return np.bincount(flat, weights=weights, minlength=n_units * PIXEL_BINS).reshape(n_units, PIXEL_BINS)


def contributions(scores: np.ndarray, labels: np.ndarray, units: np.ndarray, n_units: int,
                  maps: np.ndarray | None = None, masks: np.ndarray | None = None) -> Contributions:
    """Per-unit contributions of one configuration on a selection set.

    scores (N,) image scores, labels (N,) 1 = defective, units (N,) int in [0, n_units):
    the source image of each image; maps (N, H, W) fused maps and masks (N, H, W) bool,
    both or neither (without them the pixel metrics are undefined).
    """
    scores, labels, units = np.asarray(scores, np.float64), np.asarray(labels).astype(np.int8), np.asarray(units)
    order = np.argsort(-scores, kind="stable")
    pixel = (None, None, None, None)
    if maps is not None and masks is not None:
        maps, masks = np.asarray(maps, np.float32), np.asarray(masks, bool)
        edges = np.quantile(maps, np.linspace(0, 1, PIXEL_BINS + 1)[1:-1])
        bins = np.searchsorted(edges, maps, side="right")  # (N, H, W) in [0, B)
        pixel_units = np.broadcast_to(units[:, None, None], maps.shape)
        ids, n_regions = PixelTruth(masks).regions  # region id of each defect pixel, C order
        size = np.bincount(ids, minlength=n_regions + 1)
        region_unit = np.zeros(n_regions + 1, np.int64)
        region_unit[ids] = pixel_units[masks]
        pixel = (_unit_hist(bins[~masks], pixel_units[~masks], n_units),
                 _unit_hist(bins[masks], pixel_units[masks], n_units),
                 _unit_hist(bins[masks], pixel_units[masks], n_units, 1.0 / size[ids]),
                 np.bincount(region_unit[1:], minlength=n_units).astype(np.float64))
    return Contributions(_pair_wins(scores, labels, units, n_units),
                         np.bincount(units[labels == 0], minlength=n_units).astype(np.float64),
                         np.bincount(units[labels == 1], minlength=n_units).astype(np.float64),
                         scores[order], labels[order], units[order], *pixel)


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else np.nan


def image_auroc(c: Contributions, w: np.ndarray) -> float:
    return _ratio(w @ c.pair_wins @ w, (w @ c.n_good) * (w @ c.n_defective))


def image_f1_max(c: Contributions, w: np.ndarray) -> float:
    """Best F1 over thresholds at the distinct scores (score >= threshold is flagged)."""
    weights = w[c.image_units]
    tp, fp = np.cumsum(weights * c.image_labels), np.cumsum(weights * (1 - c.image_labels))
    last_of_tie = np.append(c.image_scores[1:] != c.image_scores[:-1], True)
    positives = tp[-1]
    if positives <= 0:
        return np.nan
    f1 = 2 * tp[last_of_tie] / (tp[last_of_tie] + fp[last_of_tie] + positives)
    return float(f1.max())


def pixel_auroc(c: Contributions, w: np.ndarray) -> float:
    if c.good_hist is None:
        return np.nan
    good, defect = w @ c.good_hist, w @ c.defect_hist
    below = np.cumsum(good) - good
    return _ratio(float(defect @ (below + 0.5 * good)), float(good.sum() * defect.sum()))


def aupro(c: Contributions, w: np.ndarray, fpr_limit: float = FPR_LIMIT) -> float:
    """PRO against FPR at the bin edges (thresholds descending), area to `fpr_limit` / `fpr_limit`."""
    if c.good_hist is None:
        return np.nan
    good, coverage, regions = w @ c.good_hist, w @ c.coverage_hist, float(w @ c.regions)
    if regions <= 0 or good.sum() <= 0:
        return np.nan
    fpr = np.concatenate(([0.0], np.cumsum(good[::-1]))) / good.sum()
    pro = np.minimum(np.concatenate(([0.0], np.cumsum(coverage[::-1]))) / regions, 1.0)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


METRIC_FUNCTIONS = {"image_auroc": image_auroc, "pixel_auroc": pixel_auroc, "aupro": aupro,
                    "image_f1_max": image_f1_max}


def selection_value(c: Contributions, w: np.ndarray, metric: str) -> float:
    """The selection metric (`ablation.select_metric`) under unit weights `w`: the mean of
    the defined metrics of SELECTION_METRICS[metric] (as `selection.combined_score`)."""
    values = [METRIC_FUNCTIONS[m](c, w) for m in SELECTION_METRICS[metric]]
    defined = [v for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else np.nan


def min_units(confidence: float) -> int:
    """The fewest resampling units that can show a gain at `confidence` (in (0, 1)): the
    smallest n with 2^-n <= 1 - confidence, i.e. ceil(log2(1 / (1 - confidence))) (the sign
    test's floor; module docstring). 0.95 -> 5, 0.99 -> 7, 0.5 -> 1."""
    return max(1, math.ceil(math.log2(1.0 / (1.0 - confidence)) - 1e-12))


@dataclass(frozen=True)
class Margin:
    """How much the candidate beats the default on the selection metric, and whether robustly."""

    metric: str
    observed_difference: float  # candidate - default on the whole selection set (binned pixel metrics)
    mean_difference: float  # mean over the resamples
    lower_bound: float  # (1 - confidence) quantile of the resampled differences
    confidence: float
    n_resamples: int
    n_units: int  # source images resampled
    adopted: bool  # lower_bound > 0 and n_units >= min_units
    min_units: int = 1  # `min_units(confidence)`: fewer units cannot show a gain at this confidence

    def to_json(self) -> dict:
        """JSON-ready: an undefined (NaN) figure becomes None."""
        return {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in asdict(self).items()}

    @property
    def too_few_units(self) -> bool:
        return self.n_units < self.min_units

    def describe(self) -> str:
        figures = (f"{self.metric} gain {self.observed_difference:+.4f} (bootstrap mean {self.mean_difference:+.4f}, "
                   f"{self.confidence:.0%} one-sided lower bound {self.lower_bound:+.4f}; {self.n_resamples} resamples "
                   f"of {self.n_units} validation images)")
        if self.too_few_units:  # the figures are shown, but they decide nothing: say so before them
            return (f"kept the default: {self.n_units} validation images cannot show a gain at {self.confidence:.0%} "
                    f"(at least {self.min_units} are needed: even {self.n_units} of {self.n_units} in the candidate's "
                    f"favour happen by chance with probability 2^-{self.n_units} = {2.0 ** -self.n_units:.3g}, so "
                    f"the bootstrap's bound is not trusted); these are the fit's selection images (its other "
                    f"validation images calibrate). Give the category more validation images (a validation/good "
                    f"folder, or a larger fit.val_fraction). For information only, not used: {figures}")
        return f"{'adopted' if self.adopted else 'kept the default'}: {figures}"


def bootstrap_margin(default: Contributions, candidate: Contributions, metric: str, n_resamples: int,
                     confidence: float, seed: int) -> Margin:
    """Resample the units `n_resamples` times (seeded by `seed`), score both configurations
    on each resample with the same weights, and adopt when the lower bound is > 0 and there
    are at least `min_units(confidence)` units (else the default is kept, the bootstrap still
    reported). Resamples where the metric is undefined for either (e.g. no defect region) are dropped."""
    n_units = len(default.n_good)
    rng = np.random.default_rng([seed, 0xB007])
    ones = np.ones(n_units)
    observed = selection_value(candidate, ones, metric) - selection_value(default, ones, metric)
    differences = np.empty(n_resamples)
    for index in range(n_resamples):
        w = np.bincount(rng.integers(0, n_units, n_units), minlength=n_units).astype(np.float64)
        differences[index] = selection_value(candidate, w, metric) - selection_value(default, w, metric)
    differences = differences[~np.isnan(differences)]
    floor = min_units(confidence)
    if differences.size == 0:
        return Margin(metric, float(observed), np.nan, np.nan, confidence, 0, n_units, False, floor)
    lower = float(np.quantile(differences, 1 - confidence))
    return Margin(metric, float(observed), float(differences.mean()), lower, confidence, int(differences.size),
                  n_units, bool(lower > 0 and n_units >= floor), floor)
