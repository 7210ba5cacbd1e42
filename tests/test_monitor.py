"""`dualstpm monitor`: drift (KS), alarm rate (binomial) and override rate, on hand-made and real scores.

The statistics on hand-made score sets are checked against values worked out by hand
(the KS statistic of two shifted grids, binomial tails summed with math.comb). The real
model's test only asserts a direction: a brightness/contrast-shifted batch of the same
images drifts further from the validation scores than the batch as it was.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from dualstpm.errors import DataError
from dualstpm.mlops.monitoring import run_monitor
from dualstpm.monitor import (
    BATCH_FILE,
    MONITOR_DIR,
    Bounds,
    alarm_test,
    batch_summary,
    describe_inputs,
    drift_test,
    input_drift_test,
    override_rate,
    read_batch,
    validation_scores,
    write_batch_summary,
)
from dualstpm.review.log import ReviewLog, new_entry
from dualstpm.rundir import review_dir

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed by hand."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


# --- the statistics on hand-made scores ---------------------------------------------------------

def test_identical_score_sets_do_not_drift() -> None:
    scores = np.linspace(0.1, 0.9, 50)
    result = drift_test(scores, scores.copy())
    assert result == {"ks_statistic": 0.0, "ks_pvalue": 1.0, "drift": False}


def test_a_shifted_score_set_drifts_by_the_gap_between_its_cdfs() -> None:
    reference = np.arange(100.0)  # 0 .. 99 (integers: exact ties, no rounding)
    shifted = reference + 50  # 50 .. 149: at x = 49 the reference CDF is 0.5, the batch's 0
    result = drift_test(shifted, reference)
    assert result["ks_statistic"] == pytest.approx(0.5)
    assert result["ks_pvalue"] < 0.01 and result["drift"] is True


def test_drift_needs_both_a_small_p_value_and_a_large_statistic() -> None:
    reference = np.arange(2000.0)
    nudged = reference + 200  # gap 200/2000 = 0.1: p is tiny on 2000 scores, but the shift is below the 0.2 bound
    result = drift_test(nudged, reference)
    assert result["ks_statistic"] == pytest.approx(0.1) and result["ks_pvalue"] < 1e-6
    assert result["drift"] is False
    assert drift_test(nudged, reference, Bounds(ks_statistic=0.05))["drift"] is True


def test_five_alarms_in_a_hundred_are_too_many_for_a_one_percent_target() -> None:
    result = alarm_test(5, 100, 0.01)
    assert result["alarm_rate"] == 0.05
    assert result["alarm_pvalue"] == pytest.approx(binomial_tail(5, 100, 0.01), rel=1e-9)  # about 0.0034
    assert result["too_many_alarms"] is True


def test_one_alarm_in_a_hundred_is_what_a_one_percent_target_expects() -> None:
    result = alarm_test(1, 100, 0.01)
    assert result["alarm_pvalue"] == pytest.approx(1 - 0.99**100, rel=1e-9)  # about 0.63
    assert result["too_many_alarms"] is False


def test_an_expected_defect_rate_raises_the_expected_alarm_rate() -> None:
    result = alarm_test(5, 100, 0.01, Bounds(expected_defect_rate=0.04))
    assert result["alarm_expected"] == pytest.approx(0.01 + 0.04 * 0.99)
    assert result["alarm_pvalue"] == pytest.approx(binomial_tail(5, 100, 0.01 + 0.04 * 0.99), rel=1e-9)
    assert result["too_many_alarms"] is False


def test_bad_bounds_are_refused_by_name() -> None:

    with pytest.raises(DataError, match="ks_p=0"):
        Bounds(ks_p=0)


# --- a batch's summary and the inspectors' overrides -------------------------------------------

def test_batch_summary_counts_the_scored_rows(tmp_path: Path) -> None:
    (tmp_path / "predictions.csv").write_text(
        "path,score,label,threshold,error\n"
        "a.png,0.1,good,0.5,\n"
        "b.png,0.2,good,0.5,\n"
        "c.png,,,0.5,cannot read image\n"
        "d.png,0.7,defective,0.5,\n"
        "e.png,0.4,good,0.5,\n")

    path = write_batch_summary(tmp_path, model={"run": "r"})

    assert path == tmp_path / MONITOR_DIR / BATCH_FILE
    summary = json.loads(path.read_text())
    assert (summary["n_rows"], summary["n_scored"], summary["alarm_rate"], summary["threshold"]) == (5, 4, 0.25, 0.5)
    assert summary["quantiles"]["0.5"] == pytest.approx(0.3)  # the median of 0.1, 0.2, 0.4, 0.7
    assert (summary["min"], summary["max"], summary["mean"]) == (0.1, 0.7, pytest.approx(0.35))
    assert summary["model"] == {"run": "r"}


def test_an_empty_score_is_unscored_and_a_text_score_is_refused_by_row(tmp_path: Path) -> None:
    (tmp_path / "predictions.csv").write_text("path,score\na.png,0.5\nb.png,\nc.png,high\n")
    with pytest.raises(DataError, match=r"predictions.csv, data row 3, column score: 'high' is not a number"):
        read_batch(tmp_path)
    (tmp_path / "predictions.csv").write_text("path,score\na.png,0.5\nb.png,\n")
    scores = read_batch(tmp_path)["score"].tolist()
    assert scores[0] == 0.5 and math.isnan(scores[1])  # b: an image predict could not score


def test_an_empty_batch_has_null_figures_not_nan() -> None:
    summary = batch_summary(pd.DataFrame({"score": [float("nan")], "label": [""]}))
    assert summary["n_scored"] == 0 and summary["quantiles"]["0.5"] is None and summary["alarm_rate"] is None


def verdict(predictions: Path, image: Path, said: str, model_label: str) -> None:
    ReviewLog(review_dir(predictions)).append(new_entry(
        reviewer="ana", image=image, listed_path=image.name, verdict=said, note="", mask=None, score=0.5,
        normalized_score=0.5, threshold=0.4, model_label=model_label, overlay="x_overlay.png",
        predictions=predictions / "predictions.csv", model={"run": "r"}))


def test_override_rate_counts_current_verdicts_that_differ_from_the_model(tmp_path: Path) -> None:
    batch = tmp_path / "batch"
    images = []
    for k in range(4):
        images.append(tmp_path / f"{k}.png")
        Image.fromarray(np.full((8, 8), k, np.uint8)).save(images[-1])
    verdict(batch, images[0], "defective", "defective")  # superseded below
    verdict(batch, images[0], "good", "defective")  # a false alarm overruled
    verdict(batch, images[1], "defective", "good")  # a miss
    verdict(batch, images[2], "good", "good")
    verdict(batch, images[3], "defective", "defective")

    assert override_rate(batch) == {"n_reviewed": 4, "override_rate": 0.5, "false_alarms_overruled": 1, "misses": 1}
    assert override_rate(tmp_path / "unreviewed")["override_rate"] is None


# --- a real tiny model --------------------------------------------------------------------------

# --- the input drift test on hand-made images and statistics ----------------------------------------

def test_image_statistics_are_the_luma_mean_and_rms_contrast() -> None:
    from dualstpm.data.input_stats import image_statistics

    half = np.zeros((4, 6, 3))
    half[:, 3:] = 1.0  # half black, half white: luma 0 and 1 -> mean 0.5, std 0.5
    assert image_statistics(half) == pytest.approx({"brightness": 0.5, "contrast": 0.5})
    red = np.zeros((5, 5, 3))
    red[..., 0] = 1.0  # pure red: luma 0.299 everywhere (BT.601), no contrast
    found = image_statistics(red)
    assert found["brightness"] == pytest.approx(0.299) and found["contrast"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="HxWx3"):
        image_statistics(np.zeros((5, 5)))


def test_the_input_reference_keeps_sorted_values_or_their_quantiles(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from dualstpm.data import input_stats

    paths = []
    for i, level in enumerate((153, 51, 102, 204, 0)):  # 0.6, 0.2, 0.4, 0.8, 0.0 of full scale
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((3, 3), level, np.uint8)).save(path)
        paths.append(path)
    found = input_stats.input_reference(paths[:3], 10**6)
    assert found["images"] == 3 and found["brightness"] == [0.2, 0.4, 0.6] and found["contrast"] == [0.0, 0.0, 0.0]
    monkeypatch.setattr(input_stats, "MAX_REFERENCE", 3)  # 5 images, 3 kept: the minimum, the median, the maximum
    found = input_stats.input_reference(paths, 10**6)
    assert found["images"] == 5 and found["brightness"] == [0.0, 0.4, 0.8]


def test_a_batch_of_brighter_images_drifts_and_one_from_the_reference_does_not() -> None:
    reference = {"brightness": np.round(np.linspace(0.40, 0.59, 20), 2), "contrast": np.full(20, 0.1)}
    bright = pd.DataFrame({"score": np.ones(10), "brightness": np.full(10, 0.8), "contrast": np.full(10, 0.1)})
    result = input_drift_test(bright, reference)
    # every batch value above every reference value: the CDFs part by 1; the contrast is the reference's (KS 0)
    assert result["drift"] is True and result["p_bound"] == pytest.approx(0.005)
    assert result["statistics"]["brightness"]["ks_statistic"] == 1.0
    assert result["statistics"]["brightness"]["ks_pvalue"] < 1e-6  # exact: 2 / C(30, 10) = 6.6e-8
    assert result["statistics"]["contrast"]["ks_statistic"] == 0.0 and result["statistics"]["contrast"]["drift"] is False
    assert "brightness KS 1" in describe_inputs(result) and describe_inputs(result).endswith(": input drift")
    # every other reference value (0.40, 0.42, ..., 0.58): the CDFs part by at most 1/10 - 1/20 = 0.05
    same = pd.DataFrame({"score": np.ones(10), "brightness": reference["brightness"][::2], "contrast": np.full(10, 0.1)})
    result = input_drift_test(same, reference)
    assert result["drift"] is False and result["statistics"]["brightness"]["ks_statistic"] == pytest.approx(0.05)


def test_the_input_drift_test_says_why_it_did_not_run() -> None:
    table = pd.DataFrame({"score": [1.0, 2.0]})
    assert input_drift_test(table, {"brightness": np.ones(3)}) == {
        "drift": False, "not_run": "the table has no input statistics (columns brightness, contrast: written by "
                                   "`dualstpm predict`)"}
    assert "fitted before dualstpm kept one" in input_drift_test(table, {})["not_run"]


def test_input_drift_alone_crosses_a_bound() -> None:
    from dualstpm.monitor import BatchReport

    calm = {"drift": False}
    report = BatchReport("b", "/b", 3, {}, calm, {"too_many_alarms": False}, {}, [], {"drift": True, "statistics": {}})
    assert report.crossed is True
    assert BatchReport("b", "/b", 3, {}, calm, {"too_many_alarms": False}, {}, [], calm).crossed is False


@pytest.fixture(scope="module")
def tested_run(trained_run: Path, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synth_texture model, tested (its validation maps stored in maps/val.npz)."""
    from dualstpm.evaluation import test_run

    run = tmp_path_factory.mktemp("monitored") / "synth_texture"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("exports"))
    test_run(run, synthetic_root, "synth_texture", device="cpu")
    return run


