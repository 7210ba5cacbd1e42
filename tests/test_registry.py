"""Tracking and the model registry against a real `mlflow server` on 127.0.0.1.

A tiny model is fitted and tested on the synthetic data through the tracked stage
functions; the tests read back what MLflow stored, register and promote versions, load
`models:/...@champion` and compare it with `dualstpm predict`, race promotions and pull
the server away in the middle of a fit.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from conftest import TINY_OVERRIDES, strict_json
from mlflow import MlflowClient
from mlflow_fixtures import MlflowServer, free_port

from dualstpm.compute import Compute
from dualstpm.config import load_params
from dualstpm.detector import Detector
from dualstpm.errors import RunError, TrackingError
from dualstpm.mlops.hashing import data_hash, git_state
from dualstpm.mlops.names import CHALLENGER, CHAMPION, model_name
from dualstpm.mlops.promote import promote
from dualstpm.mlops.register import register_run
from dualstpm.mlops.runs import RunRecord
from dualstpm.mlops.stages import tracked_ablate, tracked_fit, tracked_test
from dualstpm.mlops.tracking import dataset_name, entry_store
from dualstpm.predict import predict
from dualstpm.rundir import RUN_RECORD


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dualstpm", *args], capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def params(synthetic_root: Path):
    return load_params(None, [*TINY_OVERRIDES, "data.source=synthetic", f"data.root={synthetic_root}",
                              "tracking.retries=0", "tracking.timeout_s=20"])


def load_champion(name: str, folder: Path) -> mlflow.pyfunc.PyFuncModel:
    """The registered model `name`@champion as MLflow loads it, downloaded into `folder` (created here).

    Without a destination MLflow downloads into a fresh folder under /tmp that it never removes.
    """
    folder.mkdir()
    return mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}", dst_path=str(folder))


def image_frame(images: list[Path]) -> pd.DataFrame:
    """The pyfunc model's input for `images`: one row per file, its encoded bytes in column `image`."""
    return pd.DataFrame({"image": [p.read_bytes() for p in images]})


def fit_and_test_tracked(params, root: Path, category: str, run_dir: Path) -> Path:
    tracked_fit(params, root, category, run_dir, store=entry_store(params))
    tracked_test(params, run_dir, root, category, store=entry_store(params))
    return run_dir


@pytest.fixture(scope="module")
def texture_run(tracking_env, params, synthetic_root: Path, tmp_path_factory) -> Path:
    return fit_and_test_tracked(params, synthetic_root, "synth_texture", tmp_path_factory.mktemp("runs") / "synth_texture")


def test_fit_and_test_are_one_parent_run_with_a_child_per_branch(texture_run: Path, params, synthetic_root: Path,
                                                                 tmp_path: Path):
    client = MlflowClient()
    record = RunRecord.read(texture_run)
    assert record.tracking_uri == os.environ["MLFLOW_TRACKING_URI"]
    parent = client.get_run(record.run_id)
    assert client.get_experiment(parent.info.experiment_id).name == f"dualstpm-{synthetic_root.name}"  # data root's name
    assert parent.info.run_name == "synth_texture" and parent.info.status == "FINISHED"

    # params: the resolved params.yaml, flattened
    assert parent.data.params["fit.epochs"] == "2" and parent.data.params["image_size"] == "64"
    # only what the run used: its data folder and category, no download settings of another source
    assert parent.data.params["data.root"] == str(synthetic_root.resolve())
    assert parent.data.params["data.category"] == "synth_texture"
    assert not [k for k in parent.data.params if k.startswith("data.mvtec.") or k == "data.categories"]
    assert parent.data.params["model.t2.name"] == "tf_efficientnet_lite2"
    # provenance: the code's commit and the data's DVC hash
    assert parent.data.tags["dualstpm.git_commit"] == git_state()[0] != "unknown"
    assert parent.data.tags["dualstpm.eval_data_hash"] == data_hash(synthetic_root, "synth_texture")
    # per-epoch losses and the final metrics of the fused model
    history = client.get_metric_history(record.run_id, "loss_stpm")
    assert [m.step for m in history] == [1, 2]
    metrics = json.loads((texture_run / "metrics.json").read_text())
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
        assert parent.data.metrics[key] == pytest.approx(metrics["fused"][key])

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{record.run_id}'")
    assert sorted(c.data.tags["dualstpm.branch"] for c in children) == ["recon", "stpm"]
    for child in children:
        branch = child.data.tags["dualstpm.branch"]
        assert child.data.metrics["image_auroc"] == pytest.approx(metrics[branch]["image_auroc"])
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss")] == [1, 2]

    artifacts = set()
    pending = [""]
    while pending:
        for item in client.list_artifacts(record.run_id, pending.pop()):
            (pending.append(item.path) if item.is_dir else artifacts.add(item.path))
    assert {"test/auc_table.csv", "test/metrics.json", "fit/history.csv", "plots/roc.png", "plots/pro.png",
            "plots/overlays.png", "plots/roc/fused.csv", "plots/pro/recon.csv"} <= artifacts
    assert any(a.startswith("plots/overlays/") for a in artifacts)
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=record.run_id, artifact_path="test/auc_table.csv",
                                                        dst_path=str(tmp_path)))
    assert list(table["model"]) == ["stpm", "recon", "fused"]
    assert table.set_index("model").loc["fused", "image_auroc"] == pytest.approx(metrics["fused"]["image_auroc"])


