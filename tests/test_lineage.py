"""Lineage that cannot lie, against real MLflow stores (SQLite, and a server for the lock race).

- the model files are checked against the hash their MLflow run logged before anything
  reopens the run (test, ablate) or registers from it;
- registered models are named after the data root folder, and `promote` finds the one
  `register` made from anywhere;
- a run directory holds one evaluation;
- registrations and promotions crashed at every step leave nothing that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import dualstpm.registry as registry
from conftest import TINY_OVERRIDES
from dualstpm.config import load_params
from dualstpm.errors import RunError
from dualstpm.lineage import LINEAGE_FILE, MODEL_HASH_TAG, model_sha256
from dualstpm.registry import (
    CHALLENGER,
    CHAMPION,
    INCOMPLETE,
    LOCK_SUFFIX,
    REGISTRATION_TAG,
    model_name,
    promote,
    register_run,
    registered_name,
)
from dualstpm.stages import tracked_ablate, tracked_fit, tracked_test
from dualstpm.tracking import RunRecord


class Crash(BaseException):
    """A process killed at this point: no `except Exception` handler runs."""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A throwaway SQLite store of this module's own (so registered names do not mix with other modules')."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('lineage-store')}/mlflow.db"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri


@pytest.fixture(scope="module")
def my_data(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both synthetic categories in a data root of the user's own, `.../MyData`."""
    root = tmp_path_factory.mktemp("user") / "MyData"
    for category in ("synth_texture", "synth_object"):
        shutil.copytree(synthetic_root / category, root / category)
    return root


@pytest.fixture(scope="module")
def params():
    """data.source and data.root left at the embedded default (synthetic, data/synthetic):
    the data actually used is the --data-root each call gets."""
    return load_params(None, [*TINY_OVERRIDES, "tracking.retries=0"])