def shifted_copy(images: list[Path], folder: Path) -> list[Path]:
    """The images darker and flatter: contrast x0.5, then brightness x0.6 (a lighting change)."""
    folder.mkdir(parents=True)
    out = []
    for path in images:
        picture = ImageEnhance.Brightness(ImageEnhance.Contrast(Image.open(path).convert("RGB")).enhance(0.5)).enhance(0.6)
        picture.save(folder / path.name)
        out.append(folder / path.name)
    return out


def test_a_shifted_batch_drifts_further_than_the_same_images_as_they_were(tested_run: Path, synthetic_root: Path,
                                                                          tmp_path: Path) -> None:
    from dualstpm.detector import Detector
    from dualstpm.monitor import monitor_batches
    from dualstpm.predict import predict

    good = sorted((synthetic_root / "synth_texture" / "test" / "good").iterdir())
    detector = Detector.load(tested_run, device="cpu")
    predict(detector, good, tmp_path / "normal")
    predict(detector, shifted_copy(good, tmp_path / "shifted_images"), tmp_path / "shifted")
    assert (tmp_path / "normal" / MONITOR_DIR / BATCH_FILE).is_file()  # predict logs every batch

    result = monitor_batches(validation_scores(tested_run), [tmp_path / "normal", tmp_path / "shifted"])

    normal, shifted = result.batches
    assert shifted.drift["ks_statistic"] > normal.drift["ks_statistic"]
    # the input statistics against the training images': the darker, flatter batch drifts
    found = {b.name: b.inputs["statistics"]["brightness"] for b in (normal, shifted)}
    assert shifted.inputs["drift"] is True and found["shifted"]["ks_statistic"] > found["normal"]["ks_statistic"]
    assert found["shifted"]["batch_median"] < found["normal"]["batch_median"]
    assert (normal.n_scored, shifted.n_scored) == (len(good), len(good))


