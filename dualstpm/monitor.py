"""Monitoring: does a batch on the line still look like the good parts the model was calibrated on?

Every batch a model scored is a ``predictions.csv`` (``dualstpm predict --out DIR``, with
any backend; a served model's or an export's answers saved as a CSV with a ``score``
column, one row per image, are monitored the same way). Two things are computed from it:

- :func:`write_batch_summary`: ``DIR/monitor/batch.json``, the batch's score distribution
  (`BATCH_SCHEMA`), written by ``predict`` after the table and by ``dualstpm monitor`` for a
  folder that has none.
- :func:`monitor_batches`: each batch against the model's *validation* scores, the scores
  of the good validation images (``RUN/maps/val.npz``, stored by ``dualstpm test``) in the
  view the model decides with, recomputed with the model's own fusion and image score
  (:func:`validation_scores`), so they are in the units of the batch's ``score`` column:

  ============== ==========================================================================
  drift           two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``, two-sided):
                  ``ks_statistic`` (the largest gap between the two empirical CDFs, 0..1)
                  and ``ks_pvalue``. **Drift** when ``ks_pvalue < ks_p`` (default 0.01)
                  *and* ``ks_statistic > ks_statistic`` bound (default 0.2): the p-value
                  alone flags negligible shifts on large batches, the statistic alone
                  noise on small ones.
  alarm rate      the share of the batch scoring above the model's stored threshold, against
                  the false-alarm rate its calibration promises (``calibration.false_alarm_rate``,
                  or the higher ``false_alarm_bound`` when too few calibration images could
                  keep that target: 1/(n+1) for n images, see the calibration notes) plus
                  the defect rate the line expects (``expected_defect_rate``, default 0;
                  every defect counted as flagged: ``p0 = fa + d * (1 - fa)``). One-
                  sided binomial test (``scipy.stats.binomtest``, ``alternative="greater"``):
                  **too many alarms** when ``alarm_pvalue < alarm_p`` (default 0.01).
  input drift     each input statistic of the batch's images (``brightness``, ``contrast``:
                  `dualstpm.data.input_stats`, columns of predictions.csv) against the same
                  statistic of the good images the model trained and calibrated on
                  (``calibration.json``'s ``input_reference``): two-sample KS tests as above,
                  **input drift** when one has ``ks_pvalue < ks_p / 2`` (Bonferroni over the
                  two statistics) *and* ``ks_statistic > ks_statistic`` bound. It sees a
                  lighting change whichever way it moves the scores, and its reference is
                  the training images (hundreds) rather than the validation scores (a few).
                  Not run (said so) for a table without the columns or a model without the
                  reference (fitted before dualstpm kept it).
  override rate   the share of reviewed parts (the folder's review log, current verdicts)
                  whose verdict differs from the model's label; with the false alarms
                  overruled (model defective, inspector good) and the misses (model good,
                  inspector defective) apart. Reported, no bound (too few reviews to test).
  ============== ==========================================================================

The validation images include those that selected the training epoch (the calibration
part alone is too small to compare against on a small dataset); their scores are
slightly lower than a new good part's, which makes the test a little quicker to flag.

``dualstpm monitor`` exits with :data:`dualstpm.errors.NOT_DONE_EXIT` (3) when any batch drifts or
raises too many alarms, 0 otherwise; errors exit with 2, as every command does.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dualstpm.data.input_stats import INPUT_STATISTICS
from dualstpm.errors import NOT_DONE_EXIT, DataError
from dualstpm.files import atomic_file, json_ready, staged_dir, write_json, write_text
from dualstpm.review.log import ReviewLog
from dualstpm.review.parts import numeric_columns
from dualstpm.rundir import LOG_FILE, PREDICTIONS_FILE, read_lineage, review_dir

MONITOR_DIR = "monitor"
BATCH_FILE = "batch.json"
BATCH_SCHEMA = 1
MONITOR_FILE = "monitor.json"
REPORT_FILE = "report.html"
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
MLFLOW_EXPERIMENT = "dualstpm-monitor"
FEW_REFERENCE_SCORES = 20


@dataclass(frozen=True)
class Bounds:
    """When a batch raises the alarm (see the module docstring)."""

    ks_p: float = 0.01
    ks_statistic: float = 0.2
    alarm_p: float = 0.01
    expected_defect_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ks_p", "ks_statistic", "alarm_p"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise DataError(f"monitor bound {name}={getattr(self, name)} must be between 0 and 1 (exclusive)")
        if not 0.0 <= self.expected_defect_rate < 1.0:
            raise DataError(f"expected defect rate {self.expected_defect_rate} must be in [0, 1)")


# --------------------------------------------------------------------------- one batch


def read_batch(predictions_dir: Path | str) -> pd.DataFrame:
    """``predictions_dir/predictions.csv`` with ``score`` as float (NaN where an image could
    not be scored) and, when the table has them, ``label`` and ``threshold``. Raises
    DataError for a missing table, one without a ``score`` column, or a score that is
    neither a number nor empty (naming the row: `numeric_columns`)."""
    path = Path(predictions_dir) / PREDICTIONS_FILE
    if not path.is_file():
        raise DataError(f"no {PREDICTIONS_FILE} in {Path(predictions_dir).absolute()}: monitor the folders "
                        "`dualstpm predict --out` wrote (or a CSV of a served model's answers with a `score` column)")
    try:
        table = pd.read_csv(path, dtype={"label": str, "path": str}, keep_default_na=False, na_values={"score": [""]})
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{path} cannot be read as a predictions table ({exc})") from None
    if "score" not in table.columns:
        raise DataError(f"{path} has no `score` column: it is not a predictions table of dualstpm")
    return numeric_columns(table, ("score",), path)


def scored_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a predictions table that have a finite score."""
    return table[np.isfinite(pd.to_numeric(table["score"], errors="coerce").to_numpy(dtype=float))]


