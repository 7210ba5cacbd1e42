"""The whole pipeline as a Prefect flow: data → fit/test per category → report → register, promote.

    python -m flows.pipeline                     # params.yaml, outputs in out/
    python -m flows.pipeline --set fit.epochs=5 --no-dvc

With no server configured, Prefect starts a temporary local API for the run. The
categories fan out on the task runner of `prefect.task_runner` (threads, or Dask); a
category that fails is reported at the end without costing the others their models,
metrics, report rows or registry versions. Run directories land in `<out>/runs/<category>`
and the report in `<out>/reports` (the same layout `dvc repro` writes to `runs/` and
`reports/`, kept apart so neither overwrites the other's versioned outputs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from prefect import flow, unmapped
from prefect.artifacts import create_table_artifact
from prefect.futures import PrefectFuture, wait

from dualstpm.ablation import describe_outcome, read_summary
from dualstpm.config import Params, load_params
from dualstpm.errors import ConfigError, DualStpmError, PipelineError
from dualstpm.mlops.promote import PromotionDecision
from dualstpm.mlops.tracking import Store, connect, entry_store, quiet_artifact_progress
from dualstpm.rundir import METRICS_FILE
from dualstpm.tables import print_pipeline_summary
from flows.tasks import (
    ablate_task,
    changes_task,
    check_task,
    data_task,
    ensure_training_limit,
    evidence_task,
    fit_task,
    make_task_runner,
    promote_task,
    register_task,
    report_task,
    test_task,
)

RUNS, REPORTS = "runs", "reports"


def _failure(*steps: tuple[str, PrefectFuture]) -> str | None:
    """Why a chain of tasks stopped (the first step that did not complete), or None."""
    for stage, future in steps:
        state = future.state
        if not state.is_completed():
            return f"{stage}: {state.message}"
    return None


@flow(name="dualstpm-categories")
def categories_flow(params: Params, store: Store, data_root: Path, categories: list[str],
                    runs_dir: Path) -> dict[str, str | None]:
    """Check, fit, test and ablate each category on this flow's task runner, logging to
    `store`; {category: None, or the stage that failed and why}."""
    run_dirs = [runs_dir / category for category in categories]
    checks = check_task.map(unmapped(data_root), categories)
    fits = fit_task.map(unmapped(params), unmapped(store), checks, categories, run_dirs)
    tests = test_task.map(unmapped(params), unmapped(store), fits, unmapped(data_root), categories)
    ablations = ablate_task.map(unmapped(params), unmapped(store), tests)
    wait([*checks, *fits, *tests, *ablations])
    return {c: _failure(("data", d), ("fit", f), ("test", t), ("ablate", a))
            for c, d, f, t, a in zip(categories, checks, fits, tests, ablations)}


def _release(params: Params, store: Store, run_dirs: dict[str, Path], data_root: Path | None = None
             ) -> tuple[dict[str, PromotionDecision], dict[str, str]]:
    """Register each tested run as a new version, then promote it by evidence; (decisions,
    failures). With `data_root` (retraining), the champion is first re-tested on the
    challenger's data when needed and the reviewed false alarms are measured (`evidence_task`)."""
    registered = {c: register_task.submit(run_dir, params, store, c) for c, run_dir in run_dirs.items()}
    measured = ({c: evidence_task.submit(params, store, data_root, c, run_dir, wait_for=[registered[c]])
                 for c, run_dir in run_dirs.items()} if data_root is not None else {})
    decisions = {c: promote_task.submit(c, params, store, measured.get(c), wait_for=[registered[c]])
                 for c in run_dirs}
    wait(list(decisions.values()))
    done, failed = {}, {}
    for category, future in decisions.items():
        steps = [("register", registered[category]), *([("evidence", measured[category])] if measured else []),
                 ("promote", future)]
        why = _failure(*steps)
        if why:
            failed[category] = why
        else:
            done[category] = future.result()
    return done, failed


def _report(run_dirs: dict[str, Path], out_dir: Path) -> tuple[list[dict], str | None]:
    """The AUC table of `run_dirs` (also a Prefect table artifact); (rows, None, or why the
    report failed). A failed report costs no category its registration."""
    if not run_dirs:
        return [], None
    report = report_task.submit(run_dirs, out_dir)
    wait([report])
    why = _failure(("report", report))
    if why:
        return [], why
    table = report.result()
    create_table_artifact(table, key="dualstpm-auc-table", description="AUC table of the tested categories")
    return table, None


