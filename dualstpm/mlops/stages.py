"""The pipeline's stages as plain functions: the CLI, `dvc.yaml` and Prefect flows call these.

Each takes validated `Params` and paths, does one thing, and returns plain data.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from dualstpm.ablation import AblationResult, ablate
from dualstpm.config import Params
from dualstpm.budget import plan_category
from dualstpm.data import IMAGE_SUFFIXES, load_category, make_synthetic_category, prepare_mvtec
from dualstpm.detector import Calibration, read_model_dir
from dualstpm.errors import DataError, RunError, TrackingError
from dualstpm.evaluation import test_run
from dualstpm.files import write_csv, write_json
from dualstpm.fit_check import fit_check_metrics, fit_check_tags
from dualstpm.metrics import category_means
from dualstpm.mlops.hashing import data_version, folder_files, model_sha256
from dualstpm.mlops.lineage import MODEL_HASH_TAG, adopt_run, check_tested, model_run, record_model, run_store
from dualstpm.mlops.runs import CategoryRun, RunRecord, open_category_run, open_evaluation_run
from dualstpm.mlops.tracking import TAG, Store, announce, connect, tracking_errors, with_store
from dualstpm.project import params_for_data
from dualstpm.rundir import (
    ABLATION_DIR,
    AUC_TABLE,
    DATA_FILES,
    EVALUATIONS_DIR,
    FUSION_FILE,
    HISTORY_FILE,
    MAPS_DIR,
    METRICS_FILE,
    MODEL_SUBDIR,
    PLOTS_DIR,
    RUN_RECORD,
)
from dualstpm.training import FitResult, check_start, fit

TABLE_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
#: the views of metrics.json a table reports, in this order, where the model has them (`chosen`, after an
#: ablation applied one, is printed by `dualstpm test` but not kept in the AUC table)
TABLE_VIEWS = ("stpm", "recon", "fused", "disc", "memory", "fused_memory")
NAMED_CHANGES = 3  # files named per kind of change in a refusal, then "and N more"


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


def in_run_store(params: Params, store: Store, run_dir: Path) -> tuple[Params, Store]:
    """(params, store) of a command acting on `run_dir`: the store the run records unless the
    user named `store` (`lineage.run_store`); when the run's store is used, the params the
    run logs name it in `tracking.uri`."""
    used = run_store(store, run_dir)
    return (params if used == store else with_store(params, used.uri)), used


def tracked_fit(params: Params, data_root: Path, category: str, run_dir: Path, *, store: Store,
                resume: bool = False, overwrite: bool = False) -> FitResult:
    """`training.fit` logged to MLflow in `store` (resolved at the entry point): the
    category's parent run and a child per branch, per-epoch losses, the selected epochs and
    thresholds, the validation evidence, and the fit check (metrics
    `fit_check.val_auroc.<view>`, tags `dualstpm.fit_check*`). The run's params are the
    ones the fit runs with (`budget.plan_category`: the recipe's image size and epochs).

    An unreachable store fails before training; a store lost during training does not stop
    it: the model is saved first, then the TrackingError says so and how to log it later.
    """
    check_start(run_dir, resume=resume, overwrite=overwrite)  # contradictory flags fail before the store opens
    if resume:  # continues the runs RUN records: in their store
        params, store = in_run_store(params, store, run_dir)
    client = connect(store)  # fail fast: nothing trained yet, nothing lost
    plan = plan_category(params, data_root, category)  # made once: `fit` runs with it
    tracked = params_for_data(plan.params, data_root)
    opened: list[CategoryRun] = []
    failures: list[TrackingError] = []

    def run() -> CategoryRun:  # opened at the first epoch, so a fit refused up front leaves no run behind
        if not opened:
            opened.append(open_category_run(client, tracked, run_dir, category, data_root, reuse=resume,
                                            source="dualstpm fit"))
        return opened[0]

    def on_epoch(record: dict[str, float]) -> None:
        if not failures:  # one failure is enough: no retrying on every epoch
            try:
                run().log_epoch(record)
            except TrackingError as exc:
                failures.append(exc)

    try:
        result = fit(params, data_root, category, run_dir, resume=resume, overwrite=overwrite, on_epoch=on_epoch,
                     plan=plan)
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
            evidence = result.validation_evidence or {}  # what selected the epochs; real defects' AUROC per view
            run().log(run().run_id, "logging the validation evidence",
                      {f"val_real.{view}.{metric}": value for view, figures in evidence.get("views", {}).items()
                       for metric, value in figures.items() if value is not None},
                      tags={f"{TAG}validation_evidence": evidence.get("evidence", "")})
            run().log(run().run_id, "logging the fit check", fit_check_metrics(result.fit_check),
                      tags=fit_check_tags(result.fit_check, TAG))
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


def tracked_test(params: Params, run_dir: Path, data_root: Path, category: str, device: str = "auto",
                 *, store: Store, new_evaluation: bool = False) -> dict:
    """:func:`tracked_evaluation`'s metrics (metrics.json's content)."""
    return tracked_evaluation(params, run_dir, data_root, category, device, store=store,
                              new_evaluation=new_evaluation)[0]


def tracked_evaluation(params: Params, run_dir: Path, data_root: Path, category: str, device: str = "auto",
                       *, store: Store, new_evaluation: bool = False) -> tuple[dict, Path]:
    """`evaluation.test_run` logged to MLflow into the run that trained the model (or a new
    one, filled from the run directory's files, when there is none in this store): the
    metrics of the fused model and each branch, the AUC table, curves and overlays, the
    evaluation data's hash that promotion compares, and beside metrics.json the tested
    files' list (`data_files.json`). Returns (metrics.json's content, the folder written).

    Runs are described by the model's own params (what was trained); only the `tracking`
    section comes from `params` (where to log now), and the store is the run's own unless
    the user named `store` (`lineage.run_store`). The model runs on `device` (`auto`: the GPU when
    there is one), whatever device it was trained on.

    A run directory's first evaluation fills the run directory (`metrics.json`, `plots/`,
    `maps/`) and its MLflow run. Tested again on the same data it is redone in place; on
    changed data (another DVC hash of the category folder) it is refused (RunError naming
    the files added, removed or changed) unless `new_evaluation`: then the test goes to
    `RUN/evaluations/<data hash>/`, logged as a child run of the model's run, and the
    first evaluation stays as it is. Another category is refused before anything is written.
    """
    params, store = in_run_store(params, store, run_dir)
    run_dir = Path(run_dir)
    client = connect(store)  # an unreachable store fails before any work
    evaluation_hash, evaluation_files = data_version(data_root, category)
    record, adopted = model_run(client, run_dir, category)
    folder = evaluation_folder(run_dir, record, category, evaluation_hash, data_root, new_evaluation)
    if adopted:
        adopt_run(record, run_dir)
    run, calibration = open_model_run(client, params, run_dir, category, data_root, "dualstpm test", record)
    try:
        result = test_run(run_dir, data_root, category, max_pixels=params.data.max_image_pixels, device=device,
                          out_dir=folder)
    except BaseException:
        if run.created:
            with contextlib.suppress(TrackingError):
                run.finish("FAILED")
        raise
    write_csv(folder / AUC_TABLE, metrics_table({category: result}))
    write_json(folder / DATA_FILES, {"data_hash": evaluation_hash, "files": evaluation_files})
    again = f"dualstpm test --run {run_dir} --data-root {data_root} --category {category}"
    with logged_after_saving(f"the test results are saved in {folder} ({METRICS_FILE}, {AUC_TABLE}, {PLOTS_DIR}/, "
                             f"{MAPS_DIR}/)", again + (" --new-evaluation" if folder != run_dir else "")):
        if run.created:  # fitted without tracking, or into another store: log what the files tell
            run.log_history(run_dir / HISTORY_FILE)
            run.log_fit(calibration.selected_epochs, calibration.thresholds)
            run.log(run.run_id, "logging the fit check", fit_check_metrics(calibration.fit_check),
                    tags=fit_check_tags(calibration.fit_check, TAG))
        if folder == run_dir:
            run.log_test(result, evaluation_hash, data_root)
        else:
            evaluation = open_evaluation_run(run, folder, category, data_root, evaluation_hash, "dualstpm test", {
                MODEL_HASH_TAG: model_sha256(run_dir / MODEL_SUBDIR)})
            evaluation.log_test(result, evaluation_hash, data_root)
            evaluation.finish()
            announce(f"a new evaluation of the model in {run_dir} on data {evaluation_hash}: {folder} (MLflow run "
                     f"{evaluation.run_id}, a child of run {run.run_id}); its first evaluation, on data "
                     f"{run.record.eval_data_hash}, stays in {run_dir}")
        run.finish()
    return result, folder


def evaluation_folder(run_dir: Path, record: RunRecord | None, category: str, evaluation_hash: str,
                      data_root: Path, new_evaluation: bool) -> Path:
    """Where the test of `run_dir`'s model on `category` (data `evaluation_hash`) goes: the
    run directory for its first evaluation or the same data again; for other data,
    `RUN/evaluations/<hash>/` with `new_evaluation` (or when that folder exists: that data
    again). Raises RunError, with the fix, for another category (a run's results describe one
    category) and for changed data without `new_evaluation` (naming what changed)."""
    if record is None or not record.eval_data_hash:
        return run_dir
    if record.eval_category not in (None, category):
        raise RunError(
            f"{run_dir} was tested on {record.eval_category} in {record.eval_data_root}; testing it on {category} "
            f"would mix two categories in its metrics.json, plots and MLflow run {record.run_id}. A run's results "
            f"describe one category: test a copy of the model in a run directory of its own (`mkdir -p NEW && cp -r "
            f"{run_dir / MODEL_SUBDIR} NEW/` then `dualstpm test --run NEW --data-root {data_root} --category "
            f"{category}`)"
        )
    if record.eval_data_hash == evaluation_hash:
        return run_dir
    extra = run_dir / EVALUATIONS_DIR / evaluation_hash.removesuffix(".dir")
    if new_evaluation or extra.is_dir():
        return extra
    folder = (Path(data_root) / category).resolve()
    raise RunError(
        f"the data of {category} changed since {run_dir} was tested (data {record.eval_data_hash} in "
        f"{record.eval_data_root}, now {evaluation_hash} in {folder.parent}): "
        f"{describe_changes(run_dir, record.eval_data_hash, folder)}. The first evaluation ({METRICS_FILE}, "
        f"{PLOTS_DIR}/, {MAPS_DIR}/ and MLflow run {record.run_id}, which `register` uses) stays as it is. To "
        f"evaluate the same model on the data as it is now, beside it: `dualstpm test --run {run_dir} --data-root "
        f"{data_root} --category {category} --new-evaluation` (written to {extra}/, logged as a child run)"
    )


def describe_changes(run_dir: Path, before_hash: str, folder: Path) -> str:
    """What differs between the files the run's first evaluation tested (`RUN/data_files.json`,
    when it is that evaluation's: same `before_hash`) and `folder` now: "1 image added
    (test/crack/012.png); 2 images changed (...)", a few named per kind."""
    path = run_dir / DATA_FILES
    before = None
    if path.is_file():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            saved = json.loads(path.read_text())
            before = saved["files"] if saved.get("data_hash") == before_hash else None
    if not isinstance(before, dict):
        return (f"which files differ is not known ({path} does not list the files of that evaluation: it was tested "
                "before dualstpm kept the list)")
    now = folder_files(folder)
    changes = {
        "added": sorted(set(now) - set(before)),
        "removed": sorted(set(before) - set(now)),
        "changed": sorted(k for k in set(now) & set(before) if now[k] != before[k]),
    }
    parts = []
    for kind, names in changes.items():
        if names:
            noun = "image" if all(Path(n).suffix.lower() in IMAGE_SUFFIXES for n in names) else "file"
            shown = ", ".join(names[:NAMED_CHANGES]) + (f" and {len(names) - NAMED_CHANGES} more"
                                                         if len(names) > NAMED_CHANGES else "")
            parts.append(f"{len(names)} {noun}{'s' if len(names) > 1 else ''} {kind} ({shown})")
    return "; ".join(parts) or "the same files (only DVC's record of them differs)"


