"""MLflow tracking: where runs go, what a category's run records, and clear failures.

One experiment per dataset (`dualstpm-<dataset>`, named after the data root folder); one parent run per trained category
with a child run per branch (`stpm`, `recon`). The parent holds the resolved params, the
git commit, the hash of the data, per-epoch losses, the fused model's final metrics and
the artifacts (AUC table, metrics.json, ROC/PRO curves, overlays); each child holds its
branch's losses and metrics. The ids live in `RUN/mlflow_run.json`, so `dualstpm test`
(a separate process, maybe days later) adds to the run `dualstpm fit` started.

The store is `MLFLOW_TRACKING_URI`, else `tracking.uri`, else an SQLite file in the
project (`sqlite:////<project>/mlflow.db`, artifacts beside it in `mlartifacts/`), always
by absolute path and never MLflow's file store. The project is the working directory, or,
inside a DVC experiment's temporary copy (`<project>/.dvc/tmp/exps/...`), the project that
copy belongs to: the copy is thrown away, its runs must not be. A command that acts on a
run directory uses the store the run records unless one is named (`lineage.run_store`);
opening an SQLite store that does not exist yet creates it and says so (`connect`).

Library code (`training.fit`, `evaluation.test_run`) knows nothing of MLflow: the stage
functions in `dualstpm.mlops.stages` wrap them with what is here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from dualstpm.config import Params
from dualstpm.errors import ConfigError, TrackingError
from dualstpm.files import file_digest, write_json
from dualstpm.progress import say
from dualstpm.rundir import RunDir, read_optional_json

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
BRANCH_RUNS = ("stpm", "recon")
RESULT_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "precision", "recall", "threshold",
                  "false_alarm_rate")
#: MLflow error codes of a store that answered (a missing or bad name, version or value): not a store that is down
STORE_ANSWERED = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE", "BAD_REQUEST",
                            "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED", "INVALID_STATE"})
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # read by MLflow at each transfer
TAG = "dualstpm."  # prefix of our own tags, apart from MLflow's `mlflow.*` ones
METRICS_HASH_TAG = f"{TAG}metrics_sha256"  # sha256 of the metrics.json a test logged to its run
_METRIC_UNSAFE = re.compile(r"[^\w\-. /]")  # MLflow metric names allow only these characters


# --------------------------------------------------------------------------- where


def quiet_artifact_progress() -> None:
    """For entry points only (the `dualstpm` command, `python -m flows.*`), which own their
    process: no MLflow artifact up/download progress bars in it and its children, which
    would clutter flow and stage logs. A value the user set is kept."""
    os.environ.setdefault(PROGRESS_BAR_ENV, "false")


def _absolute_sqlite(uri: str, source: str) -> str:
    """`sqlite:///rel.db` is relative to wherever the command runs: make it absolute."""
    path = uri[len("sqlite:///") :]
    if not path or path == ":memory:":
        raise ConfigError(f"{source}={uri!r}: an in-memory store loses every run; use sqlite:////abs/path/mlflow.db")
    return uri if path.startswith("/") else "sqlite:///" + str((project_dir() / path).resolve())


def project_dir() -> Path:
    """The working directory, or the project a DVC temporary experiment copy was made from."""
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def store_is_named(params: Params) -> bool:
    """Whether the user named a store (`MLFLOW_TRACKING_URI` or `tracking.uri`), rather
    than leaving it to the default `<project>/mlflow.db`."""
    return bool(os.environ.get("MLFLOW_TRACKING_URI", "").strip() or params.tracking.uri.strip())


def with_store(params: Params, uri: str) -> Params:
    """`params` whose `tracking.uri` is `uri`: how a store resolved at an entry point is passed down."""
    return params.model_copy(update={"tracking": params.tracking.model_copy(update={"uri": uri})})


def sqlite_path(uri: str) -> Path | None:
    """The database file of an SQLite store URI; None for a server."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def announce(message: str) -> None:
    """One line the user should see (which store is used or created): not an error, and not
    a result on stdout. Goes through `dualstpm.progress.say`, so inside a category's work
    it carries the category prefix and reaches its sink (a Prefect task's log), else stderr.
    `message` is plain text (no rich markup)."""
    say(escape(f"note: {message}"))