def test_registered_champion_predicts_like_dualstpm_predict(texture_run: Path, params, synthetic_root: Path, tmp_path: Path):
    done = cli("register", "--run", str(texture_run), "--set", "data.source=synthetic", "--set", f"data.root={synthetic_root}")
    assert done.returncode == 0, done.stderr
    name = model_name(synthetic_root, "synth_texture")
    version = MlflowClient().get_model_version_by_alias(name, CHALLENGER)
    assert f"{name} version {version.version}" in done.stdout
    assert version.tags["dualstpm.data_hash"] == data_hash(synthetic_root, "synth_texture")

    decision = promote("synth_texture", params.model_copy(update={"tracking": params.tracking.model_copy(
        update={"promotion_floor": 0.0})}), version=version.version, store=entry_store(params))
    assert decision.promoted, decision.reason
    assert MlflowClient().get_model_version_by_alias(name, CHAMPION).version == version.version

    images = sorted((synthetic_root / "synth_texture" / "test").rglob("*.png"))[::3]
    expected = predict(Detector.load(texture_run), images, tmp_path / "pred")  # what `dualstpm predict` runs

    model = load_champion(name, tmp_path / "champion")
    frame = image_frame(images)
    got = model.predict(frame, params={"return_map": True})
    np.testing.assert_allclose(got["score"], expected["score"], rtol=0, atol=1e-5)
    assert list(got["label"]) == list(expected["label"])
    assert got["threshold"].iloc[0] == pytest.approx(Detector.load(texture_run).threshold)
    assert np.asarray(got["anomaly_map"].iloc[0]).shape == (64, 64)  # the image's own size
    assert "anomaly_map" not in model.predict(image_frame(images[:1])).columns
    # the answer has the signature's columns, in its order; this model has no discriminative stage
    assert [c for c in got.columns if c != "anomaly_map"] == model.metadata.get_output_schema().input_names()
    assert "disc_score" in got.columns and got["disc_score"].isna().all()
    # the version carries its ONNX export: PyTorch float32's answers from ONNX Runtime (fp32 parity bounds)
    onnx = model.predict(frame, params={"backend": "onnxruntime"})
    expected = predict(Detector.load(texture_run, Compute.resolve("cpu", "float32")), images, tmp_path / "float32")
    np.testing.assert_allclose(onnx["score"], expected["score"], rtol=1e-4)
    np.testing.assert_allclose(onnx["normalized_score"], expected["normalized_score"], rtol=0, atol=1e-4)
    assert list(onnx["label"]) == list(expected["label"])


# --------------------------------------------------------------------------- promotion


def evidence_copy(run_dir: Path, dest: Path, image_auroc: float, eval_data_hash: str | None = None) -> Path:
    """A copy of a tested run whose test said `image_auroc` (and, optionally, on other data):
    the promotion rule is about evidence, so the tests choose the evidence."""
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns("maps", "plots", "checkpoint.pt"))
    metrics = json.loads((dest / "metrics.json").read_text())
    metrics["fused"]["image_auroc"] = image_auroc
    (dest / "metrics.json").write_text(json.dumps(metrics))
    if eval_data_hash is not None:
        record = json.loads((dest / RUN_RECORD).read_text())
        record["eval_data_hash"] = eval_data_hash
        (dest / RUN_RECORD).write_text(json.dumps(record))
    return dest