@contextlib.contextmanager
def logged_after_saving(saved: str, again: str) -> Iterator[None]:
    """Logging results that are already on disk: a TrackingError (the store went away
    meanwhile) becomes one that says what is `saved` and the command that logs it `again`."""
    try:
        yield
    except TrackingError as exc:
        raise TrackingError(f"{saved}, but logging to MLflow failed: {exc}\nOnce the store answers again, "
                            f"`{again}` runs again and logs the results.") from exc


def open_model_run(client, params: Params, run_dir: Path, category: str, data_root: Path, source: str,
                   record: RunRecord | None) -> tuple[CategoryRun, Calibration]:
    """The MLflow run of a trained model in the store of `client`, and its calibration:
    `record` (`lineage.model_run`'s answer), or when there is none a run made now, which
    becomes the model's run.

    Logged with the model's own params, except the `tracking` section, which comes from
    `params` (where to log now)."""
    _, trained, calibration = read_model_dir(run_dir)
    if record is not None:
        return CategoryRun(client, record, Path(run_dir), created=False), calibration
    trained = trained.model_copy(update={"tracking": params.tracking})
    run = open_category_run(client, params_for_data(trained, data_root), run_dir, category, data_root,
                            reuse=False, source=source)
    record_model(run)
    return run, calibration