def batch_summary(table: pd.DataFrame, model: dict[str, Any] | None = None) -> dict[str, Any]:
    """`BATCH_SCHEMA` of a batch: n scored, score quantiles/mean/std/min/max (raw score
    units), the alarm rate (share labelled ``defective``, at the table's threshold), the
    threshold(s) used and `model` (what scored it, as the caller knows it)."""
    scored = scored_rows(table)
    scores = scored["score"].to_numpy(dtype=float)
    n = len(scores)
    labels = scored["label"].astype(str) if "label" in scored.columns else None
    thresholds = sorted({float(t) for t in pd.to_numeric(scored["threshold"], errors="coerce").dropna()}) \
        if "threshold" in scored.columns else []
    return json_ready({
        "schema": BATCH_SCHEMA,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "n_rows": len(table),
        "n_scored": n,
        "quantiles": {f"{q:g}": float(np.quantile(scores, q)) if n else None for q in QUANTILES},
        "mean": float(scores.mean()) if n else None,
        "std": float(scores.std()) if n else None,
        "min": float(scores.min()) if n else None,
        "max": float(scores.max()) if n else None,
        "alarm_rate": float((labels == "defective").mean()) if n and labels is not None else None,
        "threshold": thresholds[0] if len(thresholds) == 1 else thresholds or None,
        "model": model,
    })


def write_batch_summary(predictions_dir: Path | str, table: pd.DataFrame | None = None,
                        model: dict[str, Any] | None = None) -> Path:
    """Write ``predictions_dir/monitor/batch.json`` (atomically) from `table` (default: the
    folder's predictions.csv); returns its path."""
    table = read_batch(predictions_dir) if table is None else table
    return write_json(Path(predictions_dir) / MONITOR_DIR / BATCH_FILE, batch_summary(table, model))


