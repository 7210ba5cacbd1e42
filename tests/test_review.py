"""The inspector's review page: the verdict log, the review order, bad input, and a real browser.

The log and order tests are fast and use hand-built files with hand-derived expectations.
The browser test (slow) trains a tiny model, scores real images with it, starts
`dualstpm review` as a real subprocess on 127.0.0.1 and drives the OS's Chromium with
Playwright; it is skipped, with the reason, where /usr/bin/chromium or Playwright is absent.
"""

from __future__ import annotations

import base64
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
from PIL import Image

from conftest import PROJECT_ROOT
from dualstpm.errors import ConfigError, DataError, RunError
from dualstpm.mlops.scored_by import parse_model_spec
from dualstpm.review.app import ReviewSession, create_app, listening_socket
from dualstpm.review.log import (
    LOG_FILE,
    MASK_DIR,
    ReviewLog,
    ReviewLogError,
    VerdictError,
    _locked,
    new_entry,
    save_mask,
)
from dualstpm.review.parts import load_predictions, review_order
from mlflow_fixtures import free_port, wait_for_http

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODEL = {"run": "/runs/x", "model_sha256": "0" * 64, "mlflow_run_id": None}


def png_bytes(width: int, height: int, value: int = 0, box: tuple[int, int, int, int] | None = None) -> bytes:
    """A gray PNG of `width` x `height` px filled with `value`, with an optional white box (x0, y0, x1, y1)."""
    pixels = np.full((height, width), value, dtype=np.uint8)
    if box is not None:
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def entry(folder: Path, image: Path, verdict: str = "good", note: str = "", reviewer: str = "alice") -> dict:
    """A verdict line for `image` (which must exist), as the page writes them."""
    return new_entry(reviewer=reviewer, image=image, listed_path=image.name, verdict=verdict, note=note, mask=None,
                     score=1.5, normalized_score=0.75, threshold=1.0, model_label="defective",
                     overlay=f"{image.stem}_overlay.png", predictions=folder / "predictions.csv", model=MODEL)


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    """Three real PNG images of 64x48 px."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for k in range(3):
        path = folder / f"part{k}.png"
        path.write_bytes(png_bytes(64, 48, value=40 * k))
        paths.append(path)
    return paths


# --- the log -------------------------------------------------------------------------------------


def test_a_verdict_is_on_disk_when_append_returns_and_a_later_one_supersedes_it(tmp_path: Path, images):
    log = ReviewLog(tmp_path / "review")
    first = log.append(entry(tmp_path, images[0], "good"))
    log.append(entry(tmp_path, images[1], "good"))
    second = log.append(entry(tmp_path, images[0], "defective", note="crack at the rim"))

    lines = (tmp_path / "review" / LOG_FILE).read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == 4  # three complete lines, nothing else
    reread = ReviewLog(tmp_path / "review").refresh()  # a fresh reader: what a restarted server sees
    assert [e["id"] for e in reread.entries] == [first["id"], reread.entries[1]["id"], second["id"]]
    current = reread.current()
    assert current[str(images[0])]["verdict"] == "defective"
    assert current[str(images[0])]["note"] == "crack at the rim"
    assert current[str(images[1])]["verdict"] == "good"
    assert reread.history() == {str(images[0]): 2, str(images[1]): 1}  # the superseded verdict is kept


def test_each_line_carries_who_when_which_model_and_the_figures(tmp_path: Path, images):
    line = ReviewLog(tmp_path / "review").append(entry(tmp_path, images[2], "defective", reviewer="bob"))
    stored = json.loads((tmp_path / "review" / LOG_FILE).read_text())
    assert stored == line
    assert stored["reviewer"] == "bob" and stored["verdict"] == "defective" and stored["model"] == MODEL
    assert stored["image"] == str(images[2]) and stored["time"].endswith("+00:00")
    assert (stored["score"], stored["normalized_score"], stored["threshold"], stored["model_label"]) == (
        1.5, 0.75, 1.0, "defective")
    import hashlib

    assert stored["image_sha256"] == hashlib.sha256(images[2].read_bytes()).hexdigest()


@pytest.mark.parametrize(("bad_line", "said"), [
    (b'{"schema": 1, "id": "x", "time": "t", "reviewer": "a", "image": "/p.png", "verdict": "good"', "not valid JSON"),
    (b'{"schema": 1, "id": "x", "time": "t", "reviewer": "a", "image": "/p.png", "verdict": "maybe"}',
     "verdict 'maybe' is neither good nor defective"),
    (b'{"schema": 1, "id": "x", "time": "t", "image": "/p.png", "verdict": "good"}', "keys reviewer are missing"),
    (b'["good"]', "a JSON list, not an object"),
])
def test_a_hand_edited_line_is_named_and_the_file_is_left_as_it_is(tmp_path: Path, images, bad_line: bytes, said: str):
    log = ReviewLog(tmp_path / "review")
    log.append(entry(tmp_path, images[0]))
    path = tmp_path / "review" / LOG_FILE
    good_line = path.read_bytes()
    edited = good_line + b"\n" + bad_line + b"\n" + good_line  # line 2 blank, line 3 the bad one, line 4 fine
    path.write_bytes(edited)

    with pytest.raises(ReviewLogError) as caught:
        ReviewLog(tmp_path / "review").refresh()
    assert f"{path}, line 3: " in str(caught.value) and said in str(caught.value)
    assert "fix that line by hand or delete it" in str(caught.value)
    with pytest.raises(ReviewLogError, match="line 3"):  # the running server's reader refuses to append
        log.append(entry(tmp_path, images[1]))
    assert path.read_bytes() == edited  # never truncated, nothing appended
    assert len(log.entries) == 1  # nothing of the refused read was half-applied


def test_a_line_cut_off_by_a_crash_is_named_as_such(tmp_path: Path, images):
    ReviewLog(tmp_path / "review").append(entry(tmp_path, images[0]))
    path = tmp_path / "review" / LOG_FILE
    torn = path.read_bytes() + b'{"schema": 1, "id": "ab'
    path.write_bytes(torn)
    with pytest.raises(ReviewLogError, match=r"line 2: it is not valid JSON .*no newline at its end"):
        ReviewLog(tmp_path / "review").refresh()
    assert path.read_bytes() == torn


def test_a_valid_last_line_without_newline_is_kept_and_the_next_append_starts_a_new_line(tmp_path: Path, images):
    path = tmp_path / "review" / LOG_FILE
    ReviewLog(tmp_path / "review").append(entry(tmp_path, images[0]))
    path.write_bytes(path.read_bytes().rstrip(b"\n"))  # an editor that drops the final newline
    log = ReviewLog(tmp_path / "review").refresh()
    log.append(entry(tmp_path, images[1], "defective"))
    assert [json.loads(line)["image"] for line in path.read_text().splitlines()] == [str(images[0]), str(images[1])]
    assert len(ReviewLog(tmp_path / "review").refresh().entries) == 2


def test_a_verdict_for_a_file_that_no_longer_exists_is_refused_with_its_path(tmp_path: Path, images):
    log = ReviewLog(tmp_path / "review")
    log.append(entry(tmp_path, images[0]))
    before = log.path.read_bytes()
    images[1].unlink()
    with pytest.raises(VerdictError, match=f"{images[1]} no longer exists: the verdict was not recorded"):
        entry(tmp_path, images[1])
    assert log.path.read_bytes() == before


def _append_many(folder: str, image: str, worker: int, count: int) -> None:
    """One process of the concurrency test: `count` verdicts with notes of very different lengths."""
    log = ReviewLog(Path(folder))
    for k in range(count):
        line = entry(Path(folder), Path(image), note=f"{worker}:{k}:" + "x" * (k % 5) * 40_000)
        log.append(line)


def test_processes_appending_at_once_lose_and_interleave_nothing(tmp_path: Path, images):
    workers, count = 4, 25
    context = multiprocessing.get_context("fork")  # no lock is held here; fork starts in milliseconds
    processes = [context.Process(target=_append_many, args=(str(tmp_path / "review"), str(images[0]), w, count))
                 for w in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    lines = (tmp_path / "review" / LOG_FILE).read_bytes().split(b"\n")
    assert lines.pop() == b""
    notes = [json.loads(line)["note"] for line in lines]  # every line whole JSON: nothing interleaved
    seen = sorted((int(w), int(k)) for w, k, _ in (note.split(":", 2) for note in notes))
    assert seen == [(w, k) for w in range(workers) for k in range(count)]  # nothing lost, nothing twice


def test_threads_of_one_server_sharing_the_log_neither_lose_nor_double_a_verdict(tmp_path: Path, images):
    import threading

    log = ReviewLog(tmp_path / "review")  # the server's, shared by its request threads
    other = ReviewLog(tmp_path / "review")  # another server's on the same folder
    appended = threading.Event()

    def give(worker: int) -> None:  # verdicts: half through this server, half through the other
        for k in range(20):
            (log if k % 2 else other).append(entry(tmp_path, images[0], note=f"{worker}:{k}"))
        appended.set()

    errors: list[Exception] = []

    def look() -> None:  # page requests meanwhile, each reading what the other server appended
        try:
            while not appended.is_set():
                log.refresh()
        except ReviewLogError as exc:  # e.g. two threads consuming the same bytes: "the log shrank"
            errors.append(exc)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: races show at once
    try:
        threads = [threading.Thread(target=give, args=(w,)) for w in range(2)]
        threads += [threading.Thread(target=look) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(switch)
    assert errors == []
    in_memory = sorted(e["note"] for e in log.refresh().entries)
    assert in_memory == sorted(f"{w}:{k}" for w in range(2) for k in range(20))  # each once
    assert in_memory == sorted(e["note"] for e in ReviewLog(tmp_path / "review").refresh().entries)


def test_an_append_waits_for_the_lock_another_holder_has(tmp_path: Path, images):
    log = ReviewLog(tmp_path / "review")
    log.append(entry(tmp_path, images[0]))
    # spawn, not fork: a forked child would share the held lock's open file description, and
    # with it the lock, so it would never be released while the child waits for it
    context = multiprocessing.get_context("spawn")
    with _locked(log.path, exclusive=True):  # as another server does while it appends
        writer = context.Process(target=_append_many, args=(str(tmp_path / "review"), str(images[1]), 0, 1))
        writer.start()
        time.sleep(3)  # ample time for the other process to start and reach the lock
        assert writer.is_alive() and len(log.path.read_text().splitlines()) == 1
    writer.join(timeout=60)
    assert writer.exitcode == 0 and len(log.path.read_text().splitlines()) == 2


# --- masks ---------------------------------------------------------------------------------------


def test_a_mask_of_the_image_size_is_stored_as_0_and_255(tmp_path: Path, images):
    name = save_mask(tmp_path / "review", "abc", png_bytes(64, 48, box=(10, 5, 20, 15)), images[0])
    assert name == f"{MASK_DIR}/abc.png"
    stored = np.asarray(Image.open(tmp_path / "review" / name))
    assert stored.shape == (48, 64) and stored.dtype == np.uint8
    assert set(np.unique(stored)) == {0, 255} and int((stored == 255).sum()) == 10 * 10


@pytest.mark.parametrize(("data", "said"), [
    (png_bytes(32, 32, box=(0, 0, 4, 4)), "the mask is 32x32 px but the image {image} is 64x48 px"),
    (png_bytes(48, 64, box=(0, 0, 4, 4)), "the mask is 48x64 px but the image {image} is 64x48 px"),
    (b"GIF89a not a png", "the mask is not a PNG file"),
    (png_bytes(64, 48), "the mask has no defect pixel"),
])
def test_a_mask_that_does_not_fit_is_refused_and_nothing_is_written(tmp_path: Path, images, data: bytes, said: str):
    with pytest.raises(VerdictError) as caught:
        save_mask(tmp_path / "review", "abc", data, images[0])
    assert said.format(image=images[0]) in str(caught.value)
    masks = tmp_path / "review" / MASK_DIR
    assert not masks.exists() or list(masks.iterdir()) == []  # no mask, no leftover upload


# --- predictions and the review order --------------------------------------------------------------


def predictions_folder(tmp_path: Path, rows: list[tuple[str, float | None, str]], threshold: float = 1.0) -> Path:
    """A predictions folder as `predict` writes one: (image name, score or None = unreadable,
    label) rows, images and overlays as real PNG files, relative paths from `tmp_path`."""
    folder = tmp_path / "preds"
    folder.mkdir()
    (tmp_path / "imgs").mkdir()
    table = []
    for name, score, label in rows:
        (tmp_path / "imgs" / name).write_bytes(png_bytes(64, 48, 100))
        if score is None:
            table.append({"path": f"imgs/{name}", "threshold": threshold, "error": "cannot read image"})
            continue
        overlay = name.replace(".png", "_overlay.png")
        (folder / overlay).write_bytes(png_bytes(64, 48, 50))
        table.append({"path": f"imgs/{name}", "score": score, "normalized_score": min(score / (2 * threshold), 1.0),
                      "label": label, "threshold": threshold, "stpm_score": score, "recon_score": score,
                      "overlay": overlay, "error": ""})
    pd.DataFrame(table, columns=["path", "score", "normalized_score", "label", "threshold", "stpm_score",
                                 "recon_score", "disc_score", "overlay", "error"]).to_csv(folder / "predictions.csv",
                                                                                          index=False)
    return folder


# Threshold 1.0; margins |score - 1|: a 0.5, b 0.25, c 0.25 (an alarm: before b), d 0.875, e 2.0,
# f unreadable, g 0.125. The scores are sums of powers of two, so the margins are exact.
ROWS = [("a.png", 1.5, "defective"), ("b.png", 0.75, "good"), ("c.png", 1.25, "defective"),
        ("d.png", 0.125, "good"), ("e.png", 3.0, "defective"), ("f.png", None, ""), ("g.png", 1.125, "defective")]


def test_the_review_order_puts_unreviewed_and_nearest_the_threshold_first(tmp_path: Path):
    found = load_predictions(predictions_folder(tmp_path, ROWS), base=tmp_path)
    assert [p.id for p in found.parts] == [0, 1, 2, 3, 4, 6] and found.unreadable == [("imgs/f.png", "cannot read image")]
    assert review_order(found.parts, {}) == [6, 2, 1, 0, 3, 4]  # g, c, b, a, d, e
    reviewed = {str(tmp_path / "imgs" / "g.png"): {}, str(tmp_path / "imgs" / "e.png"): {}}
    assert review_order(found.parts, reviewed) == [2, 1, 0, 3, 6, 4]  # c, b, a, d; then g, e


def test_a_predictions_folder_that_cannot_be_reviewed_is_named(tmp_path: Path):
    with pytest.raises(DataError, match=r"no predictions.csv in .*dualstpm predict IMAGES --out"):
        load_predictions(tmp_path)
    folder = predictions_folder(tmp_path, ROWS[:2])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(DataError, match=rf"none of the 2 images .* exists .*relative paths are read from {elsewhere}"
                                        r".*pass --base"):
        load_predictions(folder, base=elsewhere)
    pd.read_csv(folder / "predictions.csv").drop(columns=["overlay"]).to_csv(folder / "predictions.csv", index=False)
    with pytest.raises(DataError, match="lacks the columns overlay"):
        load_predictions(folder, base=tmp_path)


def test_a_score_that_is_not_a_number_is_refused_with_its_row(tmp_path: Path):
    folder = predictions_folder(tmp_path, ROWS)
    table = pd.read_csv(folder / "predictions.csv", dtype=str, keep_default_na=False)
    table.loc[1, "score"] = "0,75"  # a decimal comma, as a spreadsheet in another locale writes it
    table.to_csv(folder / "predictions.csv", index=False)
    with pytest.raises(DataError, match=r"predictions.csv, data row 2, column score: '0,75' is not a number"):
        load_predictions(folder, base=tmp_path)


# --- the HTTP interface, in process ------------------------------------------------------------------


def test_the_api_refuses_a_missing_image_a_wrong_mask_and_a_bad_log_with_the_reason(tmp_path: Path):
    from fastapi.testclient import TestClient

    folder = predictions_folder(tmp_path, ROWS)
    session = ReviewSession.open(folder, "alice", MODEL, base=tmp_path)
    client = TestClient(create_app(session), base_url="http://127.0.0.1:8765")
    order = client.get("/api/order").json()
    assert order["order"] == [6, 2, 1, 0, 3, 4] and order["reviewed"] == 0
    assert client.get("/api/parts/6/overlay").content == (folder / "g_overlay.png").read_bytes()

    kept = client.post("/api/parts/2/verdict", json={"verdict": "defective", "note": "dent",
                                                      "mask_png": base64.b64encode(png_bytes(64, 48, box=(1, 1, 3, 3))).decode()})
    assert kept.status_code == 200 and kept.json()["verdict"]["verdict"] == "defective"
    log = folder / "review" / LOG_FILE
    before = log.read_bytes()

    (tmp_path / "imgs" / "b.png").unlink()
    missing = client.post("/api/parts/1/verdict", json={"verdict": "good"})
    assert missing.status_code == 409 and f"{tmp_path / 'imgs' / 'b.png'} no longer exists" in missing.json()["detail"]
    wrong = client.post("/api/parts/0/verdict", json={"verdict": "defective",
                                                      "mask_png": base64.b64encode(png_bytes(10, 10, 255)).decode()})
    assert wrong.status_code == 409 and "the mask is 10x10 px but the image" in wrong.json()["detail"]
    good_with_mask = client.post("/api/parts/0/verdict", json={"verdict": "good",
                                                               "mask_png": base64.b64encode(png_bytes(64, 48, 255)).decode()})
    assert good_with_mask.status_code == 409 and "give it with the verdict `defective`" in good_with_mask.json()["detail"]
    assert log.read_bytes() == before  # nothing of the refused verdicts written
    assert len(list((folder / "review" / MASK_DIR).iterdir())) == 1  # the one kept verdict's mask only

    log.write_bytes(before + b"not json\n")  # edited by hand while the page is open
    refused = client.post("/api/parts/0/verdict", json={"verdict": "good"})
    assert refused.status_code == 423 and "line 2: it is not valid JSON" in refused.json()["detail"]
    assert log.read_bytes() == before + b"not json\n"
    assert client.get("/api/parts/99/overlay").status_code == 404


def test_a_request_for_another_host_name_is_refused(tmp_path: Path):
    from fastapi.testclient import TestClient

    session = ReviewSession.open(predictions_folder(tmp_path, ROWS), "alice", MODEL, base=tmp_path)
    app = create_app(session, host="192.0.2.7")  # served on that address (--host)
    for allowed in ("http://127.0.0.1:8765", "http://localhost:8765", "http://[::1]:8765", "http://192.0.2.7:8765"):
        assert TestClient(app, base_url=allowed).get("/api/order").status_code == 200, allowed
    rebound = TestClient(app, base_url="http://127.0.0.1:8765").get("/api/order", headers={"Host": "evil.example"})
    assert rebound.status_code == 400  # a DNS name rebound to this machine: refused


def test_the_page_escapes_names_and_a_row_pointing_outside_the_images_is_refused(tmp_path: Path):
    from fastapi.testclient import TestClient

    tag = "<img src=x onerror=alert(1)>"
    folder = predictions_folder(tmp_path, ROWS)
    table = pd.read_csv(folder / "predictions.csv", dtype=str, keep_default_na=False)
    table.loc[0, "label"] = tag
    table.to_csv(folder / "predictions.csv", index=False)
    session = ReviewSession.open(folder, tag, MODEL, base=tmp_path)  # a reviewer name with the tag, too
    client = TestClient(create_app(session), base_url="http://127.0.0.1:8765")
    page = client.get("/").text
    assert tag not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert client.get("/api/parts", params={"ids": "0"}).json()[0]["label"] == tag  # data, for the page to escape

    for column, value, said in (("path", "/etc/passwd", "the image '/etc/passwd' is not an image file"),
                                ("overlay", "../a_overlay.png", "overlay '../a_overlay.png' is not a file in"),
                                ("overlay", "notes.txt", "the overlay 'notes.txt' is not an image file")):
        edited = table.copy()
        edited.loc[0, column] = value
        edited.to_csv(folder / "predictions.csv", index=False)
        with pytest.raises(DataError, match=rf"predictions.csv, data row 1.*{re.escape(said)}"):
            ReviewSession.open(folder, "alice", MODEL, base=tmp_path)


def test_a_taken_port_and_a_malformed_model_name_are_refused_clearly():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(RunError, match=rf"cannot listen on 127.0.0.1:{port} .*pass --port N"):
            listening_socket("127.0.0.1", port)
    assert parse_model_spec("models:/dualstpm-x-bottle@champion") == ("dualstpm-x-bottle", "champion", None)
    assert parse_model_spec("dualstpm-x-bottle/3") == ("dualstpm-x-bottle", None, "3")
    with pytest.raises(ConfigError, match="neither NAME@ALIAS nor NAME/VERSION"):
        parse_model_spec("dualstpm-x-bottle")


@pytest.mark.slow
def test_a_registered_model_version_is_resolved_from_the_registry(mlflow_server):
    from mlflow import MlflowClient

    from dualstpm.mlops.scored_by import describe_registered

    client = MlflowClient(mlflow_server.uri)
    run = client.create_run(client.create_experiment("review-test"))
    client.create_registered_model("review-test-model")
    for _ in range(2):
        client.create_model_version("review-test-model", source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias("review-test-model", "champion", "1")
    found = describe_registered("review-test-model@champion", client)
    assert (found["registered_model"], found["alias"], found["version"]) == ("review-test-model", "champion", "1")
    assert found["mlflow_run_id"] == run.info.run_id and found["tracking_uri"] == mlflow_server.uri
    assert describe_registered("review-test-model/2", client)["version"] == "2"
    with pytest.raises(RunError, match="has no review-test-model@staging"):
        describe_registered("review-test-model@staging", client)


# --- the page in a real browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(trained_run: Path, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real predictions of the tiny trained model on copies of the synthetic test images
    (copies: a test deletes one). Returns the folder holding `images/` and `preds/`."""
    from dualstpm.backends import load_scorer
    from dualstpm.predict import predict

    root = tmp_path_factory.mktemp("scored")
    shutil.copytree(synthetic_root / "synth_texture" / "test", root / "images")
    predict(load_scorer("torch", trained_run, None, "cpu"), [root / "images"], root / "preds")
    return root


