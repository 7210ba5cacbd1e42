"""fit / test / predict end to end on synthetic data with the offline package teachers."""

import csv
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_OVERRIDES, strict_json
from safetensors.torch import load_file

from dualstpm.config import load_params
from dualstpm.detector import Detector
from dualstpm.errors import TrainingError
from dualstpm.evaluation import test_run
from dualstpm.predict import predict
from dualstpm.rundir import CHECKPOINT_FILE
from dualstpm.training import fit

HEADLINE = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")


def test_model_directory_holds_weights_params_calibration_only(trained_run: Path):
    model_dir = trained_run / "model"
    assert sorted(p.name for p in model_dir.iterdir()) == ["calibration.json", "params.yaml", "weights.safetensors"]
    calibration = json.loads((model_dir / "calibration.json").read_text())
    assert set(calibration["thresholds"]) == {"fused", "stpm", "recon"}
    assert len(calibration["map_stats"]["mean"]) == 2 and len(calibration["map_stats"]["mean"][0]) == 3
    assert 1 <= min(calibration["selected_epochs"].values())
    assert any(k.startswith("s2.") for k in load_file(model_dir / "weights.safetensors"))


def test_checkpoint_loads_with_weights_only(trained_run: Path):
    checkpoint = torch.load(trained_run / CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["epoch"] == 2 and len(checkpoint["history"]) == 2


def test_test_writes_metrics_json(trained_run: Path, synthetic_root: Path):
    result = test_run(trained_run, synthetic_root, "synth_texture")
    on_disk = strict_json((trained_run / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    # every JSON file of the run parses strictly; this model has no discriminative stage: null, no `disc` row
    written = {path.relative_to(trained_run).as_posix(): strict_json(path.read_text())
               for path in trained_run.rglob("*.json")}
    assert {"metrics.json", "model/calibration.json"} <= set(written)
    assert written["model/calibration.json"]["discriminator"] is None and "disc" not in on_disk
    for view in ("fused", "stpm", "recon"):
        assert set(HEADLINE) <= set(on_disk[view])
        assert set(on_disk[view]["per_defect"]) == {"scratch", "hole", "stain"}
        assert 0.0 <= on_disk[view]["image_auroc"] <= 1.0
    # A correct model separates the synthetic defects better than chance even after 2 tiny epochs.
    assert on_disk["fused"]["pixel_auroc"] > 0.7


def test_same_seed_same_metrics(trained_run: Path, synthetic_root: Path, tiny_params, tmp_path: Path):
    again = tmp_path / "again"
    fit(tiny_params, synthetic_root, "synth_texture", again)
    first = test_run(trained_run, synthetic_root, "synth_texture")
    second = test_run(again, synthetic_root, "synth_texture")
    assert first == second
    a, b = load_file(trained_run / "model/weights.safetensors"), load_file(again / "model/weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_ends_where_an_uninterrupted_fit_ends(trained_run: Path, synthetic_root: Path, tmp_path: Path):
    one_epoch = load_params(None, TINY_OVERRIDES + ["fit.epochs=1"])
    two_epochs = load_params(None, TINY_OVERRIDES)
    run = tmp_path / "interrupted"
    fit(one_epoch, synthetic_root, "synth_texture", run)
    with pytest.raises(TrainingError, match="--resume"):
        fit(two_epochs, synthetic_root, "synth_texture", run)
    fit(two_epochs, synthetic_root, "synth_texture", run, resume=True)
    a, b = load_file(trained_run / "model/weights.safetensors"), load_file(run / "model/weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, fragment", [
    (["fit.lr=0.1"], "fit.lr: 0.4 in the checkpoint, 0.1 now"),
    (["seed=1"], "seed: 0 in the checkpoint, 1 now"),
    (["model.attention=none"], "model.attention: 'spatial' in the checkpoint, 'none' now"),
    (["fit.loss_scale=2.0"], "fit.loss_scale: 1.0 in the checkpoint, 2.0 now"),
    (["fit.select=map_mean"], "fit.select: 'score_mean' in the checkpoint, 'map_mean' now"),
    (["model.decoder_width=quarter"], "model.decoder_width: 'full' in the checkpoint, 'quarter' now"),
    (["model.gate_form=method"], "model.gate_form: 'residual' in the checkpoint, 'method' now"),
    (["fit.schedule=cosine"], "fit.schedule: 'constant' in the checkpoint, 'cosine' now"),
    (["calibration.split=0.25"], "calibration.split: 0.5 in the checkpoint, 0.25 now"),  # other selection images
    (["fit.epochs=1"], "it holds 2 epochs but fit.epochs=1"),  # params would say 1 epoch, history 2
])
def test_resume_with_other_training_params_is_refused(overrides, fragment, trained_run: Path, synthetic_root: Path,
                                                      tmp_path: Path):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    with pytest.raises(TrainingError) as info:
        fit(load_params(None, TINY_OVERRIDES + overrides), synthetic_root, "synth_texture", run, resume=True)
    assert fragment in str(info.value) and "--overwrite" in str(info.value)


def test_resume_on_other_data_is_refused(trained_run: Path, synthetic_root: Path, tmp_path: Path):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    params = load_params(None, TINY_OVERRIDES)
    with pytest.raises(TrainingError, match="data.category: 'synth_texture' in the checkpoint, 'synth_object' now"):
        fit(params, synthetic_root, "synth_object", run, resume=True)
    changed = tmp_path / "changed"
    shutil.copytree(synthetic_root / "synth_texture", changed / "synth_texture")
    first = sorted((changed / "synth_texture" / "train" / "good").iterdir())[0]
    first.write_bytes(first.read_bytes() + b"\0")  # same names, one file one byte longer
    with pytest.raises(TrainingError) as info:
        fit(params, changed, "synth_texture", run, resume=True)
    assert "data.train.files_md5" in str(info.value) or "data.validation.files_md5" in str(info.value)
    assert "data.category" not in str(info.value)


def test_resume_ignores_what_does_not_shape_training(trained_run: Path, synthetic_root: Path, tmp_path: Path):
    """The same files in another folder, and edits of prefect.*, tracking.*, ablation.*, data.*,
    the final fusion, fit.device/cache and the discriminative stage: the checkpoint continues
    (here: no epoch left to train; the stage is trained after them)."""
    run, moved = tmp_path / "copy", tmp_path / "moved"
    shutil.copytree(trained_run, run)
    shutil.copytree(synthetic_root / "synth_texture", moved / "synth_texture")
    edits = ["prefect.max_workers=9", "tracking.retries=1", "ablation.workers=2", "data.categories=[other]",
             "data.source=folder", "fusion.sigma=1", "fit.cache=false",
             "fit.discriminator=true", "disc.epochs=1"]  # the discriminative stage runs after the epochs
    result = fit(load_params(None, TINY_OVERRIDES + edits), moved, "synth_texture", run, resume=True)
    assert [row["epoch"] for row in result.history] == [1, 2]
    assert load_params(run / "model" / "params.yaml").prefect.max_workers == 9
    assert (run / "model" / "discriminator.safetensors").is_file() and result.disc_seconds > 0


def test_resume_and_overwrite_together_are_refused(trained_run: Path, synthetic_root: Path, tmp_path: Path):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    with pytest.raises(TrainingError, match="--resume and --overwrite contradict"):
        fit(load_params(None, TINY_OVERRIDES), synthetic_root, "synth_texture", run, resume=True, overwrite=True)


def test_nan_loss_is_a_clear_error_and_keeps_no_model(synthetic_root: Path, tmp_path: Path):
    exploding = load_params(None, TINY_OVERRIDES + ["fit.lr=1e30", "fit.epochs=3"])
    with pytest.raises(TrainingError, match="fit.lr"):
        fit(exploding, synthetic_root, "synth_texture", tmp_path / "nan")
    assert not (tmp_path / "nan" / "model").exists()


def test_predict_writes_overlays_and_csv(trained_run: Path, synthetic_root: Path, tmp_path: Path):
    detector = Detector.load(trained_run)
    folder = synthetic_root / "synth_texture" / "test" / "hole"
    table = predict(detector, [folder], tmp_path / "pred")
    csv = pd.read_csv(tmp_path / "pred" / "predictions.csv")
    assert len(csv) == len(list(folder.iterdir())) == len(table)
    assert set(csv["label"]) <= {"good", "defective"}
    assert all((tmp_path / "pred" / name).is_file() for name in csv["overlay"])
    everything = predict(detector, [folder], tmp_path / "low", threshold=-1.0)
    assert (everything["label"] == "defective").all()
    nothing = predict(detector, [folder], tmp_path / "high", threshold=1e9)
    assert (nothing["label"] == "good").all()
    torch.testing.assert_close(torch.tensor(table["score"].values), torch.tensor(everything["score"].values))


def test_predictions_csv_leaves_values_that_do_not_exist_empty(trained_run: Path, synthetic_root: Path, tmp_path: Path):
    """No discriminative stage: `disc_score` is an empty cell in every row; an unreadable file
    has no score or label: empty cells too. Never the text `nan`, which only pandas reads back."""
    folder = tmp_path / "images"
    folder.mkdir()
    for image in sorted((synthetic_root / "synth_texture" / "test" / "hole").iterdir())[:2]:
        shutil.copy(image, folder / image.name)
    (folder / "broken.png").write_text("not a picture")
    predict(Detector.load(trained_run), [folder], tmp_path / "pred")
    with open(tmp_path / "pred" / "predictions.csv", newline="") as handle:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    assert sorted(rows) == ["000.png", "001.png", "broken.png"]
    assert [rows[name]["disc_score"] for name in sorted(rows)] == ["", "", ""]
    assert [rows["broken.png"][key] for key in ("score", "label", "stpm_score", "overlay")] == ["", "", "", ""]
    assert all(rows[name]["score"] not in ("", "nan") for name in ("000.png", "001.png"))
    # read strictly (only an empty cell is missing): the numeric columns are still numbers
    table = pd.read_csv(tmp_path / "pred" / "predictions.csv", keep_default_na=False, na_values=[""])
    assert table["disc_score"].dtype == float and table["disc_score"].isna().all()
    assert table["score"].dtype == float and table["score"].isna().tolist() == [False, False, True]


def test_a_good_only_test_set_says_why_metrics_are_undefined(trained_run: Path, synthetic_root: Path, tmp_path: Path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "synth_texture", root / "synth_texture")
    for folder in (root / "synth_texture" / "test").iterdir():
        if folder.name != "good":
            shutil.rmtree(folder)
    result = test_run(trained_run, root, "synth_texture")
    assert strict_json((trained_run / "metrics.json").read_text()) == json.loads(json.dumps(result))  # nulls, not NaN
    note = result["note"]
    assert "no defective images" in note and "no ground_truth folder" not in note
    unflagged = note.split("threshold of ")[1].split(", so")[0].split(", ") if "threshold of " in note else []
    for view in ("fused", "stpm", "recon"):
        m = result[view]
        assert m["image_auroc"] is None and m["pixel_auroc"] is None and m["aupro"] is None and m["recall"] is None
        assert m["precision"] in (None, 0.0)  # every flagged part is a false alarm; nothing flagged: undefined
        assert (m["precision"] is None) == (view in unflagged)


def test_category_without_ground_truth_is_image_level_only(trained_run: Path, synthetic_root: Path, tmp_path: Path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "synth_texture", root / "synth_texture", ignore=shutil.ignore_patterns("ground_truth"))
    result = test_run(trained_run, root, "synth_texture")
    assert result["image_level_only"] is True and "pixel metrics are null" in result["note"]
    for view in ("fused", "stpm", "recon"):
        assert result[view]["pixel_auroc"] is None and result[view]["aupro"] is None
        assert result[view]["image_auroc"] is not None


def test_a_fit_interrupted_while_logging_then_resumed_logs_every_epoch_to_every_run(
        synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Ctrl-C lands after epoch 1's checkpoint, while its metrics go to MLflow (parent and stpm
    logged, recon not): after --resume, the parent and both branch runs hold epochs 1 and 2, once."""
    from mlflow import MlflowClient

    from dualstpm.mlops.runs import CategoryRun, RunRecord
    from dualstpm.mlops.stages import tracked_fit
    from dualstpm.mlops.tracking import entry_store
    from dualstpm.training import FitInterrupted

    log = CategoryRun.log

    def ctrl_c_before_recon_epoch_1(self, run_id, doing, *args, **kwargs):
        if doing == "logging epoch 1 of recon":
            raise KeyboardInterrupt
        return log(self, run_id, doing, *args, **kwargs)

    params, run = load_params(None, TINY_OVERRIDES), tmp_path / "run"  # 2 epochs
    monkeypatch.setattr(CategoryRun, "log", ctrl_c_before_recon_epoch_1)
    with pytest.raises(FitInterrupted) as stop:
        tracked_fit(params, synthetic_root, "synth_texture", run, store=entry_store(params))
    assert (stop.value.epochs_done, stop.value.epochs) == (1, 2)
    monkeypatch.undo()
    tracked_fit(params, synthetic_root, "synth_texture", run, resume=True, store=entry_store(params))
    record = RunRecord.read(run)
    client = MlflowClient(record.tracking_uri)
    for run_id, key in [(record.run_id, "loss_recon"), (record.run_id, "val_score_stpm"),
                        (record.branch_run_ids["stpm"], "loss"), (record.branch_run_ids["recon"], "val_score")]:
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2], key


def test_the_model_records_the_data_it_was_trained_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from dualstpm.project import resolve_data_root
    from dualstpm.training import data_trained_on

    project = tmp_path / "project"
    run = project / "out" / "runs" / "synth_texture"
    run.mkdir(parents=True)
    monkeypatch.chdir(project)
    params = load_params(None, [])  # data.source synthetic, data.root data/synthetic, two categories
    # inside the project: from the run directory, so every clone writes the same file
    same = data_trained_on(params, Path("data/synthetic"), "synth_texture", run).data
    assert (same.source, same.root, same.categories) == ("synthetic", "../../../data/synthetic", ["synth_texture"])
    assert resolve_data_root(same.root, run) == project / "data" / "synthetic"
    monkeypatch.chdir(tmp_path)  # read back from anywhere
    assert resolve_data_root(same.root, run) == project / "data" / "synthetic"
    monkeypatch.chdir(project)
    mine = data_trained_on(params, Path("mine"), "part", run).data  # a user's --data-root in the project
    assert (mine.source, mine.root, mine.categories) == ("folder", "../../../mine", ["part"])
    # outside the project: absolute
    outside = data_trained_on(params, tmp_path / "elsewhere", "part", run).data
    assert (outside.source, outside.root) == ("folder", str(tmp_path / "elsewhere"))
    assert resolve_data_root(outside.root, run) == tmp_path / "elsewhere"
    assert data_trained_on(params, Path("mine"), "part", run).model == params.model


def test_stop_signals_interrupt_only_inside_the_block_and_never_over_a_callers_handler():
    import os
    import signal
    import threading
    import time

    from dualstpm.training import Terminated, stop_signals

    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("this test process already handles SIGTERM")
    with pytest.raises(Terminated), stop_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(500):  # the handler runs between two bytecodes of the main thread
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # restored

    def own(signum, frame):  # a caller's own handler stays in place
        pass

    signal.signal(signal.SIGTERM, own)
    try:
        with stop_signals():
            assert signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    seen = []  # a fit in a worker thread (Prefect's task runner) cannot install one: nothing changes

    def in_thread():
        with stop_signals():
            seen.append(signal.getsignal(signal.SIGTERM))

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join()
    assert seen == [signal.SIG_DFL]


def test_a_ctrl_c_whose_exception_a_library_swallowed_is_raised_again_by_the_stop_request():
    import os
    import signal
    import time

    from dualstpm.training import StopRequest, stop_signals

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("this test process lacks Python's Ctrl-C handler (a handler of its own, or SIGINT ignored as in a background job)")
    with stop_signals() as request:
        try:  # a library that catches BaseException and carries on
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(500):
                time.sleep(0.01)
        except KeyboardInterrupt:
            pass
        assert request.signal_number == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            request.check()  # what the epoch loop calls after every epoch
        request.signal_number = None
        with pytest.raises(KeyboardInterrupt), request.deferred():  # a tracking write is never cut mid-way
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(50):
                time.sleep(0.01)
            finished = True  # the block ran to its end: the signal was only recorded
        assert finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    StopRequest().check()  # no signal: nothing raised