POOL = {"0.80": 0.80, "0.85": 0.85, "0.90": 0.90, "0.95": 0.95}


@pytest.fixture(scope="module")
def pool(texture_run: Path, params, tmp_path_factory) -> dict[str, str]:
    """Versions of `dualstpm-synthetic-synth_texture` whose tests scored as named, plus one
    that scored 0.99 on other data; label -> version."""
    root = tmp_path_factory.mktemp("pool")
    versions = {}
    for label, value in [*POOL.items(), ("other-data", 0.99)]:
        other = "0" * 32 + ".dir" if label == "other-data" else None
        versions[label] = register_run(evidence_copy(texture_run, root / label, value, other), params, "synth_texture", store=entry_store(params)).version
    return versions


def no_champion(name: str) -> None:
    client = MlflowClient()
    if CHAMPION in client.get_registered_model(name).aliases:
        client.delete_registered_model_alias(name, CHAMPION)


def test_promotion_moves_champion_only_on_evidence(pool: dict[str, str], params, synthetic_root: Path):
    client = MlflowClient()
    name = model_name(synthetic_root, "synth_texture")
    no_champion(name)
    assert client.get_model_version_by_alias(name, CHALLENGER).version == pool["other-data"]  # the last registered

    strict = params.model_copy(update={"tracking": params.tracking.model_copy(update={"promotion_floor": 0.9})})
    below = promote("synth_texture", strict, version=pool["0.80"], store=entry_store(strict))  # the first champion must reach the floor
    assert not below.promoted and "below the floor 0.9000" in below.reason
    assert CHAMPION not in client.get_registered_model(name).aliases
    assert "floor" in client.get_model_version(name, pool["0.80"]).tags["promotion.reason"]

    first = promote("synth_texture", params, version=pool["0.80"], store=entry_store(params))
    assert first.promoted and first.champion_version == pool["0.80"]

    better = promote("synth_texture", params, version=pool["0.90"], store=entry_store(params))
    assert better.promoted and better.previous_champion_version == pool["0.80"]
    assert client.get_model_version_by_alias(name, CHAMPION).version == pool["0.90"]
    assert client.get_model_version(name, pool["0.80"]).tags["promotion.replaced_by"] == pool["0.90"]

    # worse than the champion, through the CLI: refused, reason tagged, champion untouched
    done = cli("promote", "--category", "synth_texture", "--version", pool["0.85"],
               "--set", "data.source=synthetic", "--set", f"data.root={synthetic_root}")
    assert done.returncode == 3, done.stderr  # judged and not promoted: a CI job can gate on it
    assert "not promoted" in done.stdout
    tags = client.get_model_version(name, pool["0.85"]).tags
    assert tags["promotion.promoted"] == "False" and "does not beat" in tags["promotion.reason"]
    assert float(tags["promotion.champion_value"]) == pytest.approx(0.90)
    assert float(tags["promotion.challenger_value"]) == pytest.approx(0.85)
    assert tags["promotion.data_hash"] == data_hash(synthetic_root, "synth_texture")
    assert "dualstpm promote" in tags["promotion.decided_by"]
    assert client.get_model_version_by_alias(name, CHAMPION).version == pool["0.90"]

    margin = promote("synth_texture", params, min_delta=0.1, version=pool["0.95"], store=entry_store(params))  # 0.95 < 0.90 + 0.1
    assert not margin.promoted and "by more than 0.1" in margin.reason
    elsewhere = promote("synth_texture", params, version=pool["other-data"], store=entry_store(params))  # 0.99, on other data
    assert not elsewhere.promoted and "same data" in elsewhere.reason
    assert client.get_model_version_by_alias(name, CHAMPION).version == pool["0.90"]
    history = json.loads(client.get_model_version(name, pool["0.95"]).tags["promotion.history"])
    assert history[-1]["promoted"] is False and history[-1]["metric"] == "image_auroc"


