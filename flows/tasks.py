"""Prefect tasks over the library's stage functions, and how they run.

Every task calls one `dualstpm` function and re-implements nothing. All of them have side
effects (run directories, the report, the model registry), so none is cached. The data
step retries with exponential backoff when a download failed for a while, and only then;
each category's files are checked in a task of its own, so a bad one fails that category
alone. Fit tasks carry the tag `dualstpm-training`, whose concurrency limit (`prefect.training_slots`, one per
GPU) the API enforces before a fit starts running, whichever worker or machine runs it.

Categories run side by side, so what a category's task says (its progress lines, fit's
epochs and warnings) goes to the task's Prefect log (the UI, and the console) with the
category in front: :func:`category_log`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import State, TaskRun
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff

from dualstpm.config import Params, PrefectParams
from dualstpm.data.download import failed_for_a_while
from dualstpm.errors import DualStpmError, NetworkError
from dualstpm.mlops.dvc_stage import reproduce_download
from dualstpm.mlops.promote import PromotionDecision, promote
from dualstpm.mlops.register import register_run
from dualstpm.mlops.report import write_report
from dualstpm.mlops.stages import check_category, prepare_root, tracked_ablate, tracked_fit, tracked_test
from dualstpm.mlops.tracking import Store
from dualstpm.progress import labelled
from dualstpm.mlops.retraining import describe_false_alarms, promotion_evidence, unchanged_categories

TRAINING_TAG = "dualstpm-training"


def make_task_runner(settings: PrefectParams) -> TaskRunner:
    """Threads on this machine by default; a Dask cluster (local, or the one at `dask_address`) on request."""
    if settings.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=settings.max_workers)
    from prefect_dask import DaskTaskRunner

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    # One thread per worker process: torch parallelises inside a task already.
    return DaskTaskRunner(cluster_kwargs={"n_workers": settings.dask_workers, "threads_per_worker": 1})


def ensure_training_limit(slots: int) -> None:
    """Create or resize the concurrency limit of the training tag (Prefect keeps tag limits
    as global limits named `tag:<tag>`); a fit waits for a slot before it starts running."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(f"tag:{TRAINING_TAG}", slots)


@contextlib.contextmanager
def category_log(category: str) -> Iterator[None]:
    """Inside a task: every line the library says starts with `category` and goes to the
    task run's logger (Prefect's UI and console), not straight to stderr."""
    with labelled(category, get_run_logger().info):
        yield


def _worth_retrying(task: Task, task_run: TaskRun, state: State) -> bool:
    """Only a failure that may pass is retried: a download or server that did not answer.
    A data or config error (a missing mask, a wrong key) stays wrong on the next try."""
    try:
        state.result()
    except NetworkError:
        return True
    except DualStpmError:
        return False
    except Exception as exc:  # noqa: BLE001 - a network failure outside our wrappers is still one
        return failed_for_a_while(exc)
    return False


@task(
    name="data",
    cache_policy=NO_CACHE,
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=10),
    retry_jitter_factor=0.5,
    retry_condition_fn=_worth_retrying,
)
def data_task(params: Params, dvc_project: Path | None) -> Path:
    """The data root, through DVC's `download` stage in `dvc_project` (the versioned data) or
    directly; each category's own files are checked by :func:`check_task`."""
    if dvc_project is not None:
        return reproduce_download(params, dvc_project)
    return prepare_root(params).resolve()


@task(name="check", cache_policy=NO_CACHE, task_run_name="check-{category}")
def check_task(data_root: Path, category: str) -> Path:
    """One category's files (masks, splits, sizes) checked before its fit; never retried:
    a bad file is the user's to fix, and fails this category alone. Returns the data root."""
    with category_log(category):
        return check_category(data_root, category)


@task(name="fit", cache_policy=NO_CACHE, task_run_name="fit-{category}", tags=[TRAINING_TAG])
def fit_task(params: Params, store: Store, data_root: Path, category: str, run_dir: Path) -> Path:
    """A fresh, MLflow-tracked fit of `category` into `run_dir` (while holding a training slot).
    A poor fit (`dualstpm.fit_check`) is a warning in the task's log."""
    with category_log(category):
        result = tracked_fit(params, data_root, category, run_dir, store=store, overwrite=True)
    if result.fit_check and result.fit_check["warning"]:
        get_run_logger().warning("%s: %s", category, result.fit_check["warning"])
    return run_dir


@task(name="test", cache_policy=NO_CACHE, task_run_name="test-{category}")
def test_task(params: Params, store: Store, run_dir: Path, data_root: Path, category: str) -> Path:
    """The tracked test: metrics.json, plots/ and the evaluation data's hash in the MLflow run.
    Its `note` (lossy or empty masks, undefined metrics), as on `dualstpm test`'s console,
    is a warning in the task's log."""
    with category_log(category):
        result = tracked_test(params, run_dir, data_root, category, store=store)
    if result.get("note"):
        get_run_logger().warning("%s: note: %s", category, result["note"])
    return run_dir


@task(name="ablate", cache_policy=NO_CACHE, task_run_name="ablate-{run_dir.name}")
def ablate_task(params: Params, store: Store, run_dir: Path) -> Path:
    """The fusion-weight ablation on the stored maps; with `ablation.apply` the model takes its choice."""
    with category_log(run_dir.name):  # the category: runs/<category>
        tracked_ablate(params, run_dir, store=store)
    return run_dir


@task(name="report", cache_policy=NO_CACHE)
def report_task(run_dirs: dict[str, Path], out_dir: Path) -> list[dict]:
    return write_report(run_dirs, out_dir).to_dict(orient="records")


@task(name="register", cache_policy=NO_CACHE, task_run_name="register-{category}")
def register_task(run_dir: Path, params: Params, store: Store, category: str) -> str:
    """A new registry version of the tested run, alias `challenger`; returns its version."""
    with category_log(category):
        return register_run(run_dir, params, category, store=store).version


@task(name="promote", cache_policy=NO_CACHE, task_run_name="promote-{category}")
def promote_task(category: str, params: Params, store: Store, evidence: dict | None = None) -> PromotionDecision:
    """`champion` moves only when the challenger beats it; the flow run is recorded as the
    decider, and `evidence` (:func:`evidence_task`'s) is tagged with the decision."""
    with category_log(category):
        return promote(category, params, store=store,
                       decided_by=f"prefect flow run {flow_run.flow_name}/{flow_run.name}",
                       data_root=params.data.root,  # the data the flow tested on: the model `register` made
                       evidence=evidence)


@task(name="changes", cache_policy=NO_CACHE)
def changes_task(params: Params, store: Store, data_root: Path, categories: list[str]) -> dict[str, str]:
    """{category: why it is not retrained}: its data is what its registered model was tested on."""
    skipped = unchanged_categories(store, data_root, categories)
    for category, why in skipped.items():
        get_run_logger().info("%s: skipped: %s", category, why)
    return skipped


@task(name="evidence", cache_policy=NO_CACHE, task_run_name="evidence-{category}")
def evidence_task(params: Params, store: Store, data_root: Path, category: str, run_dir: Path) -> dict:
    """The champion re-tested on the challenger's data (when it was tested on other data)
    and the reviewed false alarms under both (`mlops.retraining.promotion_evidence`)."""
    with category_log(category):
        evidence = promotion_evidence(params, store, data_root, category, run_dir)
        line = describe_false_alarms(evidence)
        if line:
            get_run_logger().info("%s: %s", category, line)
    return evidence