def test_validation_scores_are_the_stored_maps_scored_as_predict_scores(tested_run: Path) -> None:
    """The reference is in the units of predict's scores: the validation images scored by
    predict land where their stored maps say (float16 maps: a relative 1e-2 at most)."""
    from dualstpm.detector import Detector
    from dualstpm.maps import MapSet
    from dualstpm.predict import predict

    reference = validation_scores(tested_run)
    paths = [Path(p) for p in MapSet.load(tested_run / "maps" / "val.npz").paths]
    table = predict(Detector.load(tested_run, device="cpu"), paths, tested_run.parent / "val_batch")
    np.testing.assert_allclose(np.sort(table["score"].to_numpy(float)), np.sort(reference.scores), rtol=1e-2)


def write_scores(folder: Path, scores: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"path": [f"{i}.png" for i in range(len(scores))], "score": scores}).to_csv(
        folder / "predictions.csv", index=False)
    return folder


def monitor_command(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    return subprocess.run([sys.executable, "-m", "dualstpm", "monitor", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two `dualstpm monitor` processes, each loading torch and the model
def test_the_command_exits_3_only_when_a_bound_is_crossed(tested_run: Path, tmp_path: Path) -> None:
    reference = validation_scores(tested_run)
    # the fixture's calibration: 2 of its 4 validation images, so the threshold promises 1/3
    assert len(reference.scores) == 4 and reference.promised_false_alarm_rate == pytest.approx(1 / 3)
    same = write_scores(tmp_path / "same", reference.scores)  # KS 0; at most 4 alarms of 4: p >= (1/3)^4 > 0.01
    hot = write_scores(tmp_path / "hot", np.full(20, 10 * reference.threshold))  # 20 alarms of 20: p = (1/3)^20

    calm = monitor_command("--run", str(tested_run), str(same), "--out", str(tmp_path / "r1"), "--no-mlflow", cwd=tmp_path)
    alarm = monitor_command("--run", str(tested_run), str(same), str(hot), "--out", str(tmp_path / "r2"), "--no-mlflow",
                            cwd=tmp_path)

    assert calm.returncode == 0, calm.stdout + calm.stderr
    assert alarm.returncode == 3, alarm.stdout + alarm.stderr
    report = json.loads((tmp_path / "r2" / "monitor.json").read_text())
    same_batch, hot_batch = report["batches"]
    assert same_batch["drift"]["ks_statistic"] == 0.0 and same_batch["crossed"] is False
    assert hot_batch["alarms"]["alarm_pvalue"] == pytest.approx((1 / 3) ** 20, rel=1e-6)
    assert hot_batch["crossed"] is True and report["exit_code"] == 3
    for name in ("report.html", "scores.png", "rates.png"):
        assert (tmp_path / "r2" / name).stat().st_size > 0
    assert "ALARM" in (tmp_path / "r2" / "report.html").read_text()


@pytest.mark.slow  # MLflow's SQLite store is created and migrated: about 15 s
def test_the_figures_go_to_mlflow(tested_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from dualstpm.config import load_params
    from dualstpm.mlops.tracking import entry_store

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    MlflowClient(uri).search_experiments()  # the model's store (created here)
    run = tmp_path / "run"  # a model whose lineage records that store
    shutil.copytree(tested_run, run)
    (run / "model" / "lineage.json").write_text(json.dumps({"tracking_uri": uri, "run_id": "0" * 32}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "elsewhere"  # monitor runs in another folder, naming no store
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    reference = validation_scores(run)
    batch = write_scores(tmp_path / "batch", reference.scores)

    result, report, run_id = run_monitor(run, [batch], tmp_path / "report", store=entry_store(load_params(None, [])))

    assert not (elsewhere / "mlflow.db").exists()  # no empty store where it ran
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.metrics["ks_statistic"] == 0.0 and run.data.metrics["n_scored"] == 4
    assert run.data.tags["dualstpm.category"] == "synth_texture"
    logged = {a.path for a in client.list_artifacts(run_id, "monitor")}
    assert {"monitor/report.html", "monitor/scores.png", "monitor/rates.png", "monitor/monitor.json"} <= logged


@pytest.mark.slow  # a temporary Prefect server: about 20 s to start
def test_the_flow_emits_a_visible_event_when_a_bound_is_crossed(tested_run: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.events.worker import EventsWorker
    from prefect.testing.utilities import prefect_test_harness

    from flows.monitor import EVENT, monitor, resource_id

    reference = validation_scores(tested_run)
    hot = write_scores(tmp_path / "hot", np.full(20, 10 * reference.threshold))
    with prefect_test_harness(server_startup_timeout=None):  # None: the env's 120 s, as tests/test_flows.py
        summary = monitor(str(tested_run), [str(hot)], str(tmp_path / "report"), None,
                          use_mlflow=False)
        EventsWorker.drain_all()
        assert summary["crossed"] is True and summary["event_id"] is not None and summary["retrain"] is None
        found = []
        with get_client(sync_client=True) as client:
            for _ in range(30):  # the server stores events a moment after it receives them
                page = client.read_events(EventFilter(event=EventNameFilter(name=[EVENT])), limit=50)  # the server allows 50
                found = [e for e in page.events if str(e.id) == summary["event_id"]]
                if found:
                    break
                time.sleep(1)
    [event] = found
    assert event.resource.id == resource_id("synth_texture")
    assert event.payload["crossed"][0]["too_many_alarms"] is True
    assert event.payload["crossed"][0]["batch"] == str(hot.resolve())