def tracking_uri(params: Params) -> str:
    """`MLFLOW_TRACKING_URI`, else `tracking.uri`, else `sqlite:////<project>/mlflow.db`.

    SQLite paths are made absolute; the file store (a plain path, `file:`) is refused,
    since MLflow 3 no longer backs a tracking store with it.
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    uri, source = (env, "MLFLOW_TRACKING_URI") if env else (params.tracking.uri.strip(), "tracking.uri")
    if not uri:
        return "sqlite:///" + str(project_dir() / DEFAULT_DB)
    if uri.startswith("sqlite:///"):
        return _absolute_sqlite(uri, source)
    if re.match(r"^(https?|databricks)(://|$)", uri):
        return uri.rstrip("/")
    raise ConfigError(
        f"{source}={uri!r} is not a supported MLflow store: use an SQLite file "
        "(sqlite:////abs/path/mlflow.db) or a tracking server (http://host:port). "
        "The file store (a folder such as ./mlruns) is not supported by MLflow 3."
    )


def artifact_location(uri: str, experiment: str) -> str | None:
    """Absolute artifact folder of an experiment in an SQLite store (`mlartifacts/` beside
    the database); None for a server, which chooses (and may proxy) its own."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///") :]).parent / ARTIFACTS_DIR / experiment).as_uri()


def dataset_name(data_root: Path | str) -> str:
    """The name of the dataset in `data_root`: the data root folder's own name, after
    symlinks are followed, lower-cased, each run of other characters than a-z and 0-9
    made one `-` (`data/synthetic` -> `synthetic`, `~/Data/MVTec_AD` -> `mvtec-ad`).

    It depends on the data actually used, not on `data.source`, the working directory or
    the path (relative, absolute, through a symlink) it is reached by. Raises ConfigError
    for a folder whose name has no letter or digit (such as `/`).
    """
    folder = Path(data_root).expanduser().resolve()
    slug = re.sub(r"[^a-z0-9]+", "-", folder.name.lower()).strip("-")
    if not slug:
        raise ConfigError(f"cannot name a dataset after the data root {folder}: its folder name has no "
                          "letter or digit; put the categories in a folder named after the dataset")
    return slug


def params_for_data(params: Params, data_root: Path | str | None) -> Params:
    """`params` describing the data actually used, as logged to MLflow: a `--data-root`
    other than `data.root` makes it a `folder` dataset there."""
    if data_root is None or Path(data_root).resolve() == Path(params.data.root).resolve():
        return params
    data = params.data.model_copy(update={"source": "folder", "root": str(data_root)})
    return params.model_copy(update={"data": data})


def recorded_data_root(data_root: Path | str, run_dir: Path | str) -> str:
    """How `RUN/model/params.yaml` records the data root a model was trained on: relative to
    the run directory (POSIX, e.g. `../../../data/synthetic`) when both lie in the project
    (`project_dir`), so that the file is the same in every clone and stays valid when the
    project moves; else the absolute path. `resolve_data_root` reads it back."""
    root, run = Path(data_root).resolve(), Path(run_dir).resolve()
    project = project_dir()
    if root.is_relative_to(project) and run.is_relative_to(project):
        return Path(os.path.relpath(root, run)).as_posix()
    return str(root)


def resolve_data_root(recorded: str, run_dir: Path | str) -> Path:
    """The folder a `recorded_data_root` names: an absolute path as it is, a relative one
    from the run directory (whatever the working directory)."""
    root = Path(recorded)
    return root if root.is_absolute() else (Path(run_dir) / root).resolve()


def experiment_name(data_root: Path | str) -> str:
    """`dualstpm-<dataset>`: the MLflow experiment of the runs on `data_root` (see `dataset_name`)."""
    return f"dualstpm-{dataset_name(data_root)}"


# --------------------------------------------------------------------------- what data, what code


def folder_files(folder: Path) -> dict[str, str]:
    """{path relative to `folder` (POSIX): md5} of every file under `folder`, sorted by path:
    the file list DVC hashes (`data_hash`), and what tells two versions of the data apart."""
    return {path.relative_to(folder).as_posix(): file_digest(path, "md5")
            for path in sorted(p for p in Path(folder).rglob("*") if p.is_file())}


