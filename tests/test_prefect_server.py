"""Scheduled retraining against a real `prefect server` on 127.0.0.1.

The server and `python -m flows.serve` run as processes of their own, stopped by PID at
the end. One test checks that the `retrain` deployment appears with the cron and time
zone of the params file; the other (slow) triggers a run and waits until it completes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from conftest import TINY_OVERRIDES
from mlflow import MlflowClient
from mlflow_fixtures import free_port
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings

from dualstpm.config import apply_overrides, load_params
from dualstpm.mlops.names import CHAMPION, model_name
from flows.serve import DEPLOYMENT

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT_S = 180
RUN_TIMEOUT_S = 480
CRON, TIMEZONE = "17 4 * * 2", "Europe/Berlin"  # distinctive: it can only come from the params file


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group the process leads (its own session), SIGKILL if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def start(command: list[str], log: Path, env: dict[str, str], cwd: Path = PROJECT_ROOT) -> subprocess.Popen:
    with log.open("ab") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True)


def wait_for(check, timeout_s: float, what: str, process: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        result = check()
        if result:
            return result
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`prefect server start` on a free port with its own home and database; yields the API URL."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    server = start([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host", "127.0.0.1",
                    "--port", str(port)], log, env)

    def healthy() -> bool:
        try:
            return requests.get(f"{url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(healthy, STARTUP_TIMEOUT_S, "prefect server start", server, log)
        yield url
    finally:
        stop(server)


@pytest.fixture(scope="module")
def served(prefect_server: str, tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Iterator[dict]:
    """`python -m flows.serve` against the server, with tiny params and a distinctive schedule."""
    folder = tmp_path_factory.mktemp("served")
    params_path = folder / "params.yaml"
    params_path.write_text(yaml.safe_dump(apply_overrides({}, [
        *TINY_OVERRIDES, "data.source=folder", f"data.root={synthetic_root}", "data.categories=[synth_texture]",
        "ablation.branch_weight_step=0.5", "ablation.panel_images=0", "tracking.promotion_floor=0",
        f"prefect.retrain_cron={CRON}", f"prefect.retrain_timezone={TIMEZONE}",
    ]), sort_keys=False))
    mlflow_uri = f"sqlite:///{folder}/mlflow.db"
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "MLFLOW_TRACKING_URI": mlflow_uri}
    log = folder / "serve.log"
    process = start([sys.executable, "-m", "flows.serve", "--params", str(params_path), "--out", str(folder / "out"),
                     "--no-dvc"], log, env)
    try:
        with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
            def deployment():
                try:
                    return client.read_deployment_by_name(f"dualstpm-retrain/{DEPLOYMENT}")
                except ObjectNotFound:
                    return None

            yield {"client": client, "deployment": wait_for(deployment, STARTUP_TIMEOUT_S, "the served deployment", process, log),
                   "process": process, "log": log, "params": params_path, "out": folder / "out", "mlflow_uri": mlflow_uri}
    finally:
        stop(process)


def test_served_retrain_has_the_cron_of_params_yaml(served: dict) -> None:
    deployment = served["deployment"]
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (CRON, TIMEZONE, True)
    assert deployment.parameters["params_file"] == str(served["params"])
    assert deployment.global_concurrency_limit.limit == 1  # one retraining at a time


@pytest.mark.slow
def test_a_triggered_retrain_run_completes_and_registers_a_champion(served: dict) -> None:
    client, log = served["client"], served["log"]
    flow_run = run_deployment(served["deployment"].id, timeout=0)  # now, not at 04:17 next Tuesday
    final = wait_for(lambda: (run := client.read_flow_run(flow_run.id)).state.is_final() and run,
                     RUN_TIMEOUT_S, "the triggered retrain run", served["process"], log)
    assert final.state.is_completed(), f"{final.state}\n{log.read_text()[-3000:]}"
    run_dir = served["out"] / "runs" / "synth_texture"
    assert (run_dir / "model" / "weights.safetensors").is_file() and (run_dir / "metrics.json").is_file()
    name = model_name(load_params(served["params"]).data.root, "synth_texture")
    assert str(MlflowClient(served["mlflow_uri"]).get_model_version_by_alias(name, CHAMPION).version) == "1"
