"""Which MLflow store and run describe the model in a run directory, checked by content.

DVC restores a cached stage when its params return to an earlier value, so the model in
`RUN/model/` can be one trained by an earlier fit than the one `RUN/mlflow_run.json`
names. Two records keep the link verifiable:

- the fit writes `RUN/model/lineage.json` (store and run id) beside the model files, a
  DVC output of the fit stage, so it travels with the model wherever DVC restores it;
- the fit logs the sha256 of the model files to its run (tag `dualstpm.model_sha256`),
  and each test the sha256 of the `metrics.json` it wrote (`dualstpm.metrics_sha256`).

Whoever reopens the run to add to it or to register from it (test, ablate, register)
asks :func:`model_run` first: the run `mlflow_run.json` names when it logged the files'
hash, else the run `lineage.json` names when that one did (the model DVC restored: the
record is rewritten to name it, :func:`adopt_run`), else a refusal naming both. Which store to ask is
:func:`run_store`'s answer: the one the run records, unless the user named one. The hashes
themselves (model files, data, code) are computed in `dualstpm.mlops.hashing`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from dualstpm.errors import RunError, TrackingError
from dualstpm.files import file_digest, write_json
from dualstpm.mlops.hashing import model_sha256
from dualstpm.mlops.runs import METRICS_HASH_TAG, CategoryRun, RunRecord, existing_record
from dualstpm.mlops.tracking import TAG, Store, announce, sqlite_path, tracking_errors
from dualstpm.rundir import LINEAGE_FILE, MODEL_SUBDIR, RUN_RECORD, RunDir, read_lineage

MODEL_HASH_TAG = f"{TAG}model_sha256"


def record_model(run: CategoryRun, log_hash: bool = True) -> None:
    """Make `run` the model's run: write `RUN/model/lineage.json` and (with `log_hash`) log
    the model files' hash to it. Raises TrackingError when the store fails."""
    write_json(RunDir(run.run_dir).lineage,
               {"tracking_uri": run.client.tracking_uri, "run_id": run.run_id})
    if log_hash:
        run.log(run.run_id, "logging the model's hash", tags={MODEL_HASH_TAG: model_sha256(run.run_dir / MODEL_SUBDIR)})


def run_store(store: Store, run_dir: Path) -> Store:
    """The store a command acting on `run_dir` must use: `store` when the user named it
    (`MLFLOW_TRACKING_URI`, `tracking.uri`), else the one the run records
    (`RUN/mlflow_run.json`, else `RUN/model/lineage.json`), else `store` (this project's default).

    Working in another folder then neither splits a run's history over two stores nor
    creates an empty `mlflow.db` there. Announces a recorded store other than this
    folder's default. Raises TrackingError when the recorded store is an SQLite file that
    is gone (and not this folder's default, which `connect` would create afresh): which
    store to use then is the user's to say.
    """
    if store.named:
        return store
    record = RunRecord.read(run_dir)
    lineage = read_lineage(run_dir) if record is None else None
    recorded = record.tracking_uri if record else (lineage or {}).get("tracking_uri")
    default = store.uri
    if not recorded or recorded == default:
        return store
    source = Path(run_dir) / (RUN_RECORD if record else f"{MODEL_SUBDIR}/{LINEAGE_FILE}")
    database = sqlite_path(recorded)
    if database is not None and not database.is_file():
        raise TrackingError(
            f"{source} records the MLflow store {recorded}, which does not exist (moved, deleted, or another "
            f"machine's): name the store that holds this run with MLFLOW_TRACKING_URI or --set tracking.uri=..., "
            f"or use this folder's store with MLFLOW_TRACKING_URI={default}"
        )
    announce(f"using the MLflow store {recorded} that {source} records (not {default}; "
             "MLFLOW_TRACKING_URI or tracking.uri names another)")
    return replace(store, uri=recorded)


def _logged_model_hash(client, run_id: str) -> str | None:
    with tracking_errors(client.tracking_uri, f"reading run {run_id}"):
        return client.get_run(run_id).data.tags.get(MODEL_HASH_TAG)


def _active_run(client, run_id: str):
    """The run `run_id` of `client`'s store, or None when it is not there or deleted."""
    from mlflow.exceptions import MlflowException

    with tracking_errors(client.tracking_uri, f"looking up run {run_id}"):
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
    return run if run.info.lifecycle_stage == "active" else None


