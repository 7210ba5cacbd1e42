"""Monitoring as a Prefect flow: `dualstpm monitor`, plus a visible event when a bound is crossed.

    python -m flows.monitor --run runs/bottle preds/monday preds/tuesday [--retrain-on-alarm]

The flow runs :func:`dualstpm.mlops.monitoring.run_monitor` (report folder, MLflow run) and, when a
batch drifts or raises too many alarms, emits the Prefect event `EVENT` (resource
``dualstpm.model.<category>``, payload: the batches that crossed with their figures), seen
in the UI's event feed; a Prefect automation can match it to notify someone or to run the
``dualstpm-retrain`` deployment. With ``retrain_on_alarm`` the flow runs the retrain flow
itself for the model's category. The command exits with 3 when a bound was crossed, as
``dualstpm monitor`` does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.events import emit_event

from dualstpm.config import load_params
from dualstpm.errors import NOT_DONE_EXIT
from dualstpm.mlops.tracking import entry_store
from dualstpm.mlops.monitoring import run_monitor
from dualstpm.monitor import Bounds
from flows.pipeline import entry_point, run_options

EVENT = "dualstpm.monitor.bound-crossed"


def resource_id(category: str) -> str:
    """The Prefect resource id of a category's model in the events this flow emits."""
    return f"dualstpm.model.{category}"


@flow(name="dualstpm-monitor")
def monitor(run: str, predictions: list[str], report: str = "monitor", params_file: str | None = "params.yaml",
            overrides: list[str] | None = None, use_mlflow: bool = True, retrain_on_alarm: bool = False,
            out: str = "out", use_dvc: bool = True, ks_p: float = 0.01, ks_statistic: float = 0.2,
            alarm_p: float = 0.01, expected_defect_rate: float = 0.0) -> dict:
    """Monitor `predictions` against RUN's validation scores (report into `report`); emit `EVENT`
    when a bound is crossed and, with `retrain_on_alarm`, retrain the category (runs/reports
    into `out`, data through DVC unless `use_dvc` is false). Returns monitor.json's content
    plus ``event_id`` (None when nothing was emitted) and ``retrain`` (its summary, or None).
    `params_file` None: the built-in defaults; a file that does not exist is refused (ConfigError)."""
    logger = get_run_logger()
    params = load_params(Path(params_file) if params_file is not None else None, overrides or [])
    bounds = Bounds(ks_p, ks_statistic, alarm_p, expected_defect_rate)
    result, folder, mlflow_run = run_monitor(run, predictions, report, bounds, entry_store(params) if use_mlflow else None)
    summary = {**result.to_json(), "report": str(folder.resolve()), "mlflow_run_id": mlflow_run,
               "event_id": None, "retrain": None}
    if not result.crossed:
        logger.info("%d batch(es) within the bounds; report %s", len(result.batches), folder / "report.html")
        return summary
    category = result.reference.category
    crossed = [{"batch": b.folder, "ks_statistic": b.drift["ks_statistic"], "ks_pvalue": b.drift["ks_pvalue"],
                "drift": b.drift["drift"], "alarm_rate": b.alarms["alarm_rate"], "alarm_pvalue": b.alarms["alarm_pvalue"],
                "too_many_alarms": b.alarms["too_many_alarms"], "input_drift": b.inputs["drift"]}
               for b in result.batches if b.crossed]
    event = emit_event(event=EVENT, resource={"prefect.resource.id": resource_id(category),
                                              "prefect.resource.name": f"dualstpm model of {category}",
                                              "dualstpm.run": result.reference.run},
                       payload={"crossed": crossed, "report": summary["report"], "mlflow_run_id": mlflow_run})
    summary["event_id"] = str(event.id) if event is not None else None
    logger.warning("monitor bound crossed for %s in %d batch(es): event %s emitted; report %s", category,
                   len(crossed), EVENT, folder / "report.html")
    if retrain_on_alarm:
        from flows.retrain import retrain

        summary["retrain"] = retrain([category], params_file, overrides, out, use_dvc)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = run_options(argparse.ArgumentParser(prog="python -m flows.monitor", description=__doc__.splitlines()[0]))
    parser.add_argument("predictions", nargs="+", help="predictions folders (predictions.csv) to check")
    parser.add_argument("--run", required=True, help="run directory of the model that scored them")
    parser.add_argument("--report", default="monitor", help="report folder (default: monitor)")
    parser.add_argument("--no-mlflow", dest="use_mlflow", action="store_false", help="do not log to MLflow")
    parser.add_argument("--retrain-on-alarm", action="store_true", help="run the retrain flow when a bound is crossed")
    args = parser.parse_args(argv)
    summary = monitor(args.run, args.predictions, args.report, args.params, args.overrides, args.use_mlflow,
                      args.retrain_on_alarm, args.out, args.use_dvc)
    print(f"{'bound crossed' if summary['crossed'] else 'within the bounds'}: {summary['report']}/report.html")
    if summary["crossed"]:
        raise SystemExit(NOT_DONE_EXIT)
    return summary


if __name__ == "__main__":
    entry_point(main)
