"""Long steps say what they do: bars on a terminal, a line per stage in logs, all on stderr."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import pytest

from dualstpm import progress
from dualstpm.progress import labelled, progress_bar, say, stage


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_a_stage_in_logs_is_a_start_and_an_end_line_with_its_count(capsys: pytest.CaptureFixture) -> None:
    with stage("weighing parts", 3, "parts") as step:
        for _ in range(3):
            step.advance()
    captured = capsys.readouterr()
    assert captured.out == ""  # stdout stays for machine-readable output
    said = lines(captured.err)
    assert said[0] == "weighing parts: 3 parts"
    assert re.fullmatch(r"weighing parts: done, 3/3 parts in \d+\.\d s", said[1]), said
    assert len(said) == 2


def test_a_stage_without_a_count_and_one_that_fails(capsys: pytest.CaptureFixture) -> None:
    with stage("exporting"):
        pass
    with pytest.raises(ValueError), stage("converting", 2):
        raise ValueError("broken")
    said = lines(capsys.readouterr().err)
    assert said[0] == "exporting" and re.fullmatch(r"exporting: done in \d+\.\d s", said[1])
    assert said[2:] == ["converting: 2 images"]  # no "done" for a stage that raised


def test_a_long_stage_logs_its_progress_in_between(capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # every advance is "long enough"
    with stage("scoring", 2) as step:
        step.advance()
        step.advance()
    said = lines(capsys.readouterr().err)
    assert [re.sub(r", \d+ s$", "", line) for line in said[1:3]] == ["scoring: 1/2 images", "scoring: 2/2 images"]


def test_a_label_prefixes_every_line_and_its_sink_gets_plain_text(capsys: pytest.CaptureFixture) -> None:
    got: list[str] = []
    with labelled("bottle", got.append):
        say("[bold yellow]warning:[/] few images")
        with stage("decoding test images", 4):
            pass
    assert got[0] == "bottle: warning: few images"  # markup rendered away, label in front
    assert got[1] == "bottle: decoding test images: 4 images"
    assert got[2].startswith("bottle: decoding test images: done, 0/4 images")
    assert capsys.readouterr().err == ""  # the sink replaces stderr
    say("after")
    assert lines(capsys.readouterr().err) == ["after"]  # the label ends with its context


def test_categories_side_by_side_keep_their_own_labels() -> None:
    logs: dict[str, list[str]] = {"bottle": [], "wood": []}
    start = threading.Barrier(2)

    def category(name: str) -> None:
        with labelled(name, logs[name].append):
            start.wait()  # both labels set at once
            for epoch in range(1, 4):
                say(f"epoch {epoch}")

    threads = [threading.Thread(target=category, args=(name,)) for name in logs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert logs == {name: [f"{name}: epoch {e}" for e in (1, 2, 3)] for name in logs}


def test_on_a_terminal_a_stage_inside_a_shown_bar_joins_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rich shows one live display at a time: a stage opened under fit's epoch bar (or
    another stage) adds its bar to the one shown instead of failing with LiveError."""
    monkeypatch.setattr(progress, "bars_shown", lambda: True)
    with progress_bar() as shown:
        with stage("computing anomaly maps", 4) as inner:
            inner.advance(4)
            assert [(t.description, t.completed, t.total) for t in shown.tasks] == [("computing anomaly maps", 4, 4)]
        with stage("outer"), stage("nested", 1):
            assert [t.description for t in shown.tasks] == ["outer", "nested"]
    assert shown.tasks == []  # each stage removed its bar when it ended
    with stage("alone", 1):  # no bar shown: the stage opens one of its own
        assert len(progress._live) == 1
    assert progress._live == []


def _own_category(synthetic_root: Path, root: Path, good: int, defective: int) -> Path:
    """A category `mine` with `good` good and `defective` hole test images (with masks),
    copied from the synthetic texture."""
    source, target = synthetic_root / "synth_texture", root / "mine"
    shutil.copytree(source / "train", target / "train")
    for kind, count in (("good", good), ("hole", defective)):
        (target / "test" / kind).mkdir(parents=True)
        for path in sorted((source / "test" / kind).glob("*.png"))[:count]:
            shutil.copy(path, target / "test" / kind / path.name)
            if kind != "good":
                (target / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
                mask = source / "ground_truth" / kind / f"{path.stem}_mask.png"
                shutil.copy(mask, target / "ground_truth" / kind / mask.name)
    return root


def test_test_and_predict_say_each_stage_with_its_count_on_stderr(trained_run: Path, synthetic_root: Path,
                                                                  tmp_path: Path, capsys: pytest.CaptureFixture):
    from dualstpm.detector import Detector
    from dualstpm.evaluation import test_run
    from dualstpm.predict import predict

    root = _own_category(synthetic_root, tmp_path / "data", good=2, defective=3)
    run = tmp_path / "run"
    shutil.copytree(trained_run / "model", run / "model")
    capsys.readouterr()
    result = test_run(run, root, "mine")
    captured = capsys.readouterr()
    assert captured.out == ""
    said = lines(captured.err)
    n = 2 + 3
    assert {"fused", "stpm", "recon"} <= set(result) and not {"disc", "chosen"} & set(result)
    views = 3  # the tiny model: no discriminative stage, no applied ablation
    for start, end in ((f"decoding test images: {n} images", f"decoding test images: done, {n}/{n} images"),
                       (f"computing anomaly maps of test images: {n} images",
                        f"computing anomaly maps of test images: done, {n}/{n} images"),
                       (f"computing metrics: {views} views", f"computing metrics: done, {views}/{views} views"),
                       ("drawing curves and overlays", "drawing curves and overlays: done in ")):
        assert start in said, said
        assert any(line.startswith(end) for line in said), (end, said)
        assert said.index(start) < next(i for i, line in enumerate(said) if line.startswith(end))

    images = tmp_path / "new"
    images.mkdir()
    chosen = [*sorted((root / "mine" / "test" / "good").glob("*.png")), *sorted((root / "mine" / "test" / "hole").glob("*.png"))[:2]]
    for path in chosen:  # 2 good, 2 defective
        shutil.copy(path, images / f"{path.parent.name}_{path.name}")
    predict(Detector.load(run), [images], tmp_path / "pred")
    captured = capsys.readouterr()
    assert captured.out == ""
    said = lines(captured.err)
    assert said[0] == "scoring images: 4 images"
    assert said[1].startswith("scoring images: done, 4/4 images in ")


def test_a_bar_not_shown_takes_no_stage(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """fit's epoch bar in a Prefect worker thread is disabled: stages inside it log lines."""
    monkeypatch.setattr(progress, "bars_shown", lambda: False)
    with progress_bar():
        assert progress._live == []
        with stage("scoring", 1) as step:
            step.advance()
    assert lines(capsys.readouterr().err)[0] == "scoring: 1 images"
