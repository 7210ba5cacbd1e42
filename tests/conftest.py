"""Shared fixtures: offline-safe environment, the shared real datasets, synthetic data."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"

# Everything the tests start must work without a network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Every `dualstpm fit`/`test` logs to MLflow: in tests, to a throwaway SQLite store, never
# the repository's mlflow.db nor a store the developer's shell points at.
_MLFLOW_DIR = tempfile.mkdtemp(prefix="dualstpm-tests-mlflow-")
atexit.register(shutil.rmtree, _MLFLOW_DIR, ignore_errors=True)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_MLFLOW_DIR}/mlflow.db"
os.environ["MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK"] = "true"
# Prefect: a throwaway home (database, temporary server), never a developer's server, no
# analytics, and time for the temporary server to start on a busy 2-core machine.
_PREFECT_HOME = tempfile.mkdtemp(prefix="dualstpm-tests-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"

pytest_plugins = ["mlflow_fixtures"]  # a real `mlflow server` for the tracking and registry tests


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real datasets next to the project; skip when they are not there."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATA} (they sit beside the project root)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data root with two small synthetic categories: `synth_texture` and `synth_object`."""
    from dualstpm.data.synthetic import make_synthetic_category

    root = tmp_path_factory.mktemp("synthetic")
    make_synthetic_category(root, "synth_texture", kind="texture", seed=0, image_size=64,
                            n_train=20, n_test_good=6, n_per_defect=3)
    make_synthetic_category(root, "synth_object", kind="object", seed=1, image_size=64,
                            n_train=20, n_test_good=6, n_per_defect=3)
    return root


TINY_OVERRIDES = [
    "image_size=64",
    "fit.epochs=2",
    "fit.recipe=fixed",  # the tests' quick budget, whatever the default recipe becomes (a tmp root is not the demo)
    "fit.batch_size=8",
    "fit.device=cpu",
    "model.t1.name=tf_efficientnet_lite0",
    "model.t1.weights=package",
    "model.t2.name=tf_efficientnet_lite2",
    "model.t2.weights=package",
]


@pytest.fixture(scope="session")
def tiny_params():
    """Offline params small enough for a fit in seconds on two CPU cores."""
    from dualstpm.config import load_params

    return load_params(None, TINY_OVERRIDES)


def fit_tiny(tmp_path_factory: pytest.TempPathFactory, root: Path, category: str, name: str, *overrides: str) -> Path:
    """A run directory `name` fitted on `category` of `root` with TINY_OVERRIDES plus `overrides`."""
    from dualstpm.config import load_params
    from dualstpm.training import fit

    run_dir = tmp_path_factory.mktemp("runs") / name
    fit(load_params(None, [*TINY_OVERRIDES, *overrides]), root, category, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path, tiny_params) -> Path:
    """A run directory fitted on `synth_texture` (shared by tests that only read it)."""
    from dualstpm.training import fit

    run_dir = tmp_path_factory.mktemp("runs") / "synth_texture"
    fit(tiny_params, synthetic_root, "synth_texture", run_dir)
    return run_dir


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON: a strict parser (JavaScript's JSON.parse, Go, Java) refuses it")


def strict_json(text: str):
    """Parse `text` as a strict JSON parser does: NaN, Infinity and -Infinity are refused
    (ValueError), as JavaScript's ``JSON.parse`` refuses them; Python's default accepts them."""
    import json

    return json.loads(text, parse_constant=_refuse_constant)