def _dvc_dir_hash(files: Mapping[str, str]) -> str:
    """The md5 DVC 3 gives a folder (`<md5 of its file list>.dir`), from `folder_files`."""
    entries = sorted(({"md5": md5, "relpath": relpath} for relpath, md5 in files.items()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def data_version(data_root: Path, category: str) -> tuple[str, dict[str, str]]:
    """(hash, files) of the category's data as it is on disk now: `folder_files` of the
    category folder and the md5 DVC 3 gives that folder (`<md5>.dir`). Equal hashes mean
    the same evaluation data.

    Always computed from the files, never read from `dvc.lock` or a `.dvc` file: inside
    `dvc repro`, or after `dualstpm feedback apply` added parts to a folder that is only a
    stage's dependency, those still hold the previous version's md5 while the stage runs,
    so a test would be tagged with the data it did not see. Raises ConfigError when the
    category folder does not exist.
    """
    folder = (Path(data_root) / category).resolve()
    if not folder.is_dir():
        raise ConfigError(f"cannot hash {folder}: no such category folder")
    files = folder_files(folder)
    return _dvc_dir_hash(files), files


def data_hash(data_root: Path, category: str) -> str:
    """The hash of `data_version`: the md5 DVC 3 gives the category folder's current files."""
    return data_version(data_root, category)[0]


def git_state() -> tuple[str, bool]:
    """(commit, dirty) of the code that runs: the checkout holding the `dualstpm` package
    (an editable install), else the project's; ("unknown", False) outside git."""
    import dualstpm

    for where in (Path(dualstpm.__file__).parent, project_dir()):
        try:
            def git(*args: str) -> str:
                return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True,
                                      timeout=30, check=True).stdout.strip()
            return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown", False


# --------------------------------------------------------------------------- connecting


def _server_hint(uri: str) -> str:
    if uri.startswith("sqlite:"):
        return f"check that {uri[len('sqlite:///'):]} is a writable MLflow database"
    return (
        f"is the tracking server at {uri} running? Start it (e.g. `mlflow server --backend-store-uri "
        "sqlite:////abs/path/mlflow.db --host 127.0.0.1 --port 5000`), or unset MLFLOW_TRACKING_URI and "
        "tracking.uri to use the project's SQLite store"
    )


@contextmanager
def tracking_errors(uri: str, doing: str) -> Iterator[None]:
    """Turn MLflow's and the network's exceptions into one TrackingError that names the store."""
    import requests
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (MlflowException, requests.RequestException, SQLAlchemyError, OSError) as exc:  # OSError: a local store
        cause = str(exc).splitlines()[0][:400] if str(exc) else type(exc).__name__
        if isinstance(exc, MlflowException) and exc.error_code in STORE_ANSWERED:  # it runs: no advice to start it
            raise TrackingError(f"MLflow at {uri} refused {doing}: {cause}") from exc
        raise TrackingError(f"MLflow at {uri} failed while {doing}: {cause}\n{_server_hint(uri)}") from exc


def wait_until_reachable(uri: str, retries: int, timeout_s: float) -> None:
    """A tracking server must answer /health (retried with backoff) before any work starts."""
    if not uri.startswith("http"):
        return
    import requests

    for attempt in range(retries + 1):
        try:
            if requests.get(f"{uri}/health", timeout=timeout_s).ok:
                return
        except requests.RequestException:
            pass
        if attempt < retries:
            time.sleep(min(2**attempt, 10))
    raise TrackingError(f"the MLflow tracking server at {uri} is unreachable ({retries + 1} attempts)\n{_server_hint(uri)}")


def connect(params: Params, *, create: bool = True):
    """Point MLflow at the configured store and return a client for it.

    Sets MLflow's HTTP retry/timeout from `tracking.retries`/`tracking.timeout_s` (MLflow's
    own default retries for minutes), turns telemetry off and skips the pip check that
    needs the network when logging a model.

    An SQLite store that does not exist yet is created, and `announce`d (a store in the
    wrong folder must not go unnoticed); with `create=False` (commands that only read or
    add to what a store holds: register, promote) it is refused instead (TrackingError
    naming the file and how to name the right store).
    """
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(params)
    database = sqlite_path(uri)
    if database is not None and not database.exists():
        if not create:
            raise TrackingError(
                f"there is no MLflow store at {database} (nothing was registered or tracked there): run this "
                "in the project that holds the runs' mlflow.db, or name the store with MLFLOW_TRACKING_URI "
                "or --set tracking.uri=sqlite:////abs/path/mlflow.db (or http://host:port)"
            )
        announce(f"creating a new MLflow store at {database} (runs and models of other stores are not in it; "
                 "name another with MLFLOW_TRACKING_URI or tracking.uri)")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(params.tracking.retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(params.tracking.timeout_s)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
    wait_until_reachable(uri, params.tracking.retries, params.tracking.timeout_s)
    mlflow.set_tracking_uri(uri)
    with tracking_errors(uri, "opening the store"):  # an SQLite store is created (or refused) here
        return MlflowClient(uri)


def ensure_experiment(client, name: str) -> str:
    """The id of the experiment `name`, created with an absolute artifact location."""
    from mlflow.exceptions import MlflowException

    with tracking_errors(client.tracking_uri, f"opening experiment {name}"):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, name))
        except MlflowException:
            experiment = client.get_experiment_by_name(name)  # created meanwhile by a parallel process
            if experiment is None:
                raise
            return experiment.experiment_id


