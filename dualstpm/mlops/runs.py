"""The MLflow runs of a category: what they record, and where their ids are kept.

One parent run per trained category with a child run per branch (`stpm`, `recon`), in the
experiment of the dataset (`tracking.experiment_name`). The parent holds the resolved
params, the git commit, the hash of the data, per-epoch losses, the fused model's final
metrics and the artifacts (AUC table, metrics.json, ROC/PRO curves, overlays); each child
holds its branch's losses and metrics. The ids live in `RUN/mlflow_run.json`, so
`dualstpm test` (a separate process, maybe days later) adds to the run `dualstpm fit`
started. Every call goes through the client it is given (`tracking.connect`): no global
"active run", so parallel tasks in one process do not mix their runs.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dualstpm.config import Params
from dualstpm.errors import TrackingError
from dualstpm.files import file_digest, write_json
from dualstpm.mlops.hashing import data_hash, git_state
from dualstpm.mlops.tracking import TAG, dataset_name, ensure_experiment, experiment_name, tracking_errors
from dualstpm.rundir import RunDir, read_optional_json

BRANCH_RUNS = ("stpm", "recon")
RESULT_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "precision", "recall", "threshold",
                  "false_alarm_rate")
METRICS_HASH_TAG = f"{TAG}metrics_sha256"  # sha256 of the metrics.json a test logged to its run
_METRIC_UNSAFE = re.compile(r"[^\w\-. /]")  # MLflow metric names allow only these characters


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


def open_category_run(client, params: Params, run_dir: Path, category: str, data_root: Path,
                      *, reuse: bool, source: str) -> CategoryRun:
    """The category's parent run with its branch children, in the store of `client`
    (`tracking.connect`), described by `params`.

    `reuse`: continue the runs recorded in `RUN/mlflow_run.json` when they exist in this
    store (resume, test); otherwise (a fresh fit, or nothing recorded) start new ones with
    the params, git commit and data hash, and record their ids.
    """
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