def model_run(client, run_dir: Path, category: str) -> tuple[RunRecord | None, bool]:
    """(record, adopted): the MLflow run of `client`'s store whose model the files in
    `RUN/model` are, checked by their sha256 against the `dualstpm.model_sha256` it logged.

    - (None, False) when `RUN/mlflow_run.json` names no run of this store (a model fitted
      without tracking or into another store, or copied into a new run directory): the
      caller starts a run of its own;
    - the run `RUN/mlflow_run.json` names, when it logged these files' hash (or logged none,
      its fit having lost the store, and `lineage.json` names no other run: it gets it now);
    - else the run `lineage.json` names, when it logged their hash: the model of an earlier
      fit of this run directory, which DVC restored from its cache after a later fit
      (`adopted` True: the caller, once its own checks pass, makes `RUN/mlflow_run.json`
      name it with :func:`adopt_run`).

    Raises RunError naming the runs and the fix when neither run trained these files.
    """
    run_dir = Path(run_dir)
    record = existing_record(client, run_dir)
    if record is None:
        return None, False
    model_dir = run_dir / MODEL_SUBDIR
    actual = model_sha256(model_dir)
    lineage = read_lineage(run_dir)
    trained_in = lineage["run_id"] if lineage and lineage["tracking_uri"] == client.tracking_uri else None
    logged = _logged_model_hash(client, record.run_id)
    if logged == actual:
        return record, False
    if logged is None and trained_in in (None, record.run_id):
        record_model(CategoryRun(client, record, run_dir, created=False))
        return record, False
    tried = [f"run {record.run_id} ({RUN_RECORD}) logged {(logged or 'none')[:12]}"]
    if trained_in is not None and trained_in != record.run_id:
        run = _active_run(client, trained_in)
        logged = run.data.tags.get(MODEL_HASH_TAG) if run is not None else None
        if logged == actual:
            return RunRecord.of_run(client, run), True
        tried.append(f"run {trained_in} ({LINEAGE_FILE}) " + ("is not in this store" if run is None
                                                                else f"logged {(logged or 'none')[:12]}"))
    raise RunError(
        f"no MLflow run in {client.tracking_uri} describes the model files in {model_dir} (sha256 {actual[:12]}): "
        f"{'; '.join(tried)}. They changed after their fit, or come from elsewhere; their params and metrics "
        f"would describe another model. Train it again so that run and files agree: under DVC "
        f"`dvc repro --force --single-item fit@{category}` then `dvc repro`; otherwise "
        f"`dualstpm fit --overwrite --out {run_dir} ...` then `dualstpm test --run {run_dir} ...`"
    )


def adopt_run(record: RunRecord, run_dir: Path) -> None:
    """Make `RUN/mlflow_run.json` name `record`, the run `lineage.json` showed trained the
    model files (`model_run`'s adopted answer), so every later command agrees; says so."""
    previous = RunRecord.read(run_dir)
    record.write(run_dir)
    announce(f"the model files in {Path(run_dir) / MODEL_SUBDIR} were trained in MLflow run {record.run_id} "
             f"({LINEAGE_FILE}; e.g. restored from DVC's cache): {Path(run_dir) / RUN_RECORD} now names it"
             + (f" instead of run {previous.run_id}" if previous and previous.run_id != record.run_id else ""))


def check_tested(client, record: RunRecord, run_dir: Path) -> None:
    """Refuse (RunError, with the fix) when `RUN/metrics.json` is not the one the test
    logged to `record`'s run (`dualstpm.metrics_sha256`): for a run adopted from
    `lineage.json` (`model_run`), whose test outputs on disk (metrics, maps) must be shown
    to be that run's test, not a later model's left behind."""
    metrics = Path(run_dir) / "metrics.json"
    with tracking_errors(client.tracking_uri, f"reading run {record.run_id}"):
        logged = client.get_run(record.run_id).data.tags.get(METRICS_HASH_TAG)
    actual = file_digest(metrics) if metrics.is_file() else None
    if logged is not None and logged == actual:
        return
    raise RunError(
        f"{metrics} is not the test MLflow run {record.run_id} logged (sha256 "
        f"{(actual or 'no file')[:12]}, the run logged {(logged or 'none')[:12]}): it belongs to another model or "
        f"test. Test the model again: `dualstpm test --run {run_dir} --data-root {record.eval_data_root or 'DIR'}`"
        " (under DVC, `dvc repro`)"
    )
