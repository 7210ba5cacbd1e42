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
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

import dualstpm.mlops.lock as lock_module
from dualstpm.config import load_params
from dualstpm.errors import RunError
from dualstpm.mlops.hashing import data_hash, model_sha256
from dualstpm.mlops.lineage import MODEL_HASH_TAG
from dualstpm.mlops.lock import LOCK_SUFFIX, promotion_lock
from dualstpm.mlops.names import CHALLENGER, CHAMPION, INCOMPLETE, REGISTRATION_TAG, model_name, registered_name
from dualstpm.mlops.promote import promote
from dualstpm.mlops.register import register_run
from dualstpm.mlops.runs import RunRecord
from dualstpm.mlops.stages import tracked_ablate, tracked_fit, tracked_test
from dualstpm.mlops.tracking import entry_store
from dualstpm.rundir import LINEAGE_FILE


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
    tracked_fit(params, my_data, "synth_texture", run_dir, store=entry_store(params))
    tracked_test(params, run_dir, my_data, "synth_texture", store=entry_store(params))
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


TEST_OUTPUTS = ("metrics.json", "auc_table.csv", "plots", "maps/test.npz", "maps/val.npz")  # dvc.yaml's test outs


def put_back(saved: Path, run_dir: Path, names: tuple[str, ...]) -> None:
    """What DVC's checkout does for a stage restored from its run cache: each output replaced by the cached one."""
    for name in names:
        target = run_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        (shutil.copytree if (saved / name).is_dir() else shutil.copyfile)(saved / name, target)


def test_a_model_dvc_restored_registers_against_the_run_that_trained_it(tested: Path, params, my_data: Path,
                                                                        tmp_path: Path):
    """What DVC's run cache does when fit.epochs goes 2 -> 1 -> 2: the earlier fit's model
    files (with their lineage.json) and its test's outputs come back, while RUN/mlflow_run.json
    still names the later fit's run. `register` registers against the earlier run, which
    trained those files; it refuses while no run describes the files on disk."""
    run_dir = copy_of(tested, tmp_path / "run")
    first = RunRecord.read(run_dir).run_id
    saved = tmp_path / "saved"
    saved.mkdir()
    put_back(run_dir, saved, ("model", *TEST_OUTPUTS[:3], "maps"))
    one_epoch = params.model_copy(update={"fit": params.fit.model_copy(update={"epochs": 1})})
    tracked_fit(one_epoch, my_data, "synth_texture", run_dir, overwrite=True, store=entry_store(one_epoch))
    tracked_test(one_epoch, run_dir, my_data, "synth_texture", store=entry_store(one_epoch))
    second = RunRecord.read(run_dir).run_id
    assert second != first
    client = MlflowClient()
    name = model_name(my_data, "synth_texture")
    versions = {str(v.version) for v in client.search_model_versions(f"name = '{name}'")}

    # the earlier files, changed by a byte: neither run trained them
    put_back(saved, run_dir, ("model",))
    calibration = run_dir / "model" / "calibration.json"
    calibration.write_text(calibration.read_text() + "\n")
    results = digest(run_dir)
    for attempt in (lambda: register_run(run_dir, params, "synth_texture", store=entry_store(params)),
                    lambda: tracked_test(params, run_dir, my_data, "synth_texture", store=entry_store(params)),
                    lambda: tracked_ablate(params, run_dir, store=entry_store(params))):
        with pytest.raises(RunError) as refused:
            attempt()
        message = str(refused.value)
        assert "no MLflow run in" in message and "describes the model files" in message
        assert f"run {second} (mlflow_run.json)" in message and f"run {first} (lineage.json)" in message
        assert "dvc repro --force --single-item fit@synth_texture" in message
    assert digest(run_dir) == results  # nothing written

    # the earlier model back, but the later model's test outputs: register and ablate would use another model's
    put_back(saved, run_dir, ("model",))
    results = digest(run_dir)
    for attempt in (lambda: register_run(run_dir, params, "synth_texture", store=entry_store(params)),
                    lambda: tracked_ablate(params, run_dir, store=entry_store(params))):
        with pytest.raises(RunError, match=f"is not the test MLflow run {first} logged"):
            attempt()
    assert digest(run_dir) == results and RunRecord.read(run_dir).run_id == second
    assert {str(v.version) for v in client.search_model_versions(f"name = '{name}'")} == versions

    # as DVC restores it: the earlier model and the earlier test's outputs
    put_back(saved, run_dir, TEST_OUTPUTS)
    version = register_run(run_dir, params, "synth_texture", store=entry_store(params))
    assert version.run_id == first
    assert version.tags[MODEL_HASH_TAG] == model_sha256(run_dir / "model") == client.get_run(first).data.tags[MODEL_HASH_TAG]
    assert version.tags["metric.image_auroc"] == repr(json.loads((saved / "metrics.json").read_text())["fused"]["image_auroc"])
    record = RunRecord.read(run_dir)  # from now on the record names the run that trained the files
    assert record.run_id == first and record.eval_data_hash == client.get_run(first).data.tags["dualstpm.eval_data_hash"]
    assert sorted(record.branch_run_ids) == ["recon", "stpm"]
    assert {client.get_run(r).data.tags["mlflow.parentRunId"] for r in record.branch_run_ids.values()} == {first}


