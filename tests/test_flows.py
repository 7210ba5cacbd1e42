"""The Prefect flows under `prefect_test_harness` (a temporary API and database).

Data comes from a folder (`--no-dvc`: the DVC data step has its own tests), training is
tiny, and every test registers into its own throwaway MLflow store with the promotion
floor at 0, so the surviving category's first version becomes champion.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import TINY_OVERRIDES

from dualstpm.config import apply_overrides, load_params
from dualstpm.errors import PipelineError

FLOW_OVERRIDES = [*TINY_OVERRIDES, "data.source=folder", "ablation.branch_weight_step=0.5",
                  "ablation.panel_images=0", "tracking.promotion_floor=0"]


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):  # None: the env's 120 s
        yield


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def params_file(folder: Path, data_root: Path, categories: list[str], extra: Sequence[str] = ()) -> Path:
    raw = apply_overrides({}, [*FLOW_OVERRIDES, f"data.root={data_root}", f"data.categories={categories}", *extra])
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def champion_version(params_path: Path, category: str) -> str:
    from mlflow import MlflowClient

    from dualstpm.mlops.names import CHAMPION, model_name

    name = model_name(load_params(params_path).data.root, category)
    return str(MlflowClient().get_model_version_by_alias(name, CHAMPION).version)


def test_a_failing_category_is_reported_and_the_other_keeps_its_results(
        harness, tmp_path: Path, synthetic_root: Path, mlflow_store: str) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dualstpm.mlops.names import model_name
    from flows.pipeline import pipeline

    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "synth_texture", data / "synth_texture")
    shutil.copytree(synthetic_root / "synth_texture", data / "synth_broken")
    broken = sorted((data / "synth_broken" / "train" / "good").iterdir())[0]
    broken.write_bytes(b"not an image")  # listed fine, fails when fit decodes it
    params = params_file(tmp_path, data, ["synth_texture", "synth_broken"])
    out = tmp_path / "out"

    state = pipeline(str(params), [], str(out), False, return_state=True)

    assert state.is_failed()
    with pytest.raises(PipelineError) as failure:
        state.result()
    assert "1 of 2 categories failed" in str(failure.value)
    assert "synth_broken: fit:" in str(failure.value) and "synth_texture:" not in str(failure.value)
    run_dir = out / "runs" / "synth_texture"
    for kept in ("model/weights.safetensors", "model/fusion.json", "metrics.json", "ablation/summary.json"):
        assert (run_dir / kept).is_file(), kept
    table = pd.read_csv(out / "reports" / "auc_table.csv")
    assert set(table["category"]) == {"synth_texture"}
    assert champion_version(params, "synth_texture") == "1"
    with pytest.raises(MlflowException, match="RESOURCE_DOES_NOT_EXIST|not found"):
        MlflowClient().get_registered_model(model_name(load_params(params).data.root, "synth_broken"))

    # both categories ran side by side: each task's log says its lines with its category in front
    logs = _task_logs(state.state_details.flow_run_id)
    fit_lines = logs["fit-synth_texture"]
    assert "synth_texture: epoch 1" in "\n".join(fit_lines) and "synth_texture: epoch 2" in "\n".join(fit_lines)
    assert [line for line in fit_lines if not line.startswith("synth_texture: ")] == [
        "Finished in state Completed()"], fit_lines  # the only line that is Prefect's own
    n_test = len(list((data / "synth_texture" / "test").glob("*/*.png")))
    assert f"synth_texture: computing anomaly maps of test images: {n_test} images" in logs["test-synth_texture"]
    n_train = len(list((data / "synth_broken" / "train" / "good").iterdir()))
    n_fit = n_train - round(n_train * load_params(params).fit.val_fraction)  # the rest is held out for validation
    # the fit is first planned from the training images' sizes (file headers: its input size); that fails on
    # the broken file, under the category's name
    assert logs["fit-synth_broken"][0] == f"synth_broken: planning: reading train image sizes: {n_fit} images"
    assert not any(line.startswith("synth_texture") for line in logs["fit-synth_broken"])


def _task_runs(flow_run_id) -> list:
    """The task runs of a flow run and of its subflow runs (the category fan-out)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as api:
        children = api.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids = [flow_run_id, *(run.id for run in children)]
        return api.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))