def drift_test(batch: np.ndarray, reference: np.ndarray, bounds: Bounds = Bounds()) -> dict[str, Any]:
    """Two-sample KS test of `batch` against `reference` scores (1-D, raw units)."""
    from scipy.stats import ks_2samp

    test = ks_2samp(np.asarray(batch, float), np.asarray(reference, float), alternative="two-sided")
    statistic, pvalue = float(test.statistic), float(test.pvalue)
    return {"ks_statistic": statistic, "ks_pvalue": pvalue,
            "drift": bool(pvalue < bounds.ks_p and statistic > bounds.ks_statistic)}


def input_drift_test(table: pd.DataFrame, inputs: Mapping[str, np.ndarray], bounds: Bounds = Bounds()
                     ) -> dict[str, Any]:
    """The input drift test (module docstring) of a predictions `table`'s scored rows against
    the model's `inputs` reference (statistic -> values): per statistic the KS figures and
    both medians, ``drift`` when one crosses, and the Bonferroni ``p_bound``. Without the
    columns or the reference, ``{"drift": False, "not_run": why}``."""
    names = [name for name in inputs if name in table.columns]
    if not inputs or not names:
        why = ("the model keeps no input reference (fitted before dualstpm kept one: fit it again)" if not inputs else
               "the table has no input statistics (columns brightness, contrast: written by `dualstpm predict`)")
        return {"drift": False, "not_run": why}
    scored = scored_rows(table)
    p_bound = bounds.ks_p / len(names)
    found: dict[str, Any] = {}
    for name in names:
        batch = pd.to_numeric(scored[name], errors="coerce").dropna().to_numpy(dtype=float)
        reference = np.asarray(inputs[name], dtype=float)
        if not len(batch):
            found[name] = {"ks_statistic": None, "ks_pvalue": None, "drift": False}
            continue
        found[name] = {**drift_test(batch, reference, replace(bounds, ks_p=p_bound)),
                       "batch_median": float(np.median(batch)), "reference_median": float(np.median(reference)),
                       "n_reference": len(reference)}
    return {"drift": any(f["drift"] for f in found.values()), "p_bound": p_bound, "statistics": found}


def describe_inputs(inputs: dict[str, Any]) -> str:
    """One line on an `input_drift_test` result: each statistic's KS figures and medians, or why it did not run."""
    if "not_run" in inputs:
        return f"input drift not tested: {inputs['not_run']}"
    parts = [f"{name} KS {_fmt(f['ks_statistic'])} (p {_fmt(f['ks_pvalue'])}, median {_fmt(f.get('batch_median'))} "
             f"vs {_fmt(f.get('reference_median'))} in training)" for name, f in inputs["statistics"].items()]
    return "input " + ", ".join(parts) + (": input drift" if inputs["drift"] else "")


def alarm_test(n_alarms: int, n: int, target: float, bounds: Bounds = Bounds()) -> dict[str, Any]:
    """One-sided binomial test: are `n_alarms` of `n` more than the false-alarm rate `target`
    (plus `bounds.expected_defect_rate`) explains? ``alarm_pvalue`` = P(X >= n_alarms), X ~
    Binomial(n, expected)."""
    from scipy.stats import binomtest

    expected = target + bounds.expected_defect_rate * (1.0 - target)
    pvalue = float(binomtest(int(n_alarms), int(n), expected, alternative="greater").pvalue) if n else 1.0
    return {"n_alarms": int(n_alarms), "alarm_rate": n_alarms / n if n else None, "alarm_expected": expected,
            "alarm_pvalue": pvalue, "too_many_alarms": bool(pvalue < bounds.alarm_p)}


def override_rate(predictions_dir: Path | str) -> dict[str, Any]:
    """The inspectors' verdicts on a batch against the model's labels (current verdicts of its
    review log; all None without one)."""
    log_dir = review_dir(predictions_dir)
    verdicts = list(ReviewLog(log_dir).refresh().current().values()) if (log_dir / LOG_FILE).is_file() else []
    if not verdicts:
        return {"n_reviewed": 0, "override_rate": None, "false_alarms_overruled": None, "misses": None}
    overruled = sum(v["verdict"] == "good" and v.get("model_label") == "defective" for v in verdicts)
    misses = sum(v["verdict"] == "defective" and v.get("model_label") == "good" for v in verdicts)
    return {"n_reviewed": len(verdicts), "override_rate": (overruled + misses) / len(verdicts),
            "false_alarms_overruled": overruled, "misses": misses}