def test_test_after_a_restored_model_logs_into_the_run_that_trained_it(tested: Path, params, my_data: Path,
                                                                       tmp_path: Path):
    """Only the fit restored (its test outputs gone): `dualstpm test` tests the restored model
    into its own run, after which it registers against that run."""
    run_dir = copy_of(tested, tmp_path / "run")
    record = RunRecord.read(run_dir)
    first = record.run_id
    client = MlflowClient()
    later = client.create_run(record.experiment_id, run_name="later fit").info.run_id
    client.set_tag(later, MODEL_HASH_TAG, "f" * 64)  # a later fit's run: another model's files
    RunRecord(**{**record.__dict__, "run_id": later}).write(run_dir)
    (run_dir / "metrics.json").unlink()
    tracked_test(params, run_dir, my_data, "synth_texture", store=entry_store(params))
    assert RunRecord.read(run_dir).run_id == first
    assert client.get_run(first).data.tags["dualstpm.metrics_sha256"] == \
        hashlib.sha256((run_dir / "metrics.json").read_bytes()).hexdigest()
    assert register_run(run_dir, params, "synth_texture", store=entry_store(params)).run_id == first


def test_model_files_changed_after_the_fit_are_refused(tested: Path, params, tmp_path: Path):
    run_dir = copy_of(tested, tmp_path / "run")
    calibration = run_dir / "model" / "calibration.json"
    calibration.write_text(calibration.read_text() + "\n")  # any byte
    with pytest.raises(RunError, match="They changed after their fit") as refused:
        register_run(run_dir, params, "synth_texture", store=entry_store(params))
    assert f"run {RunRecord.read(run_dir).run_id} (mlflow_run.json) logged" in str(refused.value)


def test_a_run_whose_fit_lost_the_store_before_logging_the_hash_gets_it_later(tested: Path, params, my_data: Path,
                                                                               tmp_path: Path):
    run_dir = copy_of(tested, tmp_path / "run")
    run_id = RunRecord.read(run_dir).run_id
    client = MlflowClient()
    client.delete_tag(run_id, MODEL_HASH_TAG)  # lineage.json names the run, the tag never arrived
    tracked_test(params, run_dir, my_data, "synth_texture", store=entry_store(params))
    assert client.get_run(run_id).data.tags[MODEL_HASH_TAG] == model_sha256(run_dir / "model")


# --------------------------------------------------------------------------- one evaluation per run


def test_retesting_on_another_category_is_refused(tested: Path, params, my_data: Path, tmp_path: Path):
    run_dir = copy_of(tested, tmp_path / "run")
    record = RunRecord.read(run_dir)
    client = MlflowClient()
    logged = client.get_run(record.run_id).data
    files = digest(run_dir)
    with pytest.raises(RunError, match="describe one category") as refused:
        tracked_test(params, run_dir, my_data, "synth_object", store=entry_store(params))
    assert f"cp -r {run_dir / 'model'} NEW/" in str(refused.value)
    assert digest(run_dir) == files  # metrics.json, plots, maps untouched
    after = client.get_run(record.run_id).data
    assert after.metrics == logged.metrics and after.tags["dualstpm.eval_category"] == "synth_texture"

    tracked_test(params, run_dir, my_data, "synth_texture", store=entry_store(params))  # the same evaluation again is fine

    # the fix the message gives: the model in a run directory of its own
    new = tmp_path / "new"
    new.mkdir()
    shutil.copytree(run_dir / "model", new / "model")
    result = tracked_test(params, new, my_data, "synth_object", store=entry_store(params))
    assert result["category"] == "synth_object"
    new_run = RunRecord.read(new).run_id
    assert new_run != record.run_id
    assert json.loads((new / "model" / LINEAGE_FILE).read_text())["run_id"] == new_run
    assert client.get_run(new_run).data.tags["dualstpm.eval_category"] == "synth_object"