def _task_logs(flow_run_id) -> dict[str, list[str]]:
    """{task run name: the messages of its log, oldest first} of a flow run and its subflows."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the logs go to the API in batches
    with get_client(sync_client=True) as api:
        return {run.name: [log.message for log in api.read_logs(
                    log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=[run.id])), sort=LogSort.TIMESTAMP_ASC)]
                for run in _task_runs(flow_run_id)}


def test_bad_data_fails_its_category_alone_at_the_data_stage_without_retries(
        harness, tmp_path: Path, synthetic_root: Path, mlflow_store: str) -> None:
    """retrain over a good category, one whose defect image lost its mask, one whose folder
    is missing, plus a configured category whose stale metrics.json breaks the report: the
    good one is trained, tested, registered and champion; each bad one fails at `data`, once."""
    from flows.retrain import retrain

    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "synth_texture", data / "synth_texture")
    shutil.copytree(synthetic_root / "synth_texture", data / "synth_nomask")
    (data / "synth_nomask" / "ground_truth" / "hole" / "000_mask.png").unlink()
    out = tmp_path / "out"
    (out / "runs" / "synth_stale").mkdir(parents=True)
    (out / "runs" / "synth_stale" / "metrics.json").write_text("{half written")
    categories = ["synth_texture", "synth_nomask", "synth_gone"]
    params = params_file(tmp_path, data, [*categories, "synth_stale"])

    state = retrain(categories, str(params), [], str(out), False, return_state=True)

    assert state.is_failed()
    with pytest.raises(PipelineError) as failure:
        state.result()
    message = str(failure.value)
    assert "2 of 3 categories failed" in message
    assert "synth_nomask: data:" in message and "000_mask.png" in message
    assert "synth_gone: data:" in message and "synth_texture:" not in message
    assert "report:" in message
    assert (out / "runs" / "synth_texture" / "ablation" / "summary.json").is_file()
    assert champion_version(params, "synth_texture") == "1"
    runs = {run.name: run for run in _task_runs(state.state_details.flow_run_id)}
    assert {runs[f"check-{c}"].state.type.value for c in categories} == {"COMPLETED", "FAILED"}
    assert runs["check-synth_nomask"].run_count == 1 and runs["check-synth_gone"].run_count == 1
    assert "fit-synth_nomask" not in runs or not runs["fit-synth_nomask"].run_count  # never started


def test_a_data_error_of_the_shared_data_step_is_not_retried(harness, tmp_path: Path, mlflow_store: str) -> None:
    from dualstpm.errors import DataError
    from flows.pipeline import pipeline

    params = params_file(tmp_path, tmp_path / "no_such_root", ["synth_texture"])
    state = pipeline(str(params), [], str(tmp_path / "out"), False, return_state=True)
    with pytest.raises(DataError, match="no_such_root is not a folder"):
        state.result()
    (data,) = [run for run in _task_runs(state.state_details.flow_run_id) if run.name.startswith("data")]
    assert data.run_count == 1 and data.state.type.value == "FAILED"


def _run_figures(out: Path, categories: list[str]) -> dict[str, bytes]:
    """Every figure a pipeline run leaves: the report's table, and per category the training
    history, calibration, weights, chosen fusion, test metrics and ablation table."""
    files = {"reports/auc_table.csv": out / "reports" / "auc_table.csv"}
    for category in categories:
        run_dir = out / "runs" / category
        for name in ("history.csv", "model/calibration.json", "model/weights.safetensors", "model/fusion.json",
                     "metrics.json", "ablation/table.csv", "plots/roc/fused.csv"):
            files[f"{category}/{name}"] = run_dir / name
    return {name: path.read_bytes() for name, path in files.items()}


@pytest.mark.slow
def test_the_pipeline_twice_with_the_same_params_gives_the_same_figures(
        harness, tmp_path: Path, synthetic_root: Path, mlflow_store: str) -> None:
    """Fits, tests and ablations of two categories share the flow's thread pool; whatever
    interleaving each run gets, every figure is the same to the last byte."""
    from flows.pipeline import pipeline

    categories = ["synth_texture", "synth_object"]
    params = params_file(tmp_path, synthetic_root, categories)
    pipeline(str(params), [], str(tmp_path / "first"), False)
    pipeline(str(params), [], str(tmp_path / "second"), False)
    first, second = _run_figures(tmp_path / "first", categories), _run_figures(tmp_path / "second", categories)
    assert [name for name in first if first[name] != second[name]] == []


def test_retrain_refuses_a_category_the_data_step_does_not_prepare(harness, tmp_path: Path, synthetic_root: Path) -> None:
    from dualstpm.errors import ConfigError
    from flows.retrain import retrain

    params = params_file(tmp_path, synthetic_root, ["synth_texture"])
    with pytest.raises(ConfigError, match=r"\['synth_object'\] are not in data.categories"):
        retrain(["synth_object"], str(params), [], str(tmp_path / "out"), False)
    assert not (tmp_path / "out").exists()


def test_task_runner_follows_the_prefect_params() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from dualstpm.config import PrefectParams
    from flows.tasks import make_task_runner

    threads = make_task_runner(PrefectParams(max_workers=3))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    local = make_task_runner(PrefectParams(task_runner="dask", dask_workers=3))
    assert isinstance(local, DaskTaskRunner) and local.cluster_kwargs["n_workers"] == 3 and local.address is None
    remote = make_task_runner(PrefectParams(task_runner="dask", dask_address="tcp://10.0.0.5:8786"))
    assert remote.address == "tcp://10.0.0.5:8786"


@pytest.mark.slow
def test_dask_cluster_runs_two_categories_one_training_at_a_time(
        harness, tmp_path: Path, synthetic_root: Path, mlflow_store: str) -> None:
    from distributed import Client, LocalCluster, get_task_stream
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime

    from flows.pipeline import pipeline

    categories = ["synth_texture", "synth_object"]
    started = datetime.now(timezone.utc)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        params = params_file(tmp_path, synthetic_root, categories,
                             ["prefect.task_runner=dask", f"prefect.dask_address={cluster.scheduler_address}"])
        with get_task_stream(client) as stream:
            summary = pipeline(str(params), [], str(tmp_path / "out"), False)
        worker_addresses = set(client.scheduler_info()["workers"])

    ran_on = {task["worker"] for task in stream.data}
    assert len(stream.data) >= 3 * len(categories)  # fit, test and ablate of each category ran on the cluster
    assert ran_on <= worker_addresses
    assert {row["category"] for row in summary["auc_table"]} == {*categories, "mean"}
    assert set(summary["promotions"]) == set(categories)

    with get_client(sync_client=True) as api:
        fits = api.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_="fit-"), start_time=TaskRunFilterStartTime(after_=started)))
    spans = sorted((run.start_time, run.end_time) for run in fits)
    assert len(spans) == len(categories)
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), f"trainings overlapped: {spans}"


def test_a_cron_prefect_refuses_is_a_config_error_naming_the_key() -> None:
    from dualstpm.config import PrefectParams
    from dualstpm.errors import ConfigError
    from flows.serve import retrain_schedule

    assert retrain_schedule(PrefectParams(retrain_cron="30 2 * * *", retrain_timezone="Asia/Tokyo")).timezone == "Asia/Tokyo"
    with pytest.raises(ConfigError, match=r"prefect.retrain_cron = '99 3 \* \* 1'"):
        retrain_schedule(PrefectParams(retrain_cron="99 3 * * 1"))


def test_the_pipeline_summary_is_the_auc_table_then_each_promotion(capsys: pytest.CaptureFixture) -> None:
    from dualstpm.cli import print_pipeline_summary
    from dualstpm.mlops.promote import PromotionDecision

    decision = PromotionDecision(True, "first champion: 0.9100 reaches the floor 0.7000", "dualstpm-synthetic-a",
                                 "image_auroc", "3", 0.91, "3", None, None, "feed.dir", "me", "now")
    table = [{"category": "a", "model": "fused", "image_auroc": 0.91, "pixel_auroc": 0.8, "aupro": 0.5,
              "image_f1_max": 0.7}]
    print_pipeline_summary({"auc_table": table, "ablations": {"a": "kept the default (x): the model decides with `fused`"},
                            "promotions": {"a": decision}, "reports": "out/reports"})
    printed = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal's width
    assert "AUC table (out/reports)" in printed and "0.9100" in printed
    assert "a: ablation kept the default (x): the model decides with `fused` dualstpm-synthetic-a" in printed
    assert printed.endswith("dualstpm-synthetic-a: version 3 promoted; champion: version 3 "
                                     "(first champion: 0.9100 reaches the floor 0.7000)")


def test_entry_points_turn_mlflow_progress_bars_off_unless_the_user_set_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from dualstpm import cli
    from dualstpm.mlops.tracking import PROGRESS_BAR_ENV
    from flows.pipeline import entry_point

    seen = []
    monkeypatch.delenv(PROGRESS_BAR_ENV, raising=False)
    entry_point(lambda: seen.append(os.environ.get(PROGRESS_BAR_ENV)))
    monkeypatch.delenv(PROGRESS_BAR_ENV)
    monkeypatch.setattr(cli, "app", lambda: seen.append(os.environ.get(PROGRESS_BAR_ENV)))
    cli.main()
    monkeypatch.setenv(PROGRESS_BAR_ENV, "true")  # the user's own choice wins
    entry_point(lambda: seen.append(os.environ.get(PROGRESS_BAR_ENV)))
    assert seen == ["false", "false", "true"]


@pytest.mark.slow
def test_python_m_flows_pipeline_ends_like_dualstpm_demo(tmp_path: Path, synthetic_root: Path, mlflow_store: str) -> None:
    import os
    import subprocess
    import sys

    from conftest import PROJECT_ROOT

    params = params_file(tmp_path, synthetic_root, ["synth_texture"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
           "COLUMNS": "200"}
    env.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
    done = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", str(params), "--out", str(tmp_path / "out"),
                           "--no-dvc"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = " ".join(done.stdout.split())  # rich wraps at its width
    table = pd.read_csv(tmp_path / "out" / "reports" / "auc_table.csv")
    fused = table[table["model"] == "fused"].iloc[0]
    assert "AUC table" in printed and f"synth_texture │ fused │ {fused['image_auroc']:.4f}" in printed
    assert "-synth_texture: version 1 promoted; champion: version 1 (first champion" in printed
    assert "Downloading artifacts" not in done.stdout + done.stderr


def _apply_reviews(category: Path, donor: Path) -> Path:
    """What `dualstpm feedback apply` leaves after a review (docs/loop.md): two defective
    parts in validation/<defect>/ (one with its mask in validation_ground_truth/), and a good
    part the model had flagged, copied into train/good with its feedback.jsonl line. The parts
    come from another category (`donor`), so none is one of this category's test images.
    Returns the reviewed good part."""
    kind = min(p.name for p in (donor / "test").iterdir() if p.name != "good")
    (category / "validation" / kind).mkdir(parents=True)
    (category / "validation_ground_truth" / kind).mkdir(parents=True)
    for name in ("000", "001"):
        shutil.copy(donor / "test" / kind / f"{name}.png", category / "validation" / kind / f"r{name}.png")
    shutil.copy(donor / "ground_truth" / kind / "000_mask.png", category / "validation_ground_truth" / kind / "r000_mask.png")
    overruled = category / "train" / "good" / "reviewed-0.png"
    shutil.copy(donor / "test" / "good" / "000.png", overruled)
    line = {"schema": 1, "sha256": "0" * 64, "path": "train/good/reviewed-0.png", "verdict": "good",
            "model_label": "defective", "defect_type": None}
    (category / "feedback.jsonl").write_text(json.dumps(line) + "\n")
    return overruled


def test_retrain_skips_unchanged_data_and_promotes_on_the_champion_re_tested_with_the_reviews(
        harness, tmp_path: Path, synthetic_root: Path, mlflow_store: str) -> None:
    """The first retrain trains (no model yet); the second skips the unchanged category,
    saying why; after reviewed parts are added, the third retrains, selects on the reviewed
    defects, re-tests the champion on the new data version and decides on that, with the
    reviewed false alarms under both models tagged as evidence."""
    from mlflow import MlflowClient

    from dualstpm.mlops.hashing import data_hash
    from dualstpm.mlops.names import RESCORED_TAG, model_name
    from dualstpm.mlops.runs import RunRecord
    from flows.retrain import retrain

    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "synth_texture", data / "synth_texture")
    params = params_file(tmp_path, data, ["synth_texture"], ["fit.epochs=1", "ablation.normalizations=[none]",
                                                             "ablation.level_subsets=[[1]]", "ablation.bootstrap=50"])
    out = tmp_path / "out"
    client, name = MlflowClient(mlflow_store), model_name(data, "synth_texture")

    first = retrain(None, str(params), [], str(out), False)
    assert first["skipped"] == {} and first["promotions"]["synth_texture"].promoted
    second = retrain(None, str(params), [], str(out), False)
    assert set(second["skipped"]) == {"synth_texture"} and second["promotions"] == {}
    assert "data unchanged" in second["skipped"]["synth_texture"] and "version 1" in second["skipped"]["synth_texture"]
    assert len(client.search_model_versions(f"name = '{name}'")) == 1  # nothing retrained, nothing registered

    _apply_reviews(data / "synth_texture", synthetic_root / "synth_object")
    now = data_hash(data, "synth_texture")
    third = retrain(None, str(params), [], str(out), False)
    decision = third["promotions"]["synth_texture"]
    assert third["skipped"] == {} and decision.challenger_version == "2" and decision.data_hash == now
    evidence = json.loads(client.get_model_version(name, "1").tags[f"{RESCORED_TAG}{now}"])
    v1 = client.get_model_version(name, "1").tags
    # the test split did not change, so the champion re-tested on the new data version scores as on the old one
    assert evidence["image_auroc"] == pytest.approx(float(v1["metric.image_auroc"]))
    assert decision.champion_value == evidence["image_auroc"]
    assert decision.promoted == (decision.challenger_value > decision.champion_value)
    tagged = json.loads(client.get_model_version(name, "2").tags["promotion.evidence"])
    assert tagged["champion_version"] == "1" and tagged["data_hash"] == now
    alarms = tagged["reviewed_false_alarms"]
    assert alarms["old"]["images"] == alarms["new"]["images"] == 1 and alarms["missing"] == []
    # the reviewed defects selected the epoch and the fusion, and were not trained on
    calibration = json.loads((out / "runs" / "synth_texture" / "model" / "calibration.json").read_text())
    assert calibration["validation_evidence"]["evidence"] == "real: 2 images of 1 defect type"
    fitted = client.get_run(RunRecord.read(out / "runs" / "synth_texture").run_id).data
    assert fitted.tags["dualstpm.validation_evidence"] == "real: 2 images of 1 defect type"
    assert fitted.metrics["val_real.fused.image_auroc"] == calibration["validation_evidence"]["views"]["fused"]["image_auroc"]
    summary = json.loads((out / "runs" / "synth_texture" / "ablation" / "summary.json").read_text())
    assert summary["selection_set"]["validation_evidence"] == "real: 2 images of 1 defect type"
