"""Monitoring's MLflow side: `dualstpm monitor` and the monitor flow log each report to the
model's store (the comparison itself, the report and the batch summaries are
`dualstpm.monitor`'s, which knows nothing of MLflow)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dualstpm.errors import DataError
from dualstpm.mlops.tracking import Store
from dualstpm.monitor import MLFLOW_EXPERIMENT, Bounds, MonitorResult, monitor_batches, validation_scores, write_report


def log_to_mlflow(result: MonitorResult, report_dir: Path, store: Store) -> tuple[str, str]:
    """Log the figures and the report to a new run of the ``dualstpm-monitor`` experiment in
    the model's store (`dualstpm.mlops.lineage.run_store`: `store` when the user named it
    (``MLFLOW_TRACKING_URI``, ``tracking.uri``), else the store the run records, else
    `store`, the project's SQLite file), which
    must exist (`tracking.connect` with ``create=False``: no empty store appears in the
    folder monitor runs in): per batch (step = its position) ``ks_statistic``,
    ``ks_pvalue``, ``alarm_rate``, ``alarm_pvalue``, ``override_rate``, ``n_scored``; the
    report folder as artifacts. Returns (tracking URI, run id). Raises TrackingError."""
    import time

    from mlflow.entities import Metric, RunTag

    from dualstpm.mlops.lineage import run_store
    from dualstpm.mlops.tracking import TAG, connect, ensure_experiment, tracking_errors

    ref = result.reference
    client = connect(run_store(store, Path(ref.run)), create=False)
    experiment = ensure_experiment(client, MLFLOW_EXPERIMENT)
    tags = {f"{TAG}category": ref.category, f"{TAG}run_dir": ref.run, f"{TAG}weights_sha256": ref.weights_sha256,
            f"{TAG}monitor_crossed": str(result.crossed).lower(),
            f"{TAG}batches": ", ".join(b.folder for b in result.batches)}
    if ref.mlflow_run_id:
        tags[f"{TAG}model_run_id"] = ref.mlflow_run_id
    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, step)
               for step, b in enumerate(result.batches)
               for key, value in (("ks_statistic", b.drift["ks_statistic"]), ("ks_pvalue", b.drift["ks_pvalue"]),
                                  ("alarm_rate", b.alarms["alarm_rate"]), ("alarm_pvalue", b.alarms["alarm_pvalue"]),
                                  ("override_rate", b.review["override_rate"]), ("n_scored", b.n_scored),
                                  *((f"input.{name}.{k}", f[k]) for name, f in b.inputs.get("statistics", {}).items()
                                    for k in ("ks_statistic", "ks_pvalue")))
               if value is not None]
    with tracking_errors(client.tracking_uri, "logging the monitor report"):
        run = client.create_run(experiment, run_name=f"monitor/{ref.category}", tags=tags)
        run_id = run.info.run_id
        client.log_batch(run_id, metrics=metrics, tags=[RunTag(k, v) for k, v in tags.items()])
        client.log_artifacts(run_id, str(report_dir), "monitor")
        client.set_terminated(run_id, "FINISHED")
    return client.tracking_uri, run_id


def run_monitor(run_dir: Path | str, predictions_dirs: Sequence[Path | str], out_dir: Path | str,
                bounds: Bounds = Bounds(), store: Store | None = None) -> tuple[MonitorResult, Path, str | None]:
    """What ``dualstpm monitor`` does: compare, write the report, and log it to MLflow
    (`log_to_mlflow`, with the `store` the entry point resolved) unless `store` is None.
    Returns (the result, the report folder, the MLflow run id or None)."""
    if not predictions_dirs:
        raise DataError("no predictions folder given: pass the folders `dualstpm predict --out` wrote")
    result = monitor_batches(validation_scores(run_dir), predictions_dirs, bounds)
    report = write_report(result, out_dir)
    run_id = log_to_mlflow(result, report, store)[1] if store is not None else None
    return result, report, run_id
