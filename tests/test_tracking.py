"""Where MLflow runs go and what identifies the data: URIs, dataset names, DVC data hashes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dualstpm.config import load_params
from dualstpm.errors import ConfigError
from dualstpm.mlops.hashing import data_hash
from dualstpm.mlops.runs import run_params
from dualstpm.mlops.tracking import artifact_location, dataset_name, resolve_store, tracking_uri
from dualstpm.project import params_for_data, project_dir


@pytest.fixture
def in_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_default_store_is_an_absolute_sqlite_file_in_the_project(in_project: Path):
    uri = tracking_uri(load_params(None))
    assert uri == f"sqlite:///{in_project.resolve()}/mlflow.db"
    assert uri.startswith("sqlite:////")
    assert artifact_location(uri, "dualstpm-synthetic") == (in_project.resolve() / "mlartifacts" / "dualstpm-synthetic").as_uri()
    assert artifact_location("http://127.0.0.1:5000", "x") is None  # a server picks its own


def test_environment_wins_and_relative_sqlite_becomes_absolute(in_project: Path, monkeypatch: pytest.MonkeyPatch):
    params = load_params(None, ["tracking.uri=sqlite:///stores/runs.db"])
    assert tracking_uri(params) == f"sqlite:///{in_project.resolve()}/stores/runs.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999/")
    assert tracking_uri(params) == "http://127.0.0.1:5999"


@pytest.mark.parametrize("uri", ["./mlruns", "file:///tmp/mlruns", "sqlite:///:memory:"])
def test_the_file_store_and_memory_are_refused(in_project: Path, uri: str):
    with pytest.raises(ConfigError, match="tracking.uri"):
        tracking_uri(load_params(None, [f"tracking.uri={uri}"]))


def test_a_dvc_temporary_experiment_logs_into_its_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert project_dir() == (tmp_path / "proj").resolve()
    assert tracking_uri(load_params(None)) == f"sqlite:///{(tmp_path / 'proj').resolve()}/mlflow.db"


def test_dataset_names_come_from_the_data_root_folder_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The dataset is the data root folder's own name: the same from any working directory,
    by relative or absolute path, through a symlink, whatever `data.source` says."""
    from dualstpm.mlops.names import model_name

    data = tmp_path / "shared" / "MyData_v2"
    data.mkdir(parents=True)
    (tmp_path / "project" / "sub").mkdir(parents=True)
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "current").symlink_to(data, target_is_directory=True)
    monkeypatch.chdir(tmp_path / "project")
    seen = {dataset_name("../shared/MyData_v2"), dataset_name(str(data) + "/"), dataset_name(tmp_path / "links" / "current")}
    monkeypatch.chdir(tmp_path / "project" / "sub")
    seen |= {dataset_name("../../shared/MyData_v2"), dataset_name("../../links/current")}
    assert seen == {"mydata-v2"}  # lower-cased, "_" made "-"
    assert model_name(Path("../../links/current"), "weld") == "dualstpm-mydata-v2-weld"
    assert dataset_name("data/synthetic") == dataset_name("/anywhere/synthetic") == "synthetic"
    with pytest.raises(ConfigError, match="no letter or digit"):
        dataset_name("/")


def test_a_new_store_is_announced_and_commands_that_only_read_one_never_create_it(
        in_project: Path, capsys: pytest.CaptureFixture):
    from dualstpm.errors import TrackingError
    from dualstpm.mlops.tracking import connect

    store = resolve_store(load_params(None, ["tracking.retries=0"]))
    with pytest.raises(TrackingError, match=f"there is no MLflow store at {in_project.resolve()}/mlflow.db"):
        connect(store, create=False)
    assert not (in_project / "mlflow.db").exists()
    connect(store)
    assert f"creating a new MLflow store at {in_project.resolve()}/mlflow.db" in " ".join(capsys.readouterr().err.split())
    assert (in_project / "mlflow.db").is_file()
    connect(store, create=False)  # it exists now: nothing to say
    assert "creating" not in capsys.readouterr().err


def test_a_command_on_a_run_uses_the_store_the_run_records(in_project: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture):
    from dualstpm.errors import TrackingError
    from dualstpm.mlops.lineage import run_store
    from dualstpm.mlops.runs import RunRecord

    run_dir = in_project / "run"
    run_dir.mkdir()
    theirs = in_project / "project" / "mlflow.db"
    theirs.parent.mkdir()
    theirs.touch()
    RunRecord(f"sqlite:///{theirs}", "1", "a" * 32, {}).write(run_dir)
    default = resolve_store(load_params(None))
    assert not default.named
    assert run_store(default, run_dir).uri == f"sqlite:///{theirs}"  # not ./mlflow.db
    assert f"using the MLflow store sqlite:///{theirs}" in " ".join(capsys.readouterr().err.split())
    named = resolve_store(load_params(None, ["tracking.uri=http://127.0.0.1:5999"]))
    assert run_store(named, run_dir) == named  # a store the user names wins
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    from_env = resolve_store(load_params(None))
    assert from_env.named and run_store(from_env, run_dir) == from_env
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    theirs.unlink()  # moved away: which store to use is the user's to say
    with pytest.raises(TrackingError, match="records the MLflow store .* which does not exist"):
        run_store(default, run_dir)
    RunRecord(f"sqlite:///{in_project.resolve()}/mlflow.db", "1", "a" * 32, {}).write(run_dir)
    assert run_store(default, run_dir) == default  # this folder's own store: `connect` creates it, and says so


