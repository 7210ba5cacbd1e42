"""`dualstpm feedback apply`: reviewed parts become data, once, all or nothing, versioned by DVC.

Review logs are written with the review page's own API (`ReviewLog.append(new_entry(...))`)
over small generated images; every expected destination below is worked out by hand from
the rules in dualstpm/feedback.py's docstring.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dualstpm.errors import DataError
from dualstpm.feedback import PROVENANCE_FILE, apply_feedback
from dualstpm.review.log import ReviewLog, new_entry, save_mask
from dualstpm.rundir import review_dir

SIZE = 16
MODEL = {"run": "/runs/cat", "weights_sha256": "ab" * 32, "mlflow_run_id": None}


def png(path: Path, value: int) -> Path:
    """A SIZE x SIZE grey image of one value (distinct values: distinct parts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((SIZE, SIZE, 3), value, np.uint8)).save(path)
    return path


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """A category `cat`: two train images, test/good and test/scratch (values 1..4)."""
    root = tmp_path / "data"
    png(root / "cat" / "train" / "good" / "000.png", 1)
    png(root / "cat" / "train" / "good" / "001.png", 2)
    png(root / "cat" / "test" / "good" / "000.png", 3)
    png(root / "cat" / "test" / "scratch" / "000.png", 4)
    return root


def review(predictions: Path, image: Path, verdict: str, model_label: str, note: str = "",
           reviewer: str = "ana", mask: bytes | None = None) -> dict:
    """Append one verdict to `predictions`' review log, as the review page does."""
    log = ReviewLog(review_dir(predictions))
    entry_id = os.urandom(16).hex()
    mask_name = save_mask(review_dir(predictions), entry_id, mask, image) if mask is not None else None
    entry = new_entry(reviewer=reviewer, image=image, listed_path=str(image), verdict=verdict, note=note,
                      mask=mask_name, score=0.5, normalized_score=0.5, threshold=0.4, model_label=model_label,
                      overlay=f"{image.stem}_overlay.png", predictions=predictions / "predictions.csv", model=MODEL,
                      entry_id=entry_id)
    return log.append(entry)


def mask_png() -> bytes:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:8, 4:8] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_verdict_lands_where_the_rules_say_with_its_provenance(tmp_path: Path, data_root: Path) -> None:
    batch = tmp_path / "batch"
    a, b, c, d = (png(tmp_path / "line" / f"part{k}.png", 10 + k) for k in range(4))
    review(batch, a, "good", "good")                         # confirmed good -> train/good
    review(batch, b, "good", "defective")                    # false alarm, no validation/good -> train/good
    review(batch, c, "defective", "defective", "Scratch, near the rim", mask=mask_png())  # a test defect type
    review(batch, d, "defective", "good", "dent")            # unknown type -> reviewed
    before = tree(batch)

    result = apply_feedback([batch], data_root, "cat", dvc=False)

    cat = data_root / "cat"
    expected = {
        f"train/good/part0-{sha(a)[:12]}.png": a,
        f"train/good/part1-{sha(b)[:12]}.png": b,
        f"validation/scratch/part2-{sha(c)[:12]}.png": c,
        f"validation/reviewed/part3-{sha(d)[:12]}.png": d,
    }
    for relative, source in expected.items():
        assert (cat / relative).read_bytes() == source.read_bytes(), relative
    mask = cat / f"validation_ground_truth/scratch/part2-{sha(c)[:12]}_mask.png"
    assert np.asarray(Image.open(mask)).astype(bool).sum() == 16  # the 4x4 square drawn above
    assert sorted(result.summary()["copied"]) == sorted(expected)
    assert tree(batch) == before  # copied, not moved: the reviewed batch stays as it was
    lines = [json.loads(line) for line in (cat / PROVENANCE_FILE).read_text().splitlines()]
    by_path = {line["path"]: line for line in lines}
    assert set(by_path) == set(expected)
    c_line = by_path[f"validation/scratch/part2-{sha(c)[:12]}.png"]
    assert (c_line["sha256"], c_line["verdict"], c_line["defect_type"], c_line["reviewer"], c_line["model"]) == (
        sha(c), "defective", "scratch", "ana", MODEL)
    assert c_line["predictions"] == str(batch.resolve()) and c_line["source_image"] == str(c)
    assert c_line["mask"] == f"validation_ground_truth/scratch/part2-{sha(c)[:12]}_mask.png"