def test_retesting_after_adding_an_image_names_it_and_keeps_a_new_evaluation_beside_the_first(
        tested: Path, params, my_data: Path, tmp_path: Path):
    run_dir = copy_of(tested, tmp_path / "run")
    record = RunRecord.read(run_dir)
    client = MlflowClient()
    logged = client.get_run(record.run_id).data
    earlier = json.loads((run_dir / "metrics.json").read_text())
    data = tmp_path / "MyData"  # the user's folder, one test image added since the test
    shutil.copytree(my_data / "synth_texture", data / "synth_texture")
    good = sorted((data / "synth_texture" / "test" / "good").iterdir())
    shutil.copyfile(good[0], good[0].with_name("zz_new.png"))
    files = digest(run_dir)

    with pytest.raises(RunError) as refused:
        tracked_test(params, run_dir, data, "synth_texture", store=entry_store(params))
    message = str(refused.value)
    assert "1 image added (test/good/zz_new.png)" in message
    assert "removed" not in message and "changed (" not in message and "cp -r" not in message
    assert f"--run {run_dir} --data-root {data} --category synth_texture --new-evaluation" in message
    assert digest(run_dir) == files

    new_hash = data_hash(data, "synth_texture")
    assert new_hash != record.eval_data_hash
    result = tracked_test(params, run_dir, data, "synth_texture", new_evaluation=True, store=entry_store(params))
    folder = run_dir / "evaluations" / new_hash.removesuffix(".dir")
    assert result["n_test_images"] == earlier["n_test_images"] + 1
    written = json.loads((folder / "metrics.json").read_text())
    assert written["n_test_images"] == result["n_test_images"] and written["category"] == "synth_texture"
    assert (folder / "auc_table.csv").is_file() and (folder / "plots" / "roc.png").is_file()
    assert (folder / "maps" / "test.npz").is_file()
    saved_list = json.loads((folder / "data_files.json").read_text())
    assert saved_list["data_hash"] == new_hash and "test/good/zz_new.png" in saved_list["files"]
    assert {k: v for k, v in digest(run_dir).items() if not k.startswith("evaluations/")} == files  # the first: as it was
    assert RunRecord.read(run_dir) == record
    assert client.get_run(record.run_id).data.metrics == logged.metrics

    evaluation = RunRecord.read(folder)  # a run of its own, a child of the model's run
    child = client.get_run(evaluation.run_id).data
    assert child.tags["mlflow.parentRunId"] == child.tags["dualstpm.evaluation_of"] == record.run_id
    assert child.tags["dualstpm.eval_data_hash"] == new_hash and child.metrics["n_test_images"] == result["n_test_images"]
    assert child.tags[MODEL_HASH_TAG] == model_sha256(run_dir / "model")

    tracked_test(params, run_dir, data, "synth_texture", store=entry_store(params))  # that data again: the same new evaluation, redone
    assert RunRecord.read(folder).run_id == evaluation.run_id and RunRecord.read(run_dir) == record
    tracked_test(params, run_dir, my_data, "synth_texture", store=entry_store(params))  # the first data again: the first evaluation
    assert json.loads((run_dir / "metrics.json").read_text())["n_test_images"] == earlier["n_test_images"]


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
            register_run(run_dir, params, "synth_texture", store=entry_store(params))
    run_id = RunRecord.read(run_dir).run_id
    mine = [v for v in client.search_model_versions(f"name = '{name}'") if v.run_id == run_id]
    interrupted = max(mine, key=lambda v: int(v.version))
    assert interrupted.tags[REGISTRATION_TAG] == INCOMPLETE  # visibly not complete
    with pytest.raises(RunError, match="registration was interrupted"):
        promote("synth_texture", params, version=interrupted.version, data_root=my_data, store=entry_store(params))

    version = register_run(run_dir, params, "synth_texture", store=entry_store(params))
    assert version.tags[REGISTRATION_TAG] == "complete" and version.aliases == [CHALLENGER]
    with pytest.raises(MlflowException):
        client.get_model_version(name, interrupted.version)  # deleted
    assert all(v.tags.get(REGISTRATION_TAG) != INCOMPLETE for v in client.search_model_versions(f"name = '{name}'"))


