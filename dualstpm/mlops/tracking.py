"""MLflow tracking: which store, the connection to it, experiments, and clear failures.

The store is `MLFLOW_TRACKING_URI`, else `tracking.uri`, else an SQLite file in the
project (`sqlite:////<project>/mlflow.db`, artifacts beside it in `mlartifacts/`), always
by absolute path and never MLflow's file store. The project is the working directory, or,
inside a DVC experiment's temporary copy (`<project>/.dvc/tmp/exps/...`), the project that
copy belongs to (`dualstpm.project.project_dir`): the copy is thrown away, its runs must
not be. A command that acts on a run directory uses the store the run records unless one
is named (`lineage.run_store`); opening an SQLite store that does not exist yet creates it
and says so (`connect`). One experiment per dataset (`dualstpm-<dataset>`, named after the
data root folder); the runs in it are `dualstpm.mlops.runs`'.

The store is resolved once, at an entry point (a `dualstpm` command, a flow:
`entry_store`), and passed down as a `Store` value. Library calls open it with a client of
their own (`connect`: `MlflowClient(uri)`) and change no process-wide state, neither
MLflow's global tracking URI nor the environment, so the threads of one process (a
Prefect flow's tasks) never see a store changed under them. What MLflow reads only from
the environment (its HTTP retries and timeout) the entry point sets, since it owns its
process (`configure_process`).

Library code (`training.fit`, `evaluation.test_run`) knows nothing of MLflow: the stage
functions in `dualstpm.mlops.stages` wrap them with what is here.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from dualstpm.config import Params
from dualstpm.errors import ConfigError, TrackingError
from dualstpm.progress import say
from dualstpm.project import project_dir

DEFAULT_DB = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
#: MLflow error codes of a store that answered (a missing or bad name, version or value): not a store that is down
STORE_ANSWERED = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE", "BAD_REQUEST",
                            "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED", "INVALID_STATE"})
MISSING = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})  # MLflow's "no such thing" error codes
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"  # read by MLflow at each transfer
TAG = "dualstpm."  # prefix of our own tags, apart from MLflow's `mlflow.*` ones


# --------------------------------------------------------------------------- which store


@dataclass(frozen=True)
class Store:
    """An MLflow store, resolved once at an entry point (`resolve_store`) and passed down.

    `uri`: the absolute SQLite URI or the server's URL (`tracking_uri`); `named`: the user
    named it (`MLFLOW_TRACKING_URI` or `tracking.uri`), so it wins over the store a run
    records (`lineage.run_store`); `retries` and `timeout_s` (from `tracking.*`): how long
    `connect` waits for a server to answer before any work starts.
    """

    uri: str
    named: bool
    retries: int
    timeout_s: float


def resolve_store(params: Params) -> Store:
    """The store of `params` and the environment, as it is now (`tracking_uri`). Raises
    ConfigError for an unsupported URI. Entry points call it once (`entry_store`)."""
    return Store(tracking_uri(params), store_is_named(params), params.tracking.retries, params.tracking.timeout_s)


def configure_process(params: Params) -> None:
    """For entry points only (a `dualstpm` command, a flow), which own their process: MLflow's
    HTTP retries and timeout from `tracking.retries` / `tracking.timeout_s` (MLflow reads them
    from the environment at each request and has no per-client setting; its own default
    retries for minutes), telemetry off, and no pip check, which needs the network, when a
    model is logged (values the user set for these two are kept)."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(params.tracking.retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(params.tracking.timeout_s)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")


def entry_store(params: Params) -> Store:
    """For entry points only: `configure_process(params)`, then the store resolved once
    (`resolve_store`), to pass to every library call of the command or flow."""
    configure_process(params)
    return resolve_store(params)


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


def store_is_named(params: Params) -> bool:
    """Whether the user named a store (`MLFLOW_TRACKING_URI` or `tracking.uri`), rather
    than leaving it to the default `<project>/mlflow.db`."""
    return bool(os.environ.get("MLFLOW_TRACKING_URI", "").strip() or params.tracking.uri.strip())


def with_store(params: Params, uri: str) -> Params:
    """`params` whose `tracking.uri` is `uri`: how the params a run logs name the store it
    records, when that is not the one the user named (`lineage.run_store`)."""
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



def experiment_name(data_root: Path | str) -> str:
    """`dualstpm-<dataset>`: the MLflow experiment of the runs on `data_root` (see `dataset_name`)."""
    return f"dualstpm-{dataset_name(data_root)}"



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


def connect(store: Store, *, create: bool = True):
    """A client of `store` (`MlflowClient(store.uri)`), once a server answers
    (`wait_until_reachable`, with `store.retries` and `store.timeout_s`).

    Changes no process-wide state: MLflow's global tracking URI and the environment stay
    as they are (what MLflow reads from the environment is the entry point's to set:
    `configure_process`).

    An SQLite store that does not exist yet is created, and `announce`d (a store in the
    wrong folder must not go unnoticed); with `create=False` (commands that only read or
    add to what a store holds: register, promote) it is refused instead (TrackingError
    naming the file and how to name the right store).
    """
    from mlflow import MlflowClient

    uri = store.uri
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
    wait_until_reachable(uri, store.retries, store.timeout_s)
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


def unless_missing(call, *args, missing: frozenset[str] = MISSING):
    """`call(*args)` against the store, or None when the store answers with an error code
    in `missing` (it does not exist); any other error is raised."""
    from mlflow.exceptions import MlflowException

    try:
        return call(*args)
    except MlflowException as exc:
        if exc.error_code in missing:
            return None
        raise