def test_racing_promotions_leave_the_better_model_champion(pool: dict[str, str], params, synthetic_root: Path):
    """Three challengers, each better than the champion, promoted at the same moment: the
    promotions are serialised, so the best of them ends as champion, whatever the order."""
    client = MlflowClient()
    name = model_name(synthetic_root, "synth_texture")
    no_champion(name)
    assert promote("synth_texture", params, version=pool["0.80"], store=entry_store(params)).promoted
    contenders = [pool["0.85"], pool["0.95"], pool["0.90"]]
    start = threading.Barrier(len(contenders))
    decisions, errors = [], []

    def contend(version: str) -> None:
        start.wait()
        try:
            decisions.append(promote("synth_texture", params, version=version, decided_by=f"racer {version}", store=entry_store(params)))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(v,)) for v in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert len(decisions) == 3
    assert client.get_model_version_by_alias(name, CHAMPION).version == pool["0.95"]
    for decision in decisions:  # each was judged against the champion of its turn, and tagged
        tags = client.get_model_version(name, decision.challenger_version).tags
        assert tags["promotion.decided_by"].startswith(f"racer {decision.challenger_version}")
    assert f"{name}.promotion-lock" not in [m.name for m in client.search_registered_models()]


def test_promoting_a_missing_version_names_what_exists(pool: dict[str, str], params, synthetic_root: Path):
    """The server runs: the message names the missing version and the ones there are, and
    does not tell the user to start a server."""
    name = model_name(synthetic_root, "synth_texture")
    done = cli("promote", "--category", "synth_texture", "--version", "99",
               "--set", "data.source=synthetic", "--set", f"data.root={synthetic_root}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    message = " ".join(done.stderr.split())
    assert f"{name} has no version 99" in message and "Start it" not in message
    listed = message.split("its versions are ")[1].split(".")[0].split(", ")
    assert set(pool.values()) <= set(listed) and "99" not in listed
    with pytest.raises(RunError, match="no registered model of category 'synth_nothing'"):
        promote("synth_nothing", params, version=1, store=entry_store(params))


# --------------------------------------------------------------------------- a server that goes away


def crash_when(server: MlflowServer, happened) -> threading.Thread:
    """Kill the server (SIGKILL, like a crash) as soon as `happened()` is true."""
    def watch() -> None:
        deadline = time.monotonic() + 300
        while not happened() and time.monotonic() < deadline:
            time.sleep(0.01)
        server.kill()

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def logged_models(server: MlflowServer) -> set[Path]:
    return set((server.root / "artifacts").glob("*/models/*"))


def test_a_server_lost_mid_fit_keeps_the_model_and_says_how_to_recover(mlflow_server: MlflowServer, tracking_env, params,
                                                                        synthetic_root: Path, tmp_path: Path):
    """The session's server crashes after the first epoch of a fit, and is restarted on the
    same store afterwards (for the tests that follow and for the recovery the error promises)."""
    run_dir = tmp_path / "run"
    p = params.model_copy(update={"fit": params.fit.model_copy(update={"epochs": 3})})
    try:
        crash = crash_when(mlflow_server, lambda: (run_dir / "checkpoint.pt").exists())  # after epoch 1
        with pytest.raises(TrackingError) as lost:
            tracked_fit(p, synthetic_root, "synth_texture", run_dir, store=entry_store(p))
        crash.join()
        message = str(lost.value)
        assert "trained and saved" in message and mlflow_server.uri in message and "dualstpm test" in message
        assert Detector.load(run_dir).threshold > 0  # the model is on disk, complete
        with pytest.raises(TrackingError, match="unreachable"):
            tracked_test(p, run_dir, synthetic_root, "synth_texture", store=entry_store(p))  # refused before testing
        assert not (run_dir / "metrics.json").exists()
    finally:
        if mlflow_server.process is None:
            mlflow_server.start()
    try:  # the server goes away after the test wrote its results: they are kept, and the message says so
        crash = crash_when(mlflow_server, lambda: (run_dir / "metrics.json").exists())
        with pytest.raises(TrackingError) as lost:
            tracked_test(p, run_dir, synthetic_root, "synth_texture", store=entry_store(p))
        crash.join()
        message = " ".join(str(lost.value).split())
        assert f"the test results are saved in {run_dir} (metrics.json, auc_table.csv, plots/, maps/)" in message
        assert f"`dualstpm test --run {run_dir} --data-root {synthetic_root} --category synth_texture` runs again" in message
        assert (run_dir / "metrics.json").is_file() and (run_dir / "plots" / "roc.png").is_file()
    finally:
        if mlflow_server.process is None:
            mlflow_server.start()
    tracked_test(p, run_dir, synthetic_root, "synth_texture", store=entry_store(p))
    version = register_run(run_dir, p, "synth_texture", store=entry_store(p))
    run_id = RunRecord.read(run_dir).run_id
    assert version.aliases == [CHALLENGER] and version.run_id == run_id
    assert "image_auroc" in MlflowClient().get_run(run_id).data.metrics
    # and during an ablation: its files are kept and the message says so
    small = p.ablation.model_copy(update={"panel_images": 0, "sweep_modes": ["sum"], "level_modes": ["product"]})
    try:
        crash = crash_when(mlflow_server, lambda: (run_dir / "ablation" / "summary.json").exists())
        with pytest.raises(TrackingError) as lost:
            tracked_ablate(p.model_copy(update={"ablation": small}), run_dir, store=entry_store(p))
        crash.join()
        message = " ".join(str(lost.value).split())
        applied = json.loads((run_dir / "ablation" / "summary.json").read_text())["applied"]  # adopted on a margin
        assert f"the ablation is saved in {run_dir / 'ablation'}" in message
        assert (f"and applied in {run_dir / 'model' / 'fusion.json'}" in message) == applied
        assert f"`dualstpm ablate --run {run_dir}` runs again" in message
    finally:
        if mlflow_server.process is None:
            mlflow_server.start()


@pytest.mark.slow
def test_a_server_lost_mid_registration_leaves_no_alias(mlflow_server: MlflowServer, tracking_env, params,
                                                       texture_run: Path, synthetic_root: Path):
    """The server crashes while the model is being uploaded: the registration fails with a
    clear message, and a version it may have created carries no alias."""
    name = model_name(synthetic_root, "synth_texture")

    def versions(client: MlflowClient) -> set[str]:
        return {str(v.version) for v in client.search_model_versions(f"name = '{name}'")}  # SQLite says int

    known, uploaded = versions(MlflowClient()), logged_models(mlflow_server)
    try:
        crash = crash_when(mlflow_server, lambda: logged_models(mlflow_server) - uploaded)  # mid-upload
        with pytest.raises(TrackingError, match="failed while"):
            register_run(texture_run, params, "synth_texture", store=entry_store(params))
        crash.join()
        store = MlflowClient(f"sqlite:///{mlflow_server.root / 'mlflow.db'}")  # the dead server's database
        assert all(not store.get_model_version(name, v).aliases for v in versions(store) - known)
    finally:
        if mlflow_server.process is None:
            mlflow_server.start()


# --------------------------------------------------------------------------- serving


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_the_loaded_model(texture_run: Path, params, synthetic_root: Path, tmp_path: Path):
    name = model_name(synthetic_root, "synth_texture")
    version = register_run(texture_run, params, "synth_texture", store=entry_store(params))
    promote("synth_texture", params.model_copy(update={"tracking": params.tracking.model_copy(update={"promotion_floor": 0.0})}),
            version=version.version, store=entry_store(params))
    port = free_port()
    (tmp_path / "serve-tmp").mkdir()  # the server downloads the model into TMPDIR and never removes it
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "TMPDIR": str(tmp_path / "serve-tmp")}
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m", f"models:/{name}@{CHAMPION}",
         "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        images = sorted((synthetic_root / "synth_texture" / "test").rglob("*.png"))[:4]
        body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p.read_bytes()).decode()] for p in images]}}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        # the body is strict JSON (JavaScript's JSON.parse reads it): no discriminative stage, disc_score null
        assert [row["disc_score"] for row in strict_json(answer.text)["predictions"]] == [None] * len(images)
        served = pd.DataFrame(answer.json()["predictions"])
        champion = load_champion(name, tmp_path / "champion")
        frame = image_frame(images)
        local = champion.predict(frame)
        np.testing.assert_allclose(served["score"], local["score"], rtol=0, atol=1e-5)
        assert list(served["label"]) == list(local["label"])
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json={**body, "params": {"backend": "onnxruntime"}},
                               timeout=120)
        assert answer.status_code == 200, answer.text
        served_onnx = pd.DataFrame(strict_json(answer.text)["predictions"])
        local_onnx = champion.predict(frame, params={"backend": "onnxruntime"})
        np.testing.assert_allclose(served_onnx["score"], local_onnx["score"], rtol=0, atol=1e-6)
        assert list(served_onnx["label"]) == list(local_onnx["label"])

        # bad input: HTTP 400 naming the column (and row, and the request's index), what to send, no stack trace
        good = base64.b64encode(images[0].read_bytes()).decode()
        not_an_image = base64.b64encode(b"just some text").decode()
        send = "base64 text of those bytes"
        for columns, rows, index, named in (
            (["image"], [[good], [not_an_image]], None, ["column 'image', row 1:", send]),  # base64, not an image
            (["image"], [[good], [not_an_image]], ["p1", "p2"], ["column 'image', row 1 (index 'p2')", send]),
            (["image"], [["%%% not base64"]], None, ["column image"]),  # MLflow's own base64 decoding refuses it
            (["picture"], [[good]], None, ["image"]),  # the column missing: MLflow's schema enforcement refuses it
        ):
            body = {"dataframe_split": {"columns": columns, "data": rows, **({"index": index} if index else {})}}
            refused = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
            assert refused.status_code == 400, refused.text
            message = strict_json(refused.text)["message"]
            assert all(n in message for n in named) and "stack_trace" not in refused.json(), refused.text
            assert "BytesIO" not in message and "Replace or remove" not in message, message
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def test_version_metrics_describe_the_view_the_model_decides_with(tmp_path: Path):
    """Promotion compares the view the model decides with: `fused` (params.fusion) without
    an applied choice; after `dualstpm ablate` applied one, its `chosen` row of metrics.json
    (a test after the ablation) or the chosen fusion's test figures in the ablation summary
    (a test before it). Evidence of another view or threshold is refused."""
    from dualstpm.detector import ChosenFusion
    from dualstpm.errors import RunError
    from dualstpm.model.fusion import FusionSpec
    from dualstpm.mlops.register import _decision_evidence

    tested = {"fused": {"image_auroc": 0.9, "threshold": 1.5}, "chosen_fusion": None}
    assert _decision_evidence(tmp_path, tested, 1.5, None) == (tested["fused"], "metrics.json")
    chosen = ChosenFusion(FusionSpec(mode="sum"), 2.5, {"config": "sweep_sum_wB0.3"}, val_min=1.0)
    with pytest.raises(RunError, match="dualstpm test"):
        _decision_evidence(tmp_path, tested, 2.5, chosen)
    retested = {**tested, "chosen": {"image_auroc": 0.97, "threshold": 2.5}, "chosen_fusion": "sweep_sum_wB0.3"}
    evidence, source = _decision_evidence(tmp_path, retested, 2.5, chosen)
    assert evidence["image_auroc"] == 0.97 and source == "metrics.json: chosen fusion sweep_sum_wB0.3"
    with pytest.raises(RunError, match="dualstpm test"):  # another configuration's row is not this model's
        _decision_evidence(tmp_path, {**retested, "chosen_fusion": "levels_1_sum"}, 2.5, chosen)
    (tmp_path / "ablation").mkdir()
    (tmp_path / "ablation" / "summary.json").write_text(json.dumps(
        {"fused_chosen": {"config": "sweep_sum_wB0.3", "image_auroc": 0.95, "aupro": 0.8}}))
    evidence, source = _decision_evidence(tmp_path, tested, 2.5, chosen)
    assert evidence["image_auroc"] == 0.95 and "sweep_sum_wB0.3" in source


def test_registered_models_say_what_they_detect_on_which_data_and_how_to_load_them(texture_run: Path, params,
                                                                                     synthetic_root: Path):
    client = MlflowClient()
    name = model_name(synthetic_root, "synth_texture")
    version = register_run(texture_run, params, "synth_texture", store=entry_store(params)).version
    model = client.get_registered_model(name).description
    assert model.startswith(f"Finds defective **synth_texture** parts ({dataset_name(synthetic_root)} data)")
    assert f'mlflow.pyfunc.load_model("models:/{name}@champion")' in model
    assert f'mlflow models serve -m "models:/{name}@champion"' in model
    described = client.get_model_version(name, version).description
    assert f"test images of `{synthetic_root.resolve()}` (data hash `{data_hash(synthetic_root, 'synth_texture')}`)" \
        in described
    assert f"Figures in run `{RunRecord.read(texture_run).run_id}`" in described and "`plots/overlays.png`" in described
    assert f'load_model("models:/{name}/{version}")' in described