@pytest.fixture(scope="module")
def tested(store: str, params, my_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "synth_texture"
    tracked_fit(params, my_data, "synth_texture", run_dir)
    tracked_test(params, run_dir, my_data, "synth_texture")
    return run_dir


def copy_of(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- model files vs their run


def test_the_fit_records_its_run_and_the_model_hash(tested: Path, store: str):
    lineage = json.loads((tested / "model" / LINEAGE_FILE).read_text())
    record = RunRecord.read(tested)
    assert lineage == {"tracking_uri": store, "run_id": record.run_id}
    # by hand: sha256 over "<name>\0<sha256 of the file>\n" of the three files the fit writes
    lines = "".join(f"{name}\0{hashlib.sha256((tested / 'model' / name).read_bytes()).hexdigest()}\n"
                    for name in ("weights.safetensors", "params.yaml", "calibration.json"))
    expected = hashlib.sha256(lines.encode()).hexdigest()
    assert model_sha256(tested / "model") == expected
    assert MlflowClient().get_run(record.run_id).data.tags[MODEL_HASH_TAG] == expected


def test_a_restored_earlier_model_is_refused_by_test_ablate_and_register(tested: Path, params, my_data: Path,
                                                                          tmp_path: Path):
    """What DVC's run cache does when fit.epochs goes 2 -> 1 -> 2: the model files of the
    earlier fit come back while RUN/mlflow_run.json names the later fit's run."""
    run_dir = copy_of(tested, tmp_path / "run")
    first = RunRecord.read(run_dir).run_id
    earlier = copy_of(run_dir / "model", tmp_path / "earlier-model")
    one_epoch = params.model_copy(update={"fit": params.fit.model_copy(update={"epochs": 1})})
    tracked_fit(one_epoch, my_data, "synth_texture", run_dir, overwrite=True)
    tracked_test(one_epoch, run_dir, my_data, "synth_texture")
    second = RunRecord.read(run_dir).run_id
    assert second != first
    shutil.rmtree(run_dir / "model")
    shutil.copytree(earlier, run_dir / "model")  # restored with its lineage.json
    results = digest(run_dir)
    name = model_name(my_data, "synth_texture")
    versions = {str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'")}

    for attempt in (lambda: register_run(run_dir, params, "synth_texture"),
                    lambda: tracked_test(params, run_dir, my_data, "synth_texture"),
                    lambda: tracked_ablate(params, run_dir)):
        with pytest.raises(RunError) as refused:
            attempt()
        message = str(refused.value)
        assert f"not the model MLflow run {second} trained" in message
        assert f"trained in run {first}" in message
        assert "dvc repro --force --single-item fit@synth_texture" in message
    assert digest(run_dir) == results  # nothing written
    assert {str(v.version) for v in MlflowClient().search_model_versions(f"name = '{name}'")} == versions


def test_model_files_changed_after_the_fit_are_refused(tested: Path, params, tmp_path: Path):
    run_dir = copy_of(tested, tmp_path / "run")
    calibration = run_dir / "model" / "calibration.json"
    calibration.write_text(calibration.read_text() + "\n")  # any byte
    with pytest.raises(RunError, match="they changed after that fit"):
        register_run(run_dir, params, "synth_texture")


def test_a_run_whose_fit_lost_the_store_before_logging_the_hash_gets_it_later(tested: Path, params, my_data: Path,
                                                                               tmp_path: Path):
    run_dir = copy_of(tested, tmp_path / "run")
    run_id = RunRecord.read(run_dir).run_id
    client = MlflowClient()
    client.delete_tag(run_id, MODEL_HASH_TAG)  # lineage.json names the run, the tag never arrived
    tracked_test(params, run_dir, my_data, "synth_texture")
    assert client.get_run(run_id).data.tags[MODEL_HASH_TAG] == model_sha256(run_dir / "model")


# --------------------------------------------------------------------------- one evaluation per run


def test_retesting_on_another_category_or_test_set_is_refused(tested: Path, params, my_data: Path, tmp_path: Path):
    run_dir = copy_of(tested, tmp_path / "run")
    record = RunRecord.read(run_dir)
    client = MlflowClient()
    logged = client.get_run(record.run_id).data
    files = digest(run_dir)

    other_set = tmp_path / "Other" / "synth_texture"
    shutil.copytree(my_data / "synth_texture", other_set)
    next(iter(sorted((other_set / "test" / "good").iterdir()))).unlink()  # one test image fewer
    for root, category in ((my_data, "synth_object"), (other_set.parent, "synth_texture")):
        with pytest.raises(RunError, match="describe one evaluation") as refused:
            tracked_test(params, run_dir, root, category)
        assert f"cp -r {run_dir / 'model'} NEW/" in str(refused.value)
    assert digest(run_dir) == files  # metrics.json, plots, maps untouched
    after = client.get_run(record.run_id).data
    assert after.metrics == logged.metrics and after.tags["dualstpm.eval_category"] == "synth_texture"

    tracked_test(params, run_dir, my_data, "synth_texture")  # the same evaluation again is fine

    # the fix the message gives: the model in a run directory of its own
    new = tmp_path / "new"
    new.mkdir()
    shutil.copytree(run_dir / "model", new / "model")
    result = tracked_test(params, new, my_data, "synth_object")
    assert result["category"] == "synth_object"
    new_run = RunRecord.read(new).run_id
    assert new_run != record.run_id
    assert json.loads((new / "model" / LINEAGE_FILE).read_text())["run_id"] == new_run
    assert client.get_run(new_run).data.tags["dualstpm.eval_category"] == "synth_object"


# --------------------------------------------------------------------------- registration


@pytest.mark.parametrize("crash_at", ["set_registered_model_tag", "set_registered_model_alias", "set_model_version_tag"])
def test_an_interrupted_registration_is_marked_and_cleaned_up_by_the_next(
        crash_at: str, tested: Path, params, my_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run_dir = copy_of(tested, tmp_path / "run")
    client = MlflowClient()
    name = model_name(my_data, "synth_texture")
    assert name == "dualstpm-mydata-synth_texture"  # the data root's folder, though data.source says synthetic

    def crash(*args, **kwargs):
        raise Crash(crash_at)

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, crash_at, crash)
        with pytest.raises(Crash):
            register_run(run_dir, params, "synth_texture")
    run_id = RunRecord.read(run_dir).run_id
    mine = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id]
    interrupted = max(mine, key=lambda v: int(v.version))
    assert interrupted.tags[REGISTRATION_TAG] == INCOMPLETE  # visibly not complete
    with pytest.raises(RunError, match="registration was interrupted"):
        promote("synth_texture", params, version=interrupted.version, data_root=my_data)

    version = register_run(run_dir, params, "synth_texture")
    assert version.tags[REGISTRATION_TAG] == "complete" and version.aliases == [CHALLENGER]
    with pytest.raises(MlflowException):
        client.get_model_version(name, interrupted.version)  # deleted
    assert all(v.tags.get(REGISTRATION_TAG) != INCOMPLETE for v in client.search_model_versions(f"name = '{name}'"))


def test_promote_finds_the_model_register_made_from_anywhere(tested: Path, params, my_data: Path, tmp_path: Path,
                                                             store: str):
    run_dir = copy_of(tested, tmp_path / "run")
    version = register_run(run_dir, params, "synth_texture")
    client = MlflowClient()
    assert registered_name(client, "synth_texture") == version.name == "dualstpm-mydata-synth_texture"
    outside = tmp_path / "elsewhere"  # no params.yaml: built-in defaults say data.source=mvtec
    outside.mkdir()
    done = subprocess.run([sys.executable, "-m", "dualstpm", "promote", "--category", "synth_texture",
                           "--version", str(version.version)], cwd=outside, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"dualstpm-mydata-synth_texture version {version.version}" in done.stdout

    client.create_registered_model("dualstpm-otherdata-synth_texture", tags={"dualstpm.category": "synth_texture"})
    with pytest.raises(RunError, match="several datasets") as ambiguous:
        registered_name(client, "synth_texture")
    assert "dualstpm-mydata-synth_texture" in str(ambiguous.value) and "--data-root" in str(ambiguous.value)
    assert registered_name(client, "synth_texture", my_data) == "dualstpm-mydata-synth_texture"
    with pytest.raises(RunError, match="no registered model of category 'weld'"):
        registered_name(client, "weld")


# --------------------------------------------------------------------------- promotion


def versions_for_promotion(client: MlflowClient, name: str, source: Path) -> tuple[str, str]:
    """A champion (0.80) and a better challenger (0.90) on the same data, as `register` tags them."""
    client.create_registered_model(name, tags={"dualstpm.category": name})
    made = []
    for value in (0.80, 0.90):
        made.append(str(client.create_model_version(name, source=source.as_uri(), tags={
            "metric.image_auroc": repr(value), "dualstpm.data_hash": "d" * 32 + ".dir"}).version))
    client.set_registered_model_alias(name, CHAMPION, made[0])
    client.set_registered_model_alias(name, CHALLENGER, made[1])
    client.set_model_version_tag(name, made[0], "promotion.promoted", "True")
    return made[0], made[1]


PROMOTION_WRITES = ("set_registered_model_alias", "set_model_version_tag")


def watch_writes(patch: pytest.MonkeyPatch, calls: list[str], crash_at: int | None = None) -> None:
    """Record each alias/tag write of the registry client; crash the process at write `crash_at`."""
    for method in PROMOTION_WRITES:
        original = getattr(MlflowClient, method)

        def write(self, *args, _original=original, _method=method, **kwargs):
            calls.append(_method)
            if len(calls) == crash_at:
                raise Crash(f"write {crash_at}")
            return _original(self, *args, **kwargs)

        patch.setattr(MlflowClient, method, write)


def test_a_promotion_crashed_at_any_step_never_tags_a_version_promoted_that_is_not_champion(
        store: str, params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    client = MlflowClient()
    name = f"promotion-order-{uuid.uuid4().hex[:8]}"
    versions_for_promotion(client, name, tmp_path)
    calls: list[str] = []
    with monkeypatch.context() as patch:
        watch_writes(patch, calls)
        assert promote(name, params).promoted  # one whole promotion: how many writes it makes
    assert calls[0] == "set_registered_model_alias" and len(calls) > 5
    for crash_at in range(1, len(calls) + 1):
        name = f"promotion-order-{uuid.uuid4().hex[:8]}"
        _, challenger = versions_for_promotion(client, name, tmp_path)
        with monkeypatch.context() as patch:
            watch_writes(patch, [], crash_at)
            with pytest.raises(Crash):
                promote(name, params)
        champion = str(client.get_model_version_by_alias(name, CHAMPION).version)
        tags = client.get_model_version(name, challenger).tags
        if tags.get("promotion.promoted") == "True":  # what this promotion decided is true of the store
            assert champion == challenger, f"crash at write {crash_at}: tagged promoted, champion is {champion}"
        assert not client.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")  # the lock was released


def test_a_stale_lock_is_taken_over_by_exactly_one_contender(mlflow_server, monkeypatch: pytest.MonkeyPatch):
    """Three promotions find the lock of a crashed one, stale, at the same moment: one takes it
    over (a takeover model only one of them can create), the others wait their turn."""
    name = f"lock-race-{uuid.uuid4().hex[:8]}"
    lock = name + LOCK_SUFFIX
    MlflowClient(mlflow_server.uri).create_registered_model(lock, tags={"holder": "crashed", "token": "dead"})
    monkeypatch.setattr(registry, "LOCK_STALE_S", 1.0)
    time.sleep(1.5)
    contenders = 3
    all_saw_it_stale = threading.Barrier(contenders)

    class Contender(MlflowClient):
        """Waits until every contender has read the stale lock before acting on it."""

        first = True

        def get_registered_model(self, model_name):
            found = super().get_registered_model(model_name)
            if self.first and model_name == lock:
                self.first = False
                all_saw_it_stale.wait(timeout=120)
            return found

    guard, inside, entries, errors = threading.Lock(), [0], [], []

    def contend(index: int) -> None:
        try:
            with registry.promotion_lock(Contender(mlflow_server.uri), name, f"racer {index}"):
                with guard:
                    inside[0] += 1
                    entries.append(inside[0])
                time.sleep(0.3)
                with guard:
                    inside[0] -= 1
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(contenders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert entries == [1, 1, 1]  # each got in, never two at once
    client = MlflowClient(mlflow_server.uri)
    takeover = client.get_registered_model(f"{lock}.takeover-dead")  # taken over once, by one of them
    assert takeover.tags["holder"].startswith("racer ")
    assert lock not in [m.name for m in client.search_registered_models(f"name = '{lock}'")]  # released


def test_a_slow_holder_whose_lock_was_taken_over_leaves_it_to_the_taker(store: str, monkeypatch: pytest.MonkeyPatch):
    client = MlflowClient()
    name = f"lock-slow-{uuid.uuid4().hex[:8]}"
    lock = name + LOCK_SUFFIX
    monkeypatch.setattr(registry, "LOCK_STALE_S", 0.5)
    slow, taker = registry.promotion_lock(client, name, "slow"), registry.promotion_lock(client, name, "taker")
    slow.__enter__()
    time.sleep(1.0)  # the slow holder's lock is stale now
    taker.__enter__()  # takes it over
    slow.__exit__(None, None, None)  # the slow one ends: it must not free the taker's lock
    assert client.get_registered_model(lock).tags["holder"] == "slow"  # still held (through the takeover)
    taker.__exit__(None, None, None)
    assert not client.search_registered_models(f"name = '{lock}'")