class ReviewServer:
    """`dualstpm review` as a user starts it: a subprocess on 127.0.0.1, stopped by PID."""

    def __init__(self, folder: Path, run: Path, reviewer: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dualstpm", "review", str(folder), "--run", str(run), "--port", str(self.port),
                 "--reviewer", reviewer], cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, timeout_s: float = 180) -> ReviewServer:
        wait_for_http(self.process, f"{self.url}/api/order", timeout_s, "review server", self.log.read_text, 0.3)
        return self

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


def log_lines(folder: Path) -> list[dict]:
    path = folder / "review" / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_the_page_in_a_real_browser_keeps_every_verdict_across_a_reload_and_a_crash(scored: Path, trained_run: Path, tmp_path: Path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium chromium-driver)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'")

    preds = scored / "preds"
    table = pd.read_csv(preds / "predictions.csv")
    alice = ReviewServer(preds, trained_run, "alice", tmp_path / "alice.log")
    bob = ReviewServer(preds, trained_run, "bob", tmp_path / "bob.log")  # a second reviewer on the same folder
    try:
        alice.wait(), bob.wait()
        order = requests.get(f"{alice.url}/api/order", timeout=10).json()["order"]
        assert len(order) == len(table) >= 8
        listed = {int(part_id): str(table.loc[int(part_id), "path"]) for part_id in order}
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(alice.url)
            status = page.locator("#status")

            def kept(text: str) -> None:
                sync_api.expect(status).to_contain_text(text, timeout=30_000)

            sync_api.expect(page.locator("#progress")).to_contain_text(f"part 1 of {len(order)}")
            page.keyboard.press("g")  # keyboard: part 1 good, moves on
            kept("kept:")
            sync_api.expect(page.locator("#progress")).to_contain_text("part 2 of")
            page.set_input_files("#mask", files=[{"name": "mask.png", "mimeType": "image/png",
                                                  "buffer": png_bytes(64, 64, box=(8, 8, 24, 24))}])
            sync_api.expect(page.locator("#mask-state")).to_contain_text("mask.png")
            page.keyboard.press("d")  # keyboard: part 2 defective, with the mask
            kept("(with mask)")
            page.keyboard.press("n")  # part 3: a note, then the mouse
            page.keyboard.type("odd finish, acceptable")
            page.keyboard.press("Enter")
            kept("note kept for the verdict")
            page.click("#good")
            kept("(with note)")
            page.click("#list .row[data-index='4']")  # the mouse: part 5 from the list
            sync_api.expect(page.locator("#progress")).to_contain_text("part 5 of")
            page.set_input_files("#mask", files=[{"name": "small.png", "mimeType": "image/png",
                                                  "buffer": png_bytes(10, 10, 255)}])
            page.click("#defective")  # a mask of the wrong size: refused, nothing recorded
            kept("not recorded: the mask is 10x10 px but the image")
            page.click("#list .row[data-index='5']")
            page.click("#list .row[data-index='4']")  # away and back: the refused mask is no longer attached
            page.click("#defective")
            kept("kept:")

            gone = scored / listed[order[6]]
            gone.unlink()  # a part whose file was removed since predict
            page.click("#list .row[data-index='6']")
            page.keyboard.press("g")
            kept(f"not recorded: {gone} no longer exists")

            answer = requests.post(f"{bob.url}/api/parts/{order[7]}/verdict", json={"verdict": "defective"}, timeout=30)
            assert answer.status_code == 200  # bob, on the other server, meanwhile

            expected = {order[0]: ("good", "alice"), order[1]: ("defective", "alice"), order[2]: ("good", "alice"),
                        order[4]: ("defective", "alice"), order[7]: ("defective", "bob")}

            def shows_every_verdict() -> None:
                sync_api.expect(page.locator("#progress")).to_contain_text(f"{len(expected)} reviewed")
                for part_id, (verdict, _) in expected.items():
                    sync_api.expect(page.locator(f"#list .row[data-id='{part_id}'] .tag")).to_have_text(verdict)
                rows = page.locator("#list .row")
                last = [int(rows.nth(k).get_attribute("data-id")) for k in range(len(order) - len(expected), len(order))]
                assert last == review_order_after(table, expected)  # reviewed parts now at the end

            page.reload()
            shows_every_verdict()
            os.kill(alice.process.pid, signal.SIGKILL)  # a crash: no shutdown of any kind
            alice.process.wait(timeout=30)
            alice = ReviewServer(preds, trained_run, "alice", tmp_path / "alice-again.log").wait()
            page.goto(alice.url)
            shows_every_verdict()
            page.click(f"#list .row[data-id='{order[2]}']")
            sync_api.expect(page.locator("#note")).to_have_value("odd finish, acceptable")
            sync_api.expect(page.locator("#verdict")).to_contain_text("good by alice")
            browser.close()

        lines = log_lines(preds)
        assert len(lines) == len(expected)  # the refused verdicts left nothing
        by_image = {line["listed_path"]: line for line in lines}
        for part_id, (verdict, reviewer) in expected.items():
            line = by_image[listed[part_id]]
            assert (line["verdict"], line["reviewer"]) == (verdict, reviewer)
            assert line["score"] == pytest.approx(float(table.loc[part_id, "score"]), rel=1e-12)
            assert line["model"]["run"] == str(trained_run.absolute())
        assert by_image[listed[order[2]]]["note"] == "odd finish, acceptable"
        mask = np.asarray(Image.open(preds / "review" / by_image[listed[order[1]]]["mask"]))
        assert mask.shape == (64, 64) and int((mask == 255).sum()) == 16 * 16
        assert by_image[listed[order[4]]]["mask"] is None
    finally:
        alice.stop()
        bob.stop()
    assert alice.process.returncode is not None and bob.process.returncode is not None