def test_params_for_data_describes_the_data_actually_used(in_project: Path):
    synthetic = load_params(None, ["data.source=synthetic", f"data.root={in_project}"])
    assert params_for_data(synthetic, in_project) is synthetic
    moved = params_for_data(synthetic, in_project / "elsewhere")
    assert (moved.data.source, moved.data.root) == ("folder", str(in_project / "elsewhere"))


def test_data_hash_is_the_hash_dvc_gives_the_folder(synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The hash is computed from the files and equals the md5 a real `dvc add` records for the
    folder; a record that no longer describes the files (dvc.lock or a `.dvc` file during
    `dvc repro`, or after parts were added) is never used; one byte changed changes it."""
    project = tmp_path / "project"
    shutil.copytree(synthetic_root / "synth_texture", project / "data" / "synth_texture")
    monkeypatch.chdir(project)
    computed = data_hash(project / "data", "synth_texture")
    assert computed.endswith(".dir") and len(computed) == 36

    dvc = [str(Path(sys.executable).with_name("dvc"))]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=project, check=True, timeout=120)
    subprocess.run([*dvc, "add", "-q", "data/synth_texture"], cwd=project, check=True, timeout=120)
    recorded = yaml.safe_load((project / "data" / "synth_texture.dvc").read_text())["outs"][0]["md5"]
    assert computed == recorded

    # stale records of the category folder (the files are unchanged): the files' hash, not theirs
    dvc_file = project / "data" / "synth_texture.dvc"
    dvc_file.write_text(dvc_file.read_text().replace(recorded, "feedc0de.dir"))
    (project / "dvc.lock").write_text(yaml.safe_dump({
        "schema": "2.0",
        "stages": {"prepare": {"cmd": "x", "outs": [{"path": "data/synth_texture", "hash": "md5", "md5": "feedc0de.dir"}]}},
    }))
    assert data_hash(project / "data", "synth_texture") == computed

    image = next((project / "data" / "synth_texture" / "test" / "good").iterdir())
    image.write_bytes(image.read_bytes() + b"\0")
    assert data_hash(project / "data", "synth_texture") != computed  # other data, other hash
    assert data_hash(project / "data", "synth_texture") != recorded  # though dvc still records the old version


def test_a_store_that_answers_is_not_called_down(tmp_path: Path):
    """A missing run is the store's answer, not an outage: no advice to start or check the store."""
    from mlflow import MlflowClient

    from dualstpm.errors import TrackingError
    from dualstpm.mlops.tracking import tracking_errors

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(TrackingError) as info:
        with tracking_errors(uri, "looking up run 0"):
            MlflowClient(uri).get_run("0" * 32)
    assert "refused looking up run 0" in str(info.value) and "writable MLflow database" not in str(info.value)


def test_a_run_logs_the_params_it_used(tmp_path: Path):
    folder = load_params(None, ["data.source=folder", "data.root=elsewhere", "data.categories=[a, b]"])
    logged = run_params(folder, "b", tmp_path)
    assert logged["data.root"] == str(tmp_path.resolve()) and logged["data.category"] == "b"
    assert logged["data.source"] == "folder" and logged["fit.epochs"] == str(folder.fit.epochs)
    assert not [key for key in logged if key.startswith("data.mvtec.") or key == "data.categories"]
    mvtec = load_params(None, ["data.source=mvtec"])
    assert run_params(mvtec, "bottle", tmp_path)["data.mvtec.url"] == mvtec.data.mvtec.url  # what it downloads


def test_a_store_note_inside_a_category_carries_its_prefix_and_reaches_its_sink():
    from dualstpm.progress import labelled
    from dualstpm.mlops.tracking import announce

    lines: list[str] = []
    with labelled("bottle", sink=lines.append):
        announce("using the MLflow store sqlite:////p/[x]/mlflow.db")
    assert lines == ["bottle: note: using the MLflow store sqlite:////p/[x]/mlflow.db"]  # brackets kept: no markup


HTTP_SETTINGS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def test_connecting_changes_no_process_wide_state(in_project: Path):
    """The threads of one process (a flow's tasks) may each open a store: opening one sets
    neither MLflow's global tracking URI nor any environment variable."""
    import os

    import mlflow

    from dualstpm.mlops.tracking import connect

    environment, global_uri = dict(os.environ), mlflow.get_tracking_uri()
    store = resolve_store(load_params(None, [f"tracking.uri=sqlite:///{in_project / 'a.db'}", "tracking.retries=0"]))
    assert connect(store).tracking_uri == f"sqlite:///{in_project.resolve()}/a.db"
    assert dict(os.environ) == environment
    assert mlflow.get_tracking_uri() == global_uri


def test_an_entry_point_resolves_the_store_once_and_sets_mlflows_http_settings(
        in_project: Path, monkeypatch: pytest.MonkeyPatch):
    import os

    from dualstpm.mlops.tracking import Store, entry_store

    for key in HTTP_SETTINGS:
        monkeypatch.setenv(key, "unset")  # restored after the test
    store = entry_store(load_params(None, ["tracking.retries=2", "tracking.timeout_s=7"]))
    assert store == Store(f"sqlite:///{in_project.resolve()}/mlflow.db", named=False, retries=2, timeout_s=7)
    assert [os.environ[key] for key in HTTP_SETTINGS] == ["2", "1", "7"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")  # changed afterwards: the value passed down stays
    assert store.uri == f"sqlite:///{in_project.resolve()}/mlflow.db"
