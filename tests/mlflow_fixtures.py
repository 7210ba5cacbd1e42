"""A real MLflow tracking server for the tests (a pytest plugin, loaded by conftest.py).

`mlflow server` with an SQLite backend and an artifact folder in a temp dir, on
127.0.0.1 at a free port, started once per session, healthy before the first test uses
it, stopped by PID at the end. `MlflowServer` can also be started by a test that needs a
server it may kill (a server that goes away mid-run).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

STARTUP_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(process: subprocess.Popen, url: str, timeout_s: float, what: str, log: Callable[[], str],
                  poll_s: float = 0.5) -> None:
    """Wait until `url` answers 2xx while `process` (the server) runs. Raises RuntimeError
    when the server exits first, TimeoutError when it is not up after `timeout_s`; both
    carry `log()` (the server's output)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log()}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not up after {timeout_s} s:\n{log()}")


@dataclass
class MlflowServer:
    """One `mlflow server` process; its store lives in `root` (so a restart keeps it)."""

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(sys.executable).with_name("mlflow")), "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"),
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        log = (self.root / "server.log").open("ab")
        # Its own session: the uvicorn worker it spawns can be stopped with it.
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        try:
            wait_for_http(self.process, f"{self.uri}/health", STARTUP_TIMEOUT_S, "mlflow server", self.log_tail)
        except TimeoutError:
            self.stop()
            raise
        return self

    def kill(self) -> None:
        """A crash: SIGKILL to the server and its worker at once, no graceful shutdown."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        """SIGTERM to the server's PID, then to what is left of its process group."""
        if self.process is None:
            return
        pid = self.process.pid
        if self.process.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        try:
            os.killpg(pid, signal.SIGKILL)  # the group is the server's own (start_new_session)
        except ProcessLookupError:
            pass
        self.process = None
        # The port is closed once the worker is gone; wait so a restart can bind it again.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)

    def log_tail(self, lines: int = 30) -> str:
        path = self.root / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The session's tracking server and registry."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tracking_env(mlflow_server: MlflowServer) -> Iterator[str]:
    """MLFLOW_TRACKING_URI pointing at the session server for one test module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
        yield mlflow_server.uri
