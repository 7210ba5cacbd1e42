"""What is retried: only failures that may pass (a network or server that did not answer)."""

from __future__ import annotations

import socket
import urllib.error
from pathlib import Path

import pytest
from prefect.states import Completed, Failed

from dualstpm.data import fetch
from dualstpm.data.download import failed_for_a_while
from dualstpm.errors import ConfigError, DataError, NetworkError
from flows.tasks import _worth_retrying


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://example.invalid/a.tar.xz", code, "status", {}, None)


@pytest.mark.parametrize(("error", "transient"), [
    (_http_error(503), True), (_http_error(500), True), (_http_error(429), True), (_http_error(408), True),
    (_http_error(404), False), (_http_error(403), False),
    (urllib.error.URLError(ConnectionRefusedError()), True), (TimeoutError(), True), (ConnectionResetError(), True),
    (ValueError("unknown url type"), False), (OSError(28, "No space left on device"), False),
])
def test_which_network_failures_may_pass(error: BaseException, transient: bool) -> None:
    assert failed_for_a_while(error) is transient


def test_a_refused_connection_is_a_network_error_and_the_cli_exit_code_says_retry(tmp_path: Path) -> None:
    with pytest.raises(NetworkError, match="download of http://127.0.0.1:") as caught:
        fetch(f"http://127.0.0.1:{_closed_port()}/a.tar.xz", tmp_path / "a.tar.xz", "0" * 64)
    assert caught.value.exit_code == 75 and DataError.exit_code == 2


@pytest.mark.parametrize(("error", "retried"), [
    (NetworkError("download failed"), True),
    (DataError("defective test image x.png has no mask"), False),
    (ConfigError("bad key"), False),
    (ConnectionResetError(), True),
    (KeyError("a bug"), False),
])
def test_the_data_step_retries_only_what_may_pass(error: BaseException, retried: bool) -> None:
    assert _worth_retrying(None, None, Failed(data=error)) is retried
    assert _worth_retrying(None, None, Completed(data=1)) is False