# --------------------------------------------------------------------------- the model's reference


@dataclass(frozen=True)
class Reference:
    """The model side: its validation scores (decision view, raw units), threshold and target."""

    run: str
    category: str
    decision_view: str
    threshold: float
    false_alarm_rate: float
    false_alarm_bound: float | None
    scores: np.ndarray
    weights_sha256: str
    mlflow_run_id: str | None
    #: the input statistics of the good images the model trained on (statistic -> values); empty: none kept
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def promised_false_alarm_rate(self) -> float:
        """The false-alarm rate the threshold promises: the target, or the bound when higher."""
        return max(self.false_alarm_rate, self.false_alarm_bound or 0.0)


def validation_scores(run_dir: Path | str) -> Reference:
    """Load RUN's detector (CPU) and score its stored validation maps (``RUN/maps/val.npz``)
    in its decision view with its own fusion and image score (the detector's
    `model.inference.MapViews`, as the test and the ablation score stored maps). Raises
    RunError when the maps are missing or were computed by another model (the fix:
    ``dualstpm test --run RUN``)."""
    from dualstpm.ablation.selection import check_same_model
    from dualstpm.detector import Detector
    from dualstpm.maps import MapSet
    from dualstpm.rundir import MAPS_DIR, VAL_MAPS

    run_dir = Path(run_dir)
    detector = Detector.load(run_dir, device="cpu")
    val = MapSet.load(run_dir / MAPS_DIR / VAL_MAPS)
    fingerprint = check_same_model(run_dir, val)
    view = detector.decision_view
    scores = detector.inference.views.stack(val.raw, view)[1]
    lineage = read_lineage(run_dir) or {}
    kept = detector.calibration.input_reference or {}
    inputs = {name: np.asarray(kept[name], dtype=float) for name in INPUT_STATISTICS if name in kept}
    return Reference(str(run_dir.resolve()), detector.calibration.category, view, float(detector.threshold),
                     float(detector.calibration.false_alarm_rate), detector.calibration.false_alarm_bound,
                     scores, fingerprint, lineage.get("run_id"), inputs)


# --------------------------------------------------------------------------- all batches


@dataclass
class BatchReport:
    """One batch against the reference (`MONITOR_FILE`'s ``batches`` entries)."""

    name: str
    folder: str
    n_scored: int
    batch: dict[str, Any]
    drift: dict[str, Any]
    alarms: dict[str, Any]
    review: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    inputs: dict[str, Any] = field(default_factory=lambda: {"drift": False, "not_run": "not computed"})

    @property
    def crossed(self) -> bool:
        return bool(self.drift["drift"] or self.inputs["drift"] or self.alarms["too_many_alarms"])


@dataclass
class MonitorResult:
    reference: Reference
    bounds: Bounds
    batches: list[BatchReport]
    scores: dict[str, np.ndarray]  # batch name -> its scores (for the figures)

    @property
    def crossed(self) -> bool:
        """True when any batch drifted or raised too many alarms."""
        return any(b.crossed for b in self.batches)

    def to_json(self) -> dict[str, Any]:
        ref = self.reference
        return json_ready({
            "schema": 1,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "model": {"run": ref.run, "category": ref.category, "decision_view": ref.decision_view,
                      "threshold": ref.threshold, "false_alarm_rate": ref.false_alarm_rate,
                      "false_alarm_bound": ref.false_alarm_bound,
                      "promised_false_alarm_rate": ref.promised_false_alarm_rate, "weights_sha256": ref.weights_sha256,
                      "mlflow_run_id": ref.mlflow_run_id},
            "validation": {"n": len(ref.scores), **{f"q{q:g}": float(np.quantile(ref.scores, q)) for q in QUANTILES}},
            "input_reference": {name: {"n": len(values), "median": float(np.median(values))}
                                for name, values in ref.inputs.items()},
            "bounds": asdict(self.bounds),
            "crossed": self.crossed,
            "exit_code": NOT_DONE_EXIT if self.crossed else 0,
            "batches": [{**asdict(b), "crossed": b.crossed} for b in self.batches],
        })