def review_order_after(table: pd.DataFrame, reviewed: dict[int, tuple]) -> list[int]:
    """The reviewed parts' order after a reload, from the rule: by |score - threshold|, alarms first on ties."""
    margin = {i: abs(float(table.loc[i, "score"]) - float(table.loc[i, "threshold"])) for i in reviewed}
    return sorted(reviewed, key=lambda i: (margin[i], table.loc[i, "label"] != "defective", table.loc[i, "path"]))


@pytest.mark.slow
def test_the_server_refuses_to_start_on_a_hand_broken_log_and_leaves_it_alone(scored: Path, trained_run: Path,
                                                                               tmp_path: Path):
    preds = tmp_path / "preds"
    shutil.copytree(scored / "preds", preds, ignore=shutil.ignore_patterns("review"))
    (preds / "review").mkdir()
    broken = b'{"schema": 1, "id": "a", "time": "t", "reviewer": "x", "image": "/p.png", "verdict": "good"}\n{"verdict": goo\n'
    (preds / "review" / LOG_FILE).write_bytes(broken)
    done = subprocess.run([sys.executable, "-m", "dualstpm", "review", str(preds), "--run", str(trained_run),
                           "--port", "0"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert f"{preds / 'review' / LOG_FILE}, line 2: it is not valid JSON" in done.stderr
    assert "Traceback" not in done.stderr
    assert (preds / "review" / LOG_FILE).read_bytes() == broken


@pytest.mark.parametrize(("args", "said"), [
    ([], "name the model that scored the predictions: --run RUN or --model NAME@ALIAS (one of them)"),
    (["--run", "r", "--model", "m@champion"], "--run RUN or --model NAME@ALIAS (one of them)"),
    (["--model", "no-alias"], "--model 'no-alias' is neither NAME@ALIAS nor NAME/VERSION"),
    (["--run", "{tmp}/no-run"], "no-run/model is not a trained model"),
    (["--model", "m@champion", "--base", "{tmp}"],
     "there is no MLflow store at {tmp}/absent.db"),  # the store named is not created empty
])
def test_the_command_names_what_is_missing_before_it_serves(tmp_path: Path, args: list[str], said: str):
    folder = predictions_folder(tmp_path, ROWS)
    # a store that does not exist, whatever other tests of the session created in theirs
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'absent.db'}"}
    done = subprocess.run([sys.executable, "-m", "dualstpm", "review", str(folder), *(a.format(tmp=tmp_path) for a in args)],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300, env=env)
    said = said.format(tmp=tmp_path)
    assert done.returncode == 2 and said in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "absent.db").exists()