# --------------------------------------------------------------------------- the run of a category


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"fit": {"epochs": 3}} -> {"fit.epochs": "3"}: MLflow params are flat strings."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return flat


def run_params(params: Params, category: str, data_root: Path | str) -> dict[str, str]:
    """The params of one category's run, flat for MLflow, saying what the run used: the
    download settings (`data.mvtec.*`) only when `data.source` is `mvtec`, `data.root` as
    the absolute folder read, and `data.category` (the category trained) instead of the
    pipeline's `data.categories` list."""
    flat = flatten(params.to_dict())
    used = {k: v for k, v in flat.items()
            if k != "data.categories" and (params.data.source == "mvtec" or not k.startswith("data.mvtec."))}
    return {**used, "data.root": str(Path(data_root).resolve()), "data.category": category}


def result_metrics(view_result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric metrics of one view of metrics.json (null ones are skipped, per defect type too)."""
    values = {f"{prefix}{k}": float(view_result[k]) for k in RESULT_METRICS if view_result.get(k) is not None}
    for defect, auc in (view_result.get("per_defect") or {}).items():
        values[f"{prefix}per_defect.{_METRIC_UNSAFE.sub('_', defect)}"] = float(auc)
    return values


@dataclass
class RunRecord:
    """`RUN/mlflow_run.json`: which MLflow runs hold this run directory's history."""

    tracking_uri: str
    experiment_id: str
    run_id: str
    branch_run_ids: dict[str, str]
    eval_data_hash: str | None = None
    eval_data_root: str | None = None
    eval_category: str | None = None

    @classmethod
    def read(cls, run_dir: Path) -> RunRecord | None:
        path = RunDir(run_dir).run_record
        data = read_optional_json(path, "delete it and run `dualstpm test` again", TrackingError)
        if data is None:
            return None
        try:
            return cls(**data)
        except TypeError as exc:
            raise TrackingError(f"{path} is damaged ({exc}); delete it and run `dualstpm test` again") from None

    def write(self, run_dir: Path) -> None:
        write_json(RunDir(run_dir).run_record, self.__dict__)

    @classmethod
    def of_run(cls, client, run) -> RunRecord:
        """The record of an MLflow parent `run` (an `mlflow.entities.Run` of `client`'s store),
        rebuilt from the store: its branch children and its last test's evaluation tags."""
        tags = run.data.tags
        with tracking_errors(client.tracking_uri, f"looking up the branch runs of {run.info.run_id}"):
            children = client.search_runs([run.info.experiment_id],
                                          filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        return cls(client.tracking_uri, run.info.experiment_id, run.info.run_id,
                   {c.data.tags[f"{TAG}branch"]: c.info.run_id for c in children if f"{TAG}branch" in c.data.tags},
                   tags.get(f"{TAG}eval_data_hash"), tags.get(f"{TAG}eval_data_root"), tags.get(f"{TAG}eval_category"))


@dataclass
class CategoryRun:
    """An open handle on a category's parent run and its branch children (client calls only,
    no global 'active run', so parallel tasks in one process do not mix their runs)."""

    client: Any
    record: RunRecord
    run_dir: Path
    created: bool  # started now (False: continued from RUN/mlflow_run.json)

    @property
    def run_id(self) -> str:
        return self.record.run_id

    def log(self, run_id: str, doing: str, metrics: Mapping[str, float] | None = None, step: int = 0,
             params: Mapping[str, str] | None = None, tags: Mapping[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        with tracking_errors(self.client.tracking_uri, doing):
            self.client.log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
                params=[Param(k, v) for k, v in (params or {}).items()],
                tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
            )

    def _epoch_parts(self, record: Mapping[str, float]) -> dict[str, tuple[str, dict[str, float]]]:
        """{run id: (what, metrics)} of one history row: all of it for the parent, each branch's
        `*_<branch>` values, without the suffix, for its child."""
        values = {k: v for k, v in record.items() if k != "epoch"}
        parts = {self.run_id: ("", values)}
        for branch, run_id in self.record.branch_run_ids.items():
            parts[run_id] = (f" of {branch}", {k.removesuffix(f"_{branch}"): v for k, v in values.items() if k.endswith(f"_{branch}")})
        return parts

    def log_epoch(self, record: Mapping[str, float], skip: Mapping[str, set[int]] | None = None) -> None:
        """One epoch of `training.fit`'s history: all of it on the parent, each branch's on its
        child; `skip`: {run id: epochs that run already holds}."""
        epoch = int(record["epoch"])
        for run_id, (what, values) in self._epoch_parts(record).items():
            if epoch not in (skip or {}).get(run_id, ()):
                self.log(run_id, f"logging epoch {epoch}{what}", values, step=epoch)

    def log_missing_epochs(self, history: Sequence[Mapping[str, float]]) -> None:
        """Log each epoch of `history` into each run (parent, children) that lacks it, so a fit
        interrupted while logging and then resumed ends with every epoch in every run, once."""
        if not history:
            return
        held: dict[str, set[int]] = {}
        for run_id, (_, values) in self._epoch_parts(history[0]).items():
            key = next(iter(values))  # one log_batch per run and epoch: one key tells which epochs it holds
            with tracking_errors(self.client.tracking_uri, f"reading the logged epochs of run {run_id}"):
                held[run_id] = {m.step for m in self.client.get_metric_history(run_id, key)}
        for record in history:
            self.log_epoch(record, skip=held)

    def log_history(self, history_csv: Path) -> None:
        """Per-epoch losses from `RUN/history.csv`, for a run whose fit was not tracked live."""
        import pandas as pd

        if history_csv.is_file():
            for row in pd.read_csv(history_csv).to_dict(orient="records"):
                self.log_epoch(row)

    def log_fit(self, selected_epochs: Mapping[str, int], thresholds: Mapping[str, float]) -> None:
        """What fit decided: the epoch kept per branch and the calibrated thresholds."""
        self.log(self.run_id, "logging the fit", {
            "threshold": thresholds["fused"],
            **{f"selected_epoch_{b}": e for b, e in selected_epochs.items()},
            **({"disc.threshold": thresholds["disc"]} if "disc" in thresholds else {}),
        })
        for branch, run_id in self.record.branch_run_ids.items():
            self.log(run_id, f"logging the fit of {branch}",
                      {"selected_epoch": selected_epochs[branch], "threshold": thresholds[branch]})
        self.log_artifacts(["history.csv", "model/params.yaml", "model/calibration.json"], "fit")

    def log_test(self, result: Mapping[str, Any], data_hash_value: str, data_root: Path) -> None:
        """Final metrics of the fused model (parent) and of each branch (children), the
        evaluation data's hash, the sha256 of `metrics.json` (`METRICS_HASH_TAG`: which test
        files the run describes) and the test artifacts, all from this run's folder
        (`run_dir`: the run directory, or an evaluation folder of it)."""
        self.log(self.run_id, "logging test metrics", {
            **result_metrics(result["fused"]),
            **{f"{b}.{k}": v for b in BRANCH_RUNS for k, v in result_metrics(result[b]).items() if "per_defect" not in k},
            **(result_metrics(result["chosen"], "chosen.") if "chosen" in result else {}),
            **{f"disc.{k}": v for k, v in result_metrics(result.get("disc") or {}).items() if "per_defect" not in k},
            "n_test_images": result["n_test_images"],
        }, tags={f"{TAG}eval_data_hash": data_hash_value, f"{TAG}eval_category": result["category"],
                 f"{TAG}eval_data_root": str(Path(data_root).resolve()),
                 METRICS_HASH_TAG: file_digest(self.run_dir / "metrics.json")})
        for branch, run_id in self.record.branch_run_ids.items():
            self.log(run_id, f"logging test metrics of {branch}", result_metrics(result[branch]))
        self.log_artifacts(["metrics.json", "auc_table.csv"], "test")
        self.log_artifacts(["plots"], "")
        self.record.eval_data_hash = data_hash_value
        self.record.eval_data_root = str(Path(data_root).resolve())
        self.record.eval_category = result["category"]
        self.record.write(self.run_dir)

    def log_artifacts(self, names: list[str], artifact_path: str) -> None:
        """Files or folders of the run directory, under `artifact_path` of the parent run."""
        for name in names:
            local = self.run_dir / name
            target = "/".join(p for p in (artifact_path, Path(name).parent.as_posix()) if p not in ("", "."))
            with tracking_errors(self.client.tracking_uri, f"uploading {local}"):
                if local.is_dir():
                    self.client.log_artifacts(self.run_id, str(local), "/".join(p for p in (target, local.name) if p))
                elif local.is_file():
                    self.client.log_artifact(self.run_id, str(local), target or None)

    def finish(self, status: str = "FINISHED") -> None:
        with tracking_errors(self.client.tracking_uri, f"closing run {self.run_id}"):
            for run_id in [*self.record.branch_run_ids.values(), self.run_id]:
                self.client.set_terminated(run_id, status)


def existing_record(client, run_dir: Path) -> RunRecord | None:
    """The recorded runs when they are in this store and not deleted; else None."""
    from mlflow.exceptions import MlflowException

    record = RunRecord.read(run_dir)
    if record is None or record.tracking_uri != client.tracking_uri:
        return None
    with tracking_errors(client.tracking_uri, f"looking up run {record.run_id}"):
        try:
            run = client.get_run(record.run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
    return record if run.info.lifecycle_stage == "active" else None


def open_category_run(params: Params, run_dir: Path, category: str, data_root: Path,
                      *, reuse: bool, source: str) -> CategoryRun:
    """The category's parent run with its branch children.

    `reuse`: continue the runs recorded in `RUN/mlflow_run.json` when they exist in this
    store (resume, test); otherwise (a fresh fit, or nothing recorded) start new ones with
    the params, git commit and data hash, and record their ids.
    """
    client = connect(params)
    run_dir = Path(run_dir)
    if reuse and (record := existing_record(client, run_dir)) is not None:
        return CategoryRun(client, record, run_dir, created=False)
    experiment_id = ensure_experiment(client, experiment_name(data_root))
    commit, dirty = git_state()
    tags = {
        "mlflow.source.name": source,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit,
        f"{TAG}git_commit": commit,
        f"{TAG}git_dirty": str(dirty).lower(),
        f"{TAG}category": category,
        f"{TAG}dataset": dataset_name(data_root),
        f"{TAG}data_root": str(Path(data_root).resolve()),
        f"{TAG}data_hash": data_hash(data_root, category),
        f"{TAG}run_dir": str(run_dir.resolve()),
    }
    with tracking_errors(client.tracking_uri, f"starting the run of {category}"):
        parent = client.create_run(experiment_id, run_name=category, tags=tags)
        children = {
            branch: client.create_run(
                experiment_id, run_name=f"{category}/{branch}",
                tags={**tags, "mlflow.parentRunId": parent.info.run_id, f"{TAG}branch": branch},
            ).info.run_id
            for branch in BRANCH_RUNS
        }
    record = RunRecord(client.tracking_uri, experiment_id, parent.info.run_id, children)
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write(run_dir)
    run = CategoryRun(client, record, run_dir, created=True)
    run.log(run.run_id, "logging params", params=run_params(params, category, data_root))
    return run


def open_evaluation_run(model_run: CategoryRun, folder: Path, category: str, data_root: Path, data_hash_value: str,
                        source: str, tags: Mapping[str, str] | None = None) -> CategoryRun:
    """The MLflow run of an evaluation kept beside the model's first (`folder`, e.g.
    `RUN/evaluations/<data hash>/`): a child of the model's run `model_run`, named
    `<category>/evaluation <hash>`, tagged `dualstpm.evaluation_of` (the model's run) and
    with `tags`; its id is recorded in `folder/mlflow_run.json`, so the same evaluation
    again adds to it."""
    client = model_run.client
    if (record := existing_record(client, folder)) is not None:
        return CategoryRun(client, record, folder, created=False)
    parent = model_run.record
    with tracking_errors(client.tracking_uri, f"starting an evaluation run of {parent.run_id}"):
        run = client.create_run(parent.experiment_id, run_name=f"{category}/evaluation {data_hash_value[:8]}", tags={
            "mlflow.parentRunId": parent.run_id,
            "mlflow.source.name": source,
            "mlflow.source.type": "LOCAL",
            f"{TAG}evaluation_of": parent.run_id,
            f"{TAG}category": category,
            f"{TAG}dataset": dataset_name(data_root),
            f"{TAG}data_root": str(Path(data_root).resolve()),
            f"{TAG}data_hash": data_hash_value,
            f"{TAG}run_dir": str(Path(folder).resolve()),
            **(tags or {}),
        })
    record = RunRecord(client.tracking_uri, parent.experiment_id, run.info.run_id, {})
    Path(folder).mkdir(parents=True, exist_ok=True)
    record.write(folder)
    return CategoryRun(client, record, Path(folder), created=True)