def test_promote_finds_the_model_register_made_from_anywhere(tested: Path, params, my_data: Path, tmp_path: Path,
                                                             store: str):
    run_dir = copy_of(tested, tmp_path / "run")
    version = register_run(run_dir, params, "synth_texture", store=entry_store(params))
    client = MlflowClient()
    assert registered_name(client, "synth_texture") == version.name == "dualstpm-mydata-synth_texture"
    outside = tmp_path / "elsewhere"  # no params.yaml: built-in defaults say data.source=mvtec
    outside.mkdir()
    done = subprocess.run([sys.executable, "-m", "dualstpm", "promote", "--category", "synth_texture",
                           "--version", str(version.version)], cwd=outside, capture_output=True, text=True, timeout=600)
    assert done.returncode == (3 if "not promoted" in done.stdout else 0), done.stderr  # 3: judged, not promoted
    assert f"dualstpm-mydata-synth_texture version {version.version}" in done.stdout

    client.create_registered_model("dualstpm-otherdata-synth_texture", tags={"dualstpm.category": "synth_texture"})
    with pytest.raises(RunError, match="several datasets") as ambiguous:
        registered_name(client, "synth_texture")
    assert "dualstpm-mydata-synth_texture" in str(ambiguous.value) and "--data-root" in str(ambiguous.value)
    assert registered_name(client, "synth_texture", my_data) == "dualstpm-mydata-synth_texture"
    with pytest.raises(RunError, match="no registered model of category 'weld'"):
        registered_name(client, "weld")


def test_register_from_another_folder_uses_the_store_the_run_records(tested: Path, store: str, tmp_path: Path):
    """No store named: `register --run RUN` elsewhere registers in the store RUN/mlflow_run.json
    records, and creates no mlflow.db where it runs; commands that only read a store never
    create one."""
    run_dir = copy_of(tested, tmp_path / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default: ./mlflow.db
    done = subprocess.run([sys.executable, "-m", "dualstpm", "register", "--run", str(run_dir)], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert not (elsewhere / "mlflow.db").exists() and not (elsewhere / "mlartifacts").exists()
    assert f"using the MLflow store {store}" in " ".join(done.stderr.split())
    name = model_name(RunRecord.read(run_dir).eval_data_root, "synth_texture")
    version = MlflowClient(store).get_model_version_by_alias(name, CHALLENGER)  # in the run's store
    assert f"{name} version {version.version}" in done.stdout
    assert version.run_id == RunRecord.read(run_dir).run_id
    assert version.tags["dualstpm.run_dir"] == str(run_dir.resolve())

    for command in (["register", "--run", str(run_dir)], ["promote", "--category", "synth_texture"]):
        named = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{elsewhere / 'other.db'}"}  # named, but not there
        refused = subprocess.run([sys.executable, "-m", "dualstpm", *command], cwd=elsewhere,
                                 env=named if command[0] == "register" else env, capture_output=True, text=True,
                                 timeout=600)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "there is no MLflow store at" in " ".join(refused.stderr.split())
        assert not list(elsewhere.iterdir())  # no store created


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
        assert promote(name, params, store=entry_store(params)).promoted  # one whole promotion: how many writes it makes
    assert calls[0] == "set_registered_model_alias" and len(calls) > 5
    for crash_at in range(1, len(calls) + 1):
        name = f"promotion-order-{uuid.uuid4().hex[:8]}"
        _, challenger = versions_for_promotion(client, name, tmp_path)
        with monkeypatch.context() as patch:
            watch_writes(patch, [], crash_at)
            with pytest.raises(Crash):
                promote(name, params, store=entry_store(params))
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
    monkeypatch.setattr(lock_module, "LOCK_STALE_S", 1.0)
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
            with promotion_lock(Contender(mlflow_server.uri), name, f"racer {index}"):
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
    monkeypatch.setattr(lock_module, "LOCK_STALE_S", 0.5)
    slow, taker = promotion_lock(client, name, "slow"), promotion_lock(client, name, "taker")
    slow.__enter__()
    time.sleep(1.0)  # the slow holder's lock is stale now
    taker.__enter__()  # takes it over
    slow.__exit__(None, None, None)  # the slow one ends: it must not free the taker's lock
    assert client.get_registered_model(lock).tags["holder"] == "slow"  # still held (through the takeover)
    taker.__exit__(None, None, None)
    assert not client.search_registered_models(f"name = '{lock}'")