def _batch_name(folder: Path, taken: set[str]) -> str:
    name, k = folder.name or "batch", 2
    while name in taken:
        name, k = f"{folder.name}-{k}", k + 1
    taken.add(name)
    return name


def monitor_batches(reference: Reference, predictions_dirs: Sequence[Path | str],
                    bounds: Bounds = Bounds()) -> MonitorResult:
    """Each batch against `reference` (module docstring); writes ``monitor/batch.json`` into
    a folder that has none. Raises DataError for a folder without a readable table."""
    reports, all_scores, taken = [], {}, set()
    for folder in map(Path, predictions_dirs):
        table = read_batch(folder)
        if not (folder / MONITOR_DIR / BATCH_FILE).is_file():
            write_batch_summary(folder, table, {"run": reference.run, "decision_view": reference.decision_view})
        scores = scored_rows(table)["score"].to_numpy(dtype=float)
        name = _batch_name(folder, taken)
        notes = []
        if not len(scores):
            notes.append("no scored image in this batch: nothing to compare")
        if len(reference.scores) < FEW_REFERENCE_SCORES:
            notes.append(f"the model has only {len(reference.scores)} validation scores: the drift test sees "
                         "only large shifts")
        if "threshold" in table.columns and len(scores):
            used = set(pd.to_numeric(scored_rows(table)["threshold"], errors="coerce").dropna().round(12))
            if used and used != {round(reference.threshold, 12)}:
                notes.append(f"the table's labels used threshold {sorted(used)}, not the model's {reference.threshold:.6g} "
                             "(predict --threshold, or another model): alarms are counted at the model's threshold")
        drift = drift_test(scores, reference.scores, bounds) if len(scores) else \
            {"ks_statistic": None, "ks_pvalue": None, "drift": False}
        alarms = alarm_test(int((scores > reference.threshold).sum()), len(scores),
                            reference.promised_false_alarm_rate, bounds)
        inputs = input_drift_test(table, reference.inputs, bounds)
        reports.append(BatchReport(name, str(folder.resolve()), len(scores), batch_summary(table), drift, alarms,
                                   override_rate(folder), notes, inputs))
        all_scores[name] = scores
    return MonitorResult(reference, bounds, reports, all_scores)


# --------------------------------------------------------------------------- the report