def test_a_false_alarm_goes_to_validation_good_only_where_that_folder_exists(tmp_path: Path, data_root: Path) -> None:
    png(data_root / "cat" / "validation" / "good" / "000.png", 5)
    batch = tmp_path / "batch"
    flagged, confirmed = png(tmp_path / "p" / "fa.png", 20), png(tmp_path / "p" / "ok.png", 21)
    review(batch, flagged, "good", "defective")
    review(batch, confirmed, "good", "good")

    result = apply_feedback([batch], data_root, "cat", dvc=False)

    assert sorted(result.summary()["copied"]) == [f"train/good/ok-{sha(confirmed)[:12]}.png",
                                                  f"validation/good/fa-{sha(flagged)[:12]}.png"]


def test_applying_twice_copies_nothing_the_second_time(tmp_path: Path, data_root: Path) -> None:
    batch = tmp_path / "batch"
    review(batch, png(tmp_path / "p" / "x.png", 30), "good", "good")
    first = apply_feedback([batch], data_root, "cat", dvc=False)
    after_first = tree(data_root)

    second = apply_feedback([batch], data_root, "cat", dvc=False)

    assert len(first.copies) == 1 and second.copies == []
    assert len(second.skipped) == 1 and "already applied" in second.skipped[0]
    assert tree(data_root) == after_first


def test_a_part_already_in_the_data_or_in_test_is_not_copied(tmp_path: Path, data_root: Path) -> None:
    batch = tmp_path / "batch"
    train_copy = tmp_path / "p" / "again.png"
    test_copy = tmp_path / "p" / "leak.png"
    train_copy.parent.mkdir(parents=True)
    shutil.copy(data_root / "cat" / "train" / "good" / "000.png", train_copy)
    shutil.copy(data_root / "cat" / "test" / "scratch" / "000.png", test_copy)
    review(batch, train_copy, "good", "good")
    review(batch, test_copy, "defective", "defective")
    before = tree(data_root)

    result = apply_feedback([batch], data_root, "cat", dvc=False)

    assert result.copies == [] and tree(data_root) == before
    assert any("already in the data as train/good/000.png" in s for s in result.skipped)
    assert any("test image test/scratch/000.png" in c for c in result.conflicts)


def test_conflicting_verdicts_are_reported_with_both_and_not_applied(tmp_path: Path, data_root: Path) -> None:
    part = png(tmp_path / "p" / "y.png", 40)
    other = png(tmp_path / "p" / "z.png", 41)
    first, second = tmp_path / "monday", tmp_path / "tuesday"
    review(first, part, "good", "defective", reviewer="ana")
    review(second, part, "defective", "defective", reviewer="ben")
    review(second, other, "good", "good")

    result = apply_feedback([first, second], data_root, "cat", dvc=False)

    [conflict] = result.conflicts
    assert "good by ana" in conflict and "defective by ben" in conflict
    assert result.summary()["copied"] == [f"train/good/z-{sha(other)[:12]}.png"]  # the others are applied
    assert not list((data_root / "cat").rglob(f"y-{sha(part)[:12]}*"))


def test_a_verdict_against_one_already_applied_is_a_conflict(tmp_path: Path, data_root: Path) -> None:
    part = png(tmp_path / "p" / "w.png", 50)
    review(tmp_path / "monday", part, "good", "good", reviewer="ana")
    apply_feedback([tmp_path / "monday"], data_root, "cat", dvc=False)
    after = tree(data_root)
    review(tmp_path / "friday", part, "defective", "good", reviewer="ben")

    result = apply_feedback([tmp_path / "friday"], data_root, "cat", dvc=False)

    [conflict] = result.conflicts
    assert "defective by ben" in conflict and "already applied: good by ana" in conflict
    assert tree(data_root) == after