def run_categories(params: Params, store: Store, categories: list[str], out: Path, dvc_project: Path | None,
                   *, retraining: bool = False, changed_only: bool = False) -> dict:
    """The body of `pipeline` and `retrain`. Every stage logs to `store`, which the flow
    resolved once (`entry_store`).

    With `retraining`, each challenger is promoted on evidence measured on the challenger's
    data (`evidence_task`: the champion re-tested there when it was tested on other data,
    the reviewed false alarms under both); with `changed_only` too, categories whose data
    is what their registered model was tested on are skipped (`skipped`: why).

    The report covers every configured category whose run directory holds a test
    (retraining one category refreshes its row, the others keep theirs), except those
    that failed in this run. Raises PipelineError naming the failed categories after
    everything the others could do is done.
    """
    ensure_training_limit(params.prefect.training_slots)
    # the store is opened once, here, before the categories run side by side: a new one is
    # created (and said so) once, not raced for by each category's first connection
    connect(store)
    data_root = data_task(params, dvc_project)
    skipped = changes_task(params, store, data_root, categories) if changed_only else {}
    categories = [c for c in categories if c not in skipped]
    runs_dir = out / RUNS
    fan_out = categories_flow.with_options(task_runner=make_task_runner(params.prefect))
    failed = ({c: why for c, why in fan_out(params, store, data_root, categories, runs_dir).items() if why}
              if categories else {})
    tested = {c: runs_dir / c for c in categories if c not in failed}
    reportable = {c: runs_dir / c for c in params.data.categories
                  if c not in failed and (runs_dir / c / METRICS_FILE).is_file()}
    table, report_failed = _report(reportable, out / REPORTS)
    promotions, release_failed = _release(params, store, tested, data_root if retraining else None)
    failed.update(release_failed)
    if failed or report_failed:
        lines = "\n".join(f"  {c}: {why}" for c, why in failed.items())
        report_line = f"\n  {report_failed}" if report_failed else ""
        raise PipelineError(
            f"{len(failed)} of {len(categories)} categories failed (the others' models, metrics and report "
            f"rows are kept in {out}):\n{lines}{report_line}"
        )
    summary = {"auc_table": table, "ablations": _ablation_outcomes(tested), "promotions": promotions,
               "reports": str(out / REPORTS)}
    return {**summary, "skipped": skipped} if changed_only else summary


def _ablation_outcomes(run_dirs: dict[str, Path]) -> dict[str, str]:
    """{category: what its ablation chose and what the model decides with} (`describe_outcome`)."""
    return {c: describe_outcome(read_summary(run_dir)) for c, run_dir in run_dirs.items()}


def check_categories(params: Params, categories: list[str]) -> list[str]:
    """Categories to run must be configured ones: the data step prepares data.categories only."""
    unknown = [c for c in categories if c not in params.data.categories]
    if unknown or not categories:
        raise ConfigError(
            f"categories {unknown or '(none)'} are not in data.categories {params.data.categories}: "
            "add them to data.categories in params.yaml (or with --set) first; a category of your own folder also "
            "needs data.source=folder and data.root=DIR (e.g. --set data.source=folder --set data.root=../shared/data "
            f"--set 'data.categories=[{(unknown or ['CATEGORY'])[0]}]')."
        )
    return list(dict.fromkeys(categories))


@flow(name="dualstpm-pipeline")
def pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None, out: str = "out",
             use_dvc: bool = True) -> dict:
    """Every configured category: data (through DVC unless `use_dvc` is false), fit, test,
    report, register and promote, in the MLflow store resolved here once (`entry_store`).
    Returns the AUC table and the promotion decisions."""
    params = load_params(Path(params_file), overrides or [])
    dvc_project = Path.cwd() if use_dvc else None
    return run_categories(params, entry_store(params), check_categories(params, params.data.categories),
                          Path(out).resolve(), dvc_project)


def run_options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command-line options every flow entry point shares."""
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param (repeatable); data.* must match params.yaml unless --no-dvc")
    parser.add_argument("--out", default="out", help="folder for runs/ and reports/ (default: out)")
    parser.add_argument("--no-dvc", dest="use_dvc", action="store_false",
                        help="prepare the data directly instead of through DVC's download stage")
    return parser


def entry_point(main: Callable[[], object]) -> None:
    """Run a flow's command line: a user error ends with its message and exit code 2 (75 for a
    network failure worth retrying), as `dualstpm` does (and, as there, no MLflow artifact
    progress bars in the logs)."""
    quiet_artifact_progress()
    try:
        main()
    except DualStpmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None


def main(argv: list[str] | None = None) -> dict:
    parser = run_options(argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    summary = pipeline(args.params, args.overrides, args.out, args.use_dvc)
    print_pipeline_summary(summary)  # as `dualstpm demo` ends
    return summary


if __name__ == "__main__":
    entry_point(main)