def _score_figure(result: MonitorResult, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    reference = np.sort(result.reference.scores)
    ax.step(reference, np.arange(1, len(reference) + 1) / len(reference), where="post", color="black", linewidth=2,
            label=f"validation ({len(reference)} good)")
    for report in result.batches:
        scores = np.sort(result.scores[report.name])
        if len(scores):
            ks = report.drift["ks_statistic"]
            ax.step(scores, np.arange(1, len(scores) + 1) / len(scores), where="post",
                    label=f"{report.name} (n={len(scores)}, KS {ks:.2f})")
    ax.axvline(result.reference.threshold, color="red", linestyle="--", label="threshold")
    ax.set(xlabel="image score (raw units)", ylabel="share of images scoring at most x",
           title=f"{result.reference.category}: score distributions (empirical CDF)", ylim=(0, 1.02))
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def _rate_figure(result: MonitorResult, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    names = [b.name for b in result.batches]
    x = np.arange(len(names))
    alarm = [b.alarms["alarm_rate"] or 0.0 for b in result.batches]
    override = [b.review["override_rate"] or 0.0 for b in result.batches]
    ax.bar(x - 0.2, alarm, width=0.4, label="alarm rate")
    ax.bar(x + 0.2, override, width=0.4, label="override rate (reviewed parts)")
    expected = result.batches[0].alarms["alarm_expected"] if result.batches else result.reference.promised_false_alarm_rate
    ax.axhline(expected, color="red", linestyle="--", label=f"expected alarm rate ({expected:.1%})")
    ax.set_xticks(x, names, rotation=20, ha="right")
    top = min(1.0, 1.25 * max([expected, *alarm, *override, 0.04]))  # small rates stay readable
    ax.set(ylabel="share of the batch", title="alarms and inspectors' overrides per batch", ylim=(0, top))
    ax.legend(fontsize="small")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def _fmt(value: Any, pattern: str = "{:.3g}") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)


def _html(result: MonitorResult) -> str:
    ref, bounds = result.reference, result.bounds
    rows = []
    for b in result.batches:
        status = "ALARM" if b.crossed else "ok"
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in (
            b.name, b.n_scored, _fmt(b.drift["ks_statistic"]), _fmt(b.drift["ks_pvalue"]),
            "yes" if b.drift["drift"] else "no", _fmt(b.alarms["alarm_rate"], "{:.1%}"),
            _fmt(b.alarms["alarm_pvalue"]), "yes" if b.alarms["too_many_alarms"] else "no",
            f"{_fmt(b.review['override_rate'], '{:.1%}')} of {b.review['n_reviewed']}", status,
            describe_inputs(b.inputs), "; ".join(b.notes))) + "</tr>")
    verdict = ("A bound was crossed: look at the batches marked ALARM." if result.crossed
               else "No bound crossed.")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dualstpm monitor: {html.escape(ref.category)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child,th:first-child{{text-align:left}}</style>
</head><body>
<h1>Monitor: {html.escape(ref.category)}</h1>
<p><strong>{verdict}</strong></p>
<p>Model: {html.escape(ref.run)} (decides with <code>{html.escape(ref.decision_view)}</code>, threshold
{ref.threshold:.6g}, calibrated false-alarm target {ref.false_alarm_rate:.1%}); reference: the scores of its
{len(ref.scores)} good validation images.</p>
<p>Bounds: drift when KS p &lt; {bounds.ks_p:g} and KS statistic &gt; {bounds.ks_statistic:g}; input drift when the KS
test of the images' brightness or contrast against the training images' has p &lt; {bounds.ks_p / 2:g} and statistic
&gt; {bounds.ks_statistic:g}; too many alarms when
the one-sided binomial p &lt; {bounds.alarm_p:g} against the false-alarm rate the threshold promises,
{ref.promised_false_alarm_rate:.1%}, plus an expected defect rate of {bounds.expected_defect_rate:.1%}.</p>
<table><tr><th>batch</th><th>n</th><th>KS statistic</th><th>KS p</th><th>drift</th><th>alarm rate</th>
<th>binomial p</th><th>too many alarms</th><th>override rate</th><th>status</th><th>inputs</th><th>notes</th></tr>
{''.join(rows)}</table>
<h2>Score distributions</h2><img src="scores.png" alt="empirical CDFs of the validation and batch scores">
<h2>Alarm and override rates</h2><img src="rates.png" alt="alarm and override rate per batch">
<p>Figures in monitor.json; the rules: docs/loop.md.</p>
</body></html>
"""


def write_report(result: MonitorResult, out_dir: Path | str) -> Path:
    """Write the report folder (replaced whole, atomically): ``monitor.json``, ``report.html``,
    ``scores.png`` (empirical CDFs), ``rates.png`` (alarm and override rates). Returns it."""
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as staging:
        write_json(staging / MONITOR_FILE, result.to_json())
        _score_figure(result, staging / "scores.png")
        _rate_figure(result, staging / "rates.png")
        write_text(staging / REPORT_FILE, _html(result))
    return out_dir