def test_a_missing_image_is_reported_and_the_rest_applied(tmp_path: Path, data_root: Path) -> None:
    batch = tmp_path / "batch"
    gone, kept = png(tmp_path / "p" / "gone.png", 60), png(tmp_path / "p" / "kept.png", 61)
    review(batch, gone, "good", "good")
    review(batch, kept, "good", "good")
    gone.unlink()

    result = apply_feedback([batch], data_root, "cat", dvc=False)

    [problem] = result.problems
    assert str(gone) in problem and "no longer exists" in problem
    assert result.summary()["copied"] == [f"train/good/kept-{sha(kept)[:12]}.png"]


def test_a_failure_midway_leaves_the_data_folder_as_it_was(tmp_path: Path, data_root: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    batch = tmp_path / "batch"
    for k in range(3):
        review(batch, png(tmp_path / "p" / f"m{k}.png", 70 + k), "good", "good")
    (data_root / "cat" / PROVENANCE_FILE).write_text('{"sha256": "00", "verdict": "good", "path": "x"}\n')
    before = tree(data_root)
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):  # the disk fills up at the third move into the category
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(DataError, match="nothing was changed there"):
        apply_feedback([batch], data_root, "cat", dvc=False)
    monkeypatch.undo()

    assert len(calls) == 3  # two copies were in place before the failure
    assert tree(data_root) == before
    assert not [p for p in data_root.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_dry_run_writes_nothing(tmp_path: Path, data_root: Path) -> None:
    batch = tmp_path / "batch"
    part = png(tmp_path / "p" / "d.png", 80)
    review(batch, part, "good", "good")
    before = tree(data_root)

    result = apply_feedback([batch], data_root, "cat", dry_run=True)

    assert result.summary()["copied"] == [f"train/good/d-{sha(part)[:12]}.png"] and tree(data_root) == before


def test_a_folder_without_a_review_log_is_refused(tmp_path: Path, data_root: Path) -> None:
    (tmp_path / "batch").mkdir()
    with pytest.raises(DataError, match="no review log in"):
        apply_feedback([tmp_path / "batch"], data_root, "cat")


def dvc(repo: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout


def dvc_md5(dvc_file: Path) -> str:
    import yaml

    return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]


def test_apply_in_a_dvc_tracked_folder_makes_a_new_data_version(tmp_path: Path) -> None:
    repo = dvc_project(tmp_path / "project")
    before = dvc_md5(repo / "data" / "cat.dvc")
    assert "up to date" in dvc(repo, "status").lower()
    batch = tmp_path / "batch"
    review(batch, png(tmp_path / "p" / "new.png", 90), "good", "good")

    result = apply_feedback([batch], repo / "data", "cat")

    assert result.dvc.startswith("`dvc add data/cat`")
    assert dvc_md5(repo / "data" / "cat.dvc") != before  # a new data version
    assert "up to date" in dvc(repo, "status").lower()  # the workspace matches the new .dvc file
    changed = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, check=True)
    assert "data/cat.dvc" in changed.stdout  # git sees the new version to commit
    subprocess.run(["git", "stash", "-q"], cwd=repo, check=True)  # back to the old .dvc file:
    assert "modified" in dvc(repo, "status")  # the workspace now holds data that version does not describe


def dvc_project(repo: Path) -> Path:
    """A git + DVC project whose data/cat (one train and one test image) is tracked by data/cat.dvc, committed."""
    png(repo / "data" / "cat" / "train" / "good" / "000.png", 1)
    png(repo / "data" / "cat" / "test" / "good" / "000.png", 2)
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                    ["git", "config", "user.name", "t"]):
        subprocess.run(command, cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "add", "data/cat")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "data v1"], cwd=repo, check=True)
    return repo


@pytest.mark.slow  # 6 s: four dvc runs
def test_apply_into_a_stage_output_commits_the_stage(tmp_path: Path) -> None:
    repo = tmp_path / "project"
    png(repo / "seed" / "train" / "good" / "000.png", 1)
    png(repo / "seed" / "test" / "good" / "000.png", 2)
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                    ["git", "config", "user.name", "t"]):
        subprocess.run(command, cwd=repo, check=True)
    dvc(repo, "init", "-q")
    dvc(repo, "stage", "add", "-q", "-n", "download", "-d", "seed", "-o", "data/cat", "mkdir -p data && cp -r seed data/cat")
    dvc(repo, "repro", "-q")
    lock = repo / "dvc.lock"

    def output_md5() -> str:
        import yaml

        return yaml.safe_load(lock.read_text())["stages"]["download"]["outs"][0]["md5"]

    before = output_md5()
    batch = tmp_path / "batch"
    review(batch, png(tmp_path / "p" / "new.png", 90), "good", "good")

    result = apply_feedback([batch], repo / "data", "cat")

    assert result.dvc_error is None and result.dvc.startswith("`dvc commit --force download`")
    assert output_md5() != before  # dvc.lock records the output with the copy in it
    assert "up to date" in dvc(repo, "status").lower()  # the workspace matches the new dvc.lock