def tracked_ablate(params: Params, run_dir: Path, *, store: Store) -> AblationResult:
    """`ablation.ablate` (with `params.ablation`) logged to MLflow into the run `dualstpm test`
    logged: STPM alone, the published and the chosen fusion and the oracle as `ablation.*`
    metrics, the adoption margin as `ablation.margin.*`, the choice as tags, the table as one MLflow table, and `RUN/ablation/` and
    `model/fusion.json` as artifacts.
    """
    params, store = in_run_store(params, store, run_dir)
    client = connect(store)
    run_dir = Path(run_dir)
    category = read_model_dir(run_dir)[2].category
    record, adopted = model_run(client, run_dir, category)
    if record is None or record.eval_data_root is None:
        raise TrackingError(f"{run_dir} has no tested MLflow run ({run_dir / RUN_RECORD}): run `dualstpm test "
                            f"--run {run_dir} --data-root ...` first; the ablation adds to the run it logs")
    if adopted:  # a model DVC restored: its stored maps must be its own test's
        check_tested(client, record, run_dir)
        adopt_run(record, run_dir)
    run, _ = open_model_run(client, params, run_dir, record.eval_category or category, Path(record.eval_data_root),
                            "dualstpm ablate", record)
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
            f"{TAG}ablation.evidence": summary["selection_set"]["validation_evidence"],
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
        for view in TABLE_VIEWS if view in result
    ]
    table = pd.DataFrame(rows)
    if len(results) > 1:
        table = pd.concat([table, category_means(table, TABLE_METRICS)], ignore_index=True)
    return table
