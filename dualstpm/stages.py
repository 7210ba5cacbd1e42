"""The pipeline's stages as plain functions: the CLI, `dvc.yaml` and Prefect flows call these.

Each takes validated `Params` and paths, does one thing, and returns plain data.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from dualstpm.ablation import ABLATION_DIR, AblationResult, ablate
from dualstpm.config import Params
from dualstpm.data import load_category, make_synthetic_category, prepare_mvtec
from dualstpm.detector import FUSION_FILE, MODEL_SUBDIR, Calibration, read_model_dir
from dualstpm.errors import DataError, RunError, TrackingError
from dualstpm.evaluation import METRICS_FILE, test_run
from dualstpm.figures import PLOTS_DIR
from dualstpm.files import write_csv
from dualstpm.lineage import check_model_of_run, record_model
from dualstpm.maps import MAPS_DIR
from dualstpm.metrics import category_means
from dualstpm.tracking import (
    RUN_RECORD,
    TAG,
    CategoryRun,
    RunRecord,
    connect,
    data_hash,
    open_category_run,
    params_for_data,
    tracking_errors,
)
from dualstpm.training import HISTORY_FILE, FitResult, check_start, fit

TABLE_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
AUC_TABLE = "auc_table.csv"


def synthetic_kind(category: str) -> str:
    """Synthetic categories say their kind in their name: `*object*` -> object, else texture."""
    return "object" if "object" in category else "texture"


def prepare_root(params: Params) -> Path:
    """Make the data root ready and return it, without checking each category's layout.

    - `synthetic`: generate each missing category (deterministic, seeded by `seed`);
    - `folder`: check that `data.root` is a folder (its categories: :func:`check_category`);
    - `mvtec`: download (or take the user's archive), verify and extract.

    Raises DataError (a download that failed for a while: its subclass NetworkError).
    """
    root = Path(params.data.root)
    source = params.data.source
    if source == "synthetic":
        for index, category in enumerate(params.data.categories):
            if not (root / category).is_dir():
                make_synthetic_category(root, category, synthetic_kind(category), seed=params.seed + index)
    elif source == "folder":
        if not root.is_dir():
            raise DataError(f"data.root {root} is not a folder: point data.root at an MVTec-layout data root")
    else:
        mvtec = params.data.mvtec
        prepare_mvtec(root, params.data.categories, url=mvtec.url, sha256=mvtec.sha256, archive=Path(mvtec.archive))
    return root


def check_category(data_root: Path, category: str) -> Path:
    """Raise DataError naming the first problem of `category`'s files (a missing mask, a
    missing folder, an empty split, ...); return `data_root` when it can be trained on."""
    load_category(Path(data_root), category)
    return Path(data_root)


def prepare_data(params: Params) -> Path:
    """:func:`prepare_root`, then every configured category checked; returns the data root."""
    root = prepare_root(params)
    for category in params.data.categories:
        check_category(root, category)
    return root


def tracked_fit(params: Params, data_root: Path, category: str, run_dir: Path, *,
                resume: bool = False, overwrite: bool = False) -> FitResult:
    """`training.fit` logged to MLflow: the category's parent run and a child per branch,
    per-epoch losses, the selected epochs and thresholds.

    An unreachable store fails before training; a store lost during training does not stop
    it: the model is saved first, then the TrackingError says so and how to log it later.
    """
    check_start(run_dir, resume=resume, overwrite=overwrite)  # contradictory flags fail before the store opens
    connect(params)  # fail fast: nothing trained yet, nothing lost
    tracked = params_for_data(params, data_root)
    opened: list[CategoryRun] = []
    failures: list[TrackingError] = []

    def run() -> CategoryRun:  # opened at the first epoch, so a fit refused up front leaves no run behind
        if not opened:
            opened.append(open_category_run(tracked, run_dir, category, data_root, reuse=resume, source="dualstpm fit"))
        return opened[0]

    def on_epoch(record: dict[str, float]) -> None:
        if not failures:  # one failure is enough: no retrying on every epoch
            try:
                run().log_epoch(record)
            except TrackingError as exc:
                failures.append(exc)

    try:
        result = fit(params, data_root, category, run_dir, resume=resume, overwrite=overwrite, on_epoch=on_epoch)
    except BaseException:
        if opened:
            with contextlib.suppress(TrackingError):
                opened[0].finish("FAILED")
        raise
    if not failures:
        try:
            record_model(run())
            run().log_missing_epochs(result.history)  # epochs an interruption kept from a run (resume)
            run().log_fit(result.selected_epochs, result.thresholds)
            run().finish()
        except TrackingError as exc:
            failures.append(exc)
    elif opened:  # the run holds the epochs: the model names it, and `test` logs its hash later
        record_model(opened[0], log_hash=False)
    if failures:
        raise TrackingError(
            f"the model is trained and saved in {result.model_dir}, but logging it to MLflow failed: {failures[0]}\n"
            f"Once the store answers again, `dualstpm test --run {run_dir} --data-root {data_root}` logs the "
            "run (a new one if this one is gone), then `dualstpm register` can register it."
        )
    return result


def tracked_test(params: Params, run_dir: Path, data_root: Path, category: str, device: str = "auto") -> dict:
    """`evaluation.test_run` logged to MLflow into the run `tracked_fit` started (or a new
    one, filled from the run directory's files, when there is none in this store): the
    metrics of the fused model and each branch, the AUC table, curves and overlays, and
    the evaluation data's hash that promotion compares. Returns metrics.json's content.

    Runs are described by the model's own params (what was trained); only the `tracking`
    section comes from `params` (where to log now). A run's results describe one
    evaluation: a run directory tested on another category or other data is refused
    (RunError) before anything is written. The model runs on `device` (`auto`: the
    GPU when there is one), whatever device it was trained on.
    """
    connect(params)  # an unreachable store fails before any work
    run_dir = Path(run_dir)
    evaluation_hash = data_hash(data_root, category)
    check_one_evaluation(run_dir, category, evaluation_hash, data_root)
    run, calibration = reopen_trained_run(params, run_dir, category, data_root, "dualstpm test")
    try:
        result = test_run(run_dir, data_root, category, max_pixels=params.data.max_image_pixels, device=device)
    except BaseException:
        if run.created:
            with contextlib.suppress(TrackingError):
                run.finish("FAILED")
        raise
    write_csv(run_dir / AUC_TABLE, metrics_table({category: result}))
    with logged_after_saving(f"the test results are saved in {run_dir} ({METRICS_FILE}, {AUC_TABLE}, {PLOTS_DIR}/, "
                             f"{MAPS_DIR}/)", f"dualstpm test --run {run_dir} --data-root {data_root} --category {category}"):
        if run.created:  # fitted without tracking, or into another store: log what the files tell
            run.log_history(run_dir / HISTORY_FILE)
            run.log_fit(calibration.selected_epochs, calibration.thresholds)
        run.log_test(result, evaluation_hash, data_root)
        run.finish()
    return result


def check_one_evaluation(run_dir: Path, category: str, evaluation_hash: str, data_root: Path) -> None:
    """Refuse (RunError, with the fix) to test `run_dir` on `category` in `data_root` when it
    was tested on another category or other data (another DVC data hash): its metrics.json,
    plots, maps and MLflow run describe one evaluation, and would mix two."""
    record = RunRecord.read(run_dir)
    if record is None or not record.eval_data_hash:
        return
    if record.eval_data_hash == evaluation_hash and record.eval_category in (None, category):
        return
    raise RunError(
        f"{run_dir} was tested on {record.eval_category or 'another category'} in {record.eval_data_root} "
        f"(data {record.eval_data_hash}); testing it on {category} in {Path(data_root).resolve()} (data "
        f"{evaluation_hash}) would overwrite its metrics.json and plots and mix two evaluations in MLflow run "
        f"{record.run_id}. A run's results describe one evaluation: test a copy of the model in a run directory "
        f"of its own (`mkdir -p NEW && cp -r {run_dir / MODEL_SUBDIR} NEW/` then `dualstpm test --run NEW "
        f"--data-root {data_root} --category {category}`), or train again with `dualstpm fit --overwrite`"
    )


@contextlib.contextmanager
def logged_after_saving(saved: str, again: str) -> Iterator[None]:
    """Logging results that are already on disk: a TrackingError (the store went away
    meanwhile) becomes one that says what is `saved` and the command that logs it `again`."""
    try:
        yield
    except TrackingError as exc:
        raise TrackingError(f"{saved}, but logging to MLflow failed: {exc}\nOnce the store answers again, "
                            f"`{again}` runs again and logs the results.") from exc


def reopen_trained_run(params: Params, run_dir: Path, category: str, data_root: Path,
                       source: str) -> tuple[CategoryRun, Calibration]:
    """The MLflow run of a trained model (made now if it has none) and its calibration.

    Logged with the model's own params, except the `tracking` section, which comes from
    `params` (where to log now). A run reopened must be the one that trained the model
    files (`lineage.check_model_of_run`, RunError otherwise); a run made now becomes it."""
    _, trained, calibration = read_model_dir(run_dir)
    trained = trained.model_copy(update={"tracking": params.tracking})
    run = open_category_run(params_for_data(trained, data_root), run_dir, category, data_root,
                            reuse=True, source=source)
    if run.created:
        record_model(run)
    else:
        check_model_of_run(run, category)
    return run, calibration


def tracked_ablate(params: Params, run_dir: Path) -> AblationResult:
    """`ablation.ablate` (with `params.ablation`) logged to MLflow into the run `dualstpm test`
    logged: STPM alone, the published and the chosen fusion and the oracle as `ablation.*`
    metrics, the adoption margin as `ablation.margin.*`, the choice as tags, the table as one MLflow table, and `RUN/ablation/` and
    `model/fusion.json` as artifacts.
    """
    client = connect(params)
    run_dir = Path(run_dir)
    record = RunRecord.read(run_dir)
    if record is None or record.eval_data_root is None:
        raise TrackingError(f"{run_dir} has no tested MLflow run ({run_dir / RUN_RECORD}): run `dualstpm test "
                            f"--run {run_dir} --data-root ...` first; the ablation adds to the run it logs")
    run, _ = reopen_trained_run(params, run_dir, record.eval_category or read_model_dir(run_dir)[2].category,
                                Path(record.eval_data_root), "dualstpm ablate")
    result = ablate(run_dir, params.ablation)
    summary = result.summary
    saved = f"the ablation is saved in {run_dir / ABLATION_DIR}" + (
        f" and applied in {run_dir / MODEL_SUBDIR / FUSION_FILE}" if summary["applied"] else "")
    with logged_after_saving(saved, f"dualstpm ablate --run {run_dir}"):
        figures = {f"ablation.{key}.{metric}": value
                   for key in ("stpm_alone", "fused_published", "fused_chosen", "oracle") if summary.get(key)
                   for metric, value in summary[key].items() if metric in TABLE_METRICS and value is not None}
        figures.update({f"ablation.margin.{key}": summary["margin"][key]
                        for key in ("observed_difference", "mean_difference", "lower_bound")
                        if summary["margin"][key] is not None and summary["margin"][key] == summary["margin"][key]})
        run.log(run.run_id, "logging the ablation", figures, tags={
            f"{TAG}ablation.chosen": summary["fused_chosen"]["config"],
            f"{TAG}ablation.candidate": summary["candidate"]["config"],
            f"{TAG}ablation.adopted": str(summary["fused_chosen"]["adopted"]).lower(),
            f"{TAG}ablation.applied": str(summary["applied"]).lower(),
            f"{TAG}ablation.oracle": (summary["oracle"] or {}).get("config", "none"),
        })
        with tracking_errors(client.tracking_uri, "logging the ablation table"):
            client.log_table(run.run_id, data=result.table, artifact_file=f"{ABLATION_DIR}/table.json")
        run.log_artifacts([ABLATION_DIR, f"{MODEL_SUBDIR}/{FUSION_FILE}"], "")
        run.finish()
    return result


def metrics_table(results: dict[str, dict]) -> pd.DataFrame:
    """One row per (category, view) with the headline metrics, plus a mean row per view
    (null where not every category has the metric: `metrics.category_means`)."""
    rows = [
        {"category": category, "model": view, **{m: result[view][m] for m in TABLE_METRICS}}
        for category, result in results.items()
        for view in ("stpm", "recon", "fused", "disc") if view in result
    ]
    table = pd.DataFrame(rows)
    if len(results) > 1:
        table = pd.concat([table, category_means(table, TABLE_METRICS)], ignore_index=True)
    return table