def test_a_failing_dvc_keeps_the_copies_and_the_command_reports_everything_then_exits_2(tmp_path: Path) -> None:
    repo = dvc_project(tmp_path / "project")
    (repo / ".dvc" / "config").write_text("[core\n")  # a broken DVC config: every dvc command fails
    new, disputed = png(tmp_path / "p" / "new.png", 90), png(tmp_path / "p" / "disputed.png", 91)
    review(tmp_path / "a", new, "good", "good")
    review(tmp_path / "a", disputed, "good", "good", reviewer="ana")
    review(tmp_path / "b", disputed, "defective", "good", reviewer="ben")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    done = subprocess.run([sys.executable, "-m", "dualstpm", "feedback", "apply", str(tmp_path / "a"), str(tmp_path / "b"),
                           "--data-root", str(repo / "data"), "--category", "cat"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 2, done.stdout + done.stderr
    copy = f"train/good/new-{sha(new)[:12]}.png"
    assert f"copied: {new} -> {repo / 'data' / 'cat' / copy}" in done.stdout  # the copies made are listed
    assert "1 part(s) copied, 0 already in the data, 1 not applied" in done.stdout
    assert "good by ana" in done.stderr and "defective by ben" in done.stderr  # the conflict is not lost
    error = done.stderr[done.stderr.index("error: "):]
    assert f"`dvc add data/cat` failed in {repo}" in " ".join(error.split())
    assert f"cd {repo} && dvc add data/cat" in " ".join(error.split())  # the command to run by hand
    assert (repo / "data" / "cat" / copy).is_file()  # the copy stays ...
    provenance = [json.loads(line) for line in (repo / "data" / "cat" / PROVENANCE_FILE).read_text().splitlines()]
    assert [entry["path"] for entry in provenance] == [copy]  # ... and is recorded


def test_the_command_applies_the_rest_and_exits_3_on_a_conflict(tmp_path: Path, data_root: Path) -> None:
    part, other = png(tmp_path / "p" / "c1.png", 100), png(tmp_path / "p" / "c2.png", 101)
    review(tmp_path / "a", part, "good", "good", reviewer="ana")
    review(tmp_path / "b", part, "defective", "good", reviewer="ben")
    review(tmp_path / "b", other, "good", "good")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    done = subprocess.run([sys.executable, "-m", "dualstpm", "feedback", "apply", str(tmp_path / "a"), str(tmp_path / "b"),
                           "--data-root", str(data_root), "--category", "cat"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 3, done.stdout + done.stderr
    assert "good by ana" in done.stderr and "defective by ben" in done.stderr
    assert "1 part(s) copied, 0 already in the data, 1 not applied" in done.stdout
    assert "is not inside a DVC project" in done.stdout  # and how to version it
    assert (data_root / "cat" / "train" / "good" / f"c2-{sha(other)[:12]}.png").is_file()


def test_a_mask_replaced_by_one_of_another_size_is_reported(tmp_path: Path, data_root: Path) -> None:
    batch = tmp_path / "batch"
    part = png(tmp_path / "p" / "s.png", 110)
    entry = review(batch, part, "defective", "defective", "scratch", mask=mask_png())
    Image.fromarray(np.full((SIZE, 2 * SIZE), 255, np.uint8)).save(review_dir(batch) / entry["mask"])  # by hand
    before = tree(data_root)

    result = apply_feedback([batch], data_root, "cat", dvc=False)

    [problem] = result.problems
    assert f"is {2 * SIZE}x{SIZE} px but the image is {SIZE}x{SIZE} px" in problem
    assert result.copies == [] and tree(data_root) == before
