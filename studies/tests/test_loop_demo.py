"""studies/loop_demo.py and studies/loop_line.py: the whole loop, scripted (issue 24, item 5).

The quick tests check the line's pieces on a synthetic category (the split, the batch and
its truth, the lighting shift, the simulated inspector writing the review log); the slow
one runs the demo end to end on battery_weld at the tiniest settings and checks what the
design promises, from the files and the registry the commands left, not from the demo's
own arithmetic alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from studies.loop_line import (
    DEFECTIVE,
    REVIEWER,
    plan_split,
    review_from_truth,
    shifted_copy,
    write_line_batch,
)
from tests.conftest import PROJECT_ROOT

CATEGORY = "synth_texture"


def test_the_split_sends_held_back_good_and_defective_parts_to_the_line_and_keeps_the_rest(synthetic_root: Path):
    # synthetic_root's synth_texture: 20 train/good, 6 test/good, 3 of each defect type
    split = plan_split(synthetic_root, CATEGORY, holdout_good=5, line_defects=4, seed=0)
    source = synthetic_root / CATEGORY
    train = sorted((source / "train" / "good").iterdir())
    assert len(split.held_back) == 5 and len(split.train) == 15
    assert set(split.held_back).isdisjoint(split.train) and set(split.held_back) | set(split.train) == set(train)
    types = sorted(p.name for p in (source / "test").iterdir() if p.name != "good")
    taken = [path for path, _, _ in split.line_defects]
    assert len(taken) == 4
    # spread over the types in turn: with 4 parts and 3 types, every type is on the line
    assert sorted({kind for _, kind, _ in split.line_defects}) == types
    for path, kind, mask in split.line_defects:
        assert path.parent.name == kind and mask == source / "ground_truth" / kind / f"{path.stem}_mask.png"
    every_test = {p for folder in (source / "test").iterdir() for p in folder.iterdir()}
    assert set(split.test) == every_test - set(taken)
    assert split.duplicated_train == 0
    # the same seed, the same split
    assert plan_split(synthetic_root, CATEGORY, 5, 4, seed=0) == split


def test_a_train_image_that_is_also_a_test_image_never_goes_to_the_line(synthetic_root: Path, tmp_path: Path):
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / CATEGORY, root / CATEGORY)
    test_image = min((root / CATEGORY / "test" / "good").iterdir())
    shutil.copy(test_image, root / CATEGORY / "train" / "good" / "copy-of-a-test-image.png")  # 21 train, 1 a copy
    split = plan_split(root, CATEGORY, holdout_good=17, line_defects=0, seed=3)  # at most 21 - 4 may go
    assert split.duplicated_train == 1
    assert root / CATEGORY / "train" / "good" / "copy-of-a-test-image.png" in split.train
    with pytest.raises(ValueError, match="--holdout-good 18"):
        plan_split(root, CATEGORY, holdout_good=18, line_defects=0, seed=3)


def test_too_few_images_are_refused_naming_the_option(synthetic_root: Path):
    with pytest.raises(ValueError, match="--holdout-good 17.*between 1 and 16"):
        plan_split(synthetic_root, CATEGORY, holdout_good=17, line_defects=0, seed=0)
    with pytest.raises(ValueError, match="--line-defects 9"):  # 9 defective test images: one must stay
        plan_split(synthetic_root, CATEGORY, holdout_good=1, line_defects=9, seed=0)


def test_the_line_batch_hides_the_truth_in_its_names_and_keeps_it_apart(synthetic_root: Path, tmp_path: Path):
    split = plan_split(synthetic_root, CATEGORY, holdout_good=3, line_defects=3, seed=1)
    batch = write_line_batch(split, tmp_path / "batch", seed=1)
    names = sorted(p.name for p in (tmp_path / "batch").iterdir())
    assert names == [f"part-{i:03d}.png" for i in range(1, 7)] == sorted(batch.parts)
    sources = {str(p): "good" for p in split.held_back} | {str(p): DEFECTIVE for p, _, _ in split.line_defects}
    for name, part in batch.parts.items():
        assert (tmp_path / "batch" / name).read_bytes() == Path(part.source).read_bytes()
        assert part.truth == sources[part.source]
        assert (part.mask is None) == (part.truth == "good")
    batch.write_truth(tmp_path / "truth.json")
    assert json.loads((tmp_path / "truth.json").read_text())["part-001.png"]["source"] == batch.parts["part-001.png"].source


def test_the_lighting_shift_halves_the_contrast_and_darkens_by_the_factor(tmp_path: Path):
    ramp = np.tile(np.arange(40, 240, 2, dtype=np.uint8), (10, 1))  # mean 139, from 40 to 238
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    (shifted,) = shifted_copy([tmp_path / "ramp.png"], tmp_path / "shifted", contrast=0.5, brightness=0.6)
    out = np.asarray(Image.open(shifted), dtype=float)
    # contrast 0.5 pulls each pixel halfway to the image's mean (139): 40 -> 89.5, 238 -> 188.5; then x0.6.
    # PIL blends in 8-bit integers, each of the two steps may lose up to one level: within 1 + 0.6 levels
    assert out.min() == pytest.approx(0.6 * 89.5, abs=1.6) and out.max() == pytest.approx(0.6 * 188.5, abs=1.6)
    assert out.mean() == pytest.approx(0.6 * 139, abs=1.6)


def test_the_simulated_inspector_writes_the_truth_through_the_review_log(synthetic_root: Path, trained_run: Path,
                                                                         tmp_path: Path):
    from dualstpm.detector import Detector
    from dualstpm.predict import predict
    from dualstpm.review.log import ReviewLog
    from dualstpm.rundir import review_dir

    split = plan_split(synthetic_root, CATEGORY, holdout_good=2, line_defects=2, seed=0)
    batch = write_line_batch(split, tmp_path / "batch", seed=0)
    table = predict(Detector.load(trained_run, device="cpu"), sorted((tmp_path / "batch").iterdir()), tmp_path / "preds")
    counts = review_from_truth(tmp_path / "preds", trained_run, batch, base=tmp_path)
    entries = ReviewLog(review_dir(tmp_path / "preds")).refresh().entries
    assert len(entries) == counts["verdicts"] == 4
    assert counts["good"] == 2 and counts["defective"] == 2
    for entry in entries:
        truth = batch.parts[Path(entry["image"]).name]
        assert entry["verdict"] == truth.truth and entry["reviewer"] == REVIEWER
        if truth.truth == DEFECTIVE:  # the note's first word is the defect type: feedback files the part under it
            assert entry["note"].split()[0] == truth.defect_type
            mask = np.asarray(Image.open(review_dir(tmp_path / "preds") / entry["mask"])) > 0
            assert np.array_equal(mask, np.asarray(Image.open(truth.mask)) > 127)
        else:
            assert entry["mask"] is None
    labels = dict(zip(table["path"].map(lambda p: Path(p).name), table["label"]))
    assert counts["overruled"] == sum(labels[n] != p.truth for n, p in batch.parts.items())


# --------------------------------------------------------------------------- the whole demo (slow)


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_the_loop_demo_end_to_end_on_battery_weld(shared_data: Path, tmp_path: Path):
    from mlflow import MlflowClient

    from dualstpm.data.images import read_mask
    from dualstpm.mlops.hashing import data_hash

    out, results = tmp_path / "loop", tmp_path / "results"
    holdout, defects = 4, 4
    command = [sys.executable, "-m", "studies.loop_demo", str(out), "--data-root", str(shared_data),
               "--category", "battery_weld", "--image-size", "64", "--epochs", "1", "--holdout-good", str(holdout),
               "--line-defects", str(defects), "--results", str(results), "--set", "fit.device=cpu",
               "--set", "ablation.panel_images=0", "--set", "ablation.bootstrap=20",
               "--set", "tracking.promotion_floor=0"]  # so that v1 is champion and v2 must beat it on evidence
    done = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=3600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    summary = json.loads((out / "loop_demo.json").read_text())
    assert json.loads((results / "loop_demo.json").read_text())["data"] == summary["data"]
    assert "| step | figure | value |" in (results / "loop_demo.md").read_text()
    category = out / "data" / "battery_weld"
    truth = json.loads((out / "line" / "truth.json").read_text())
    assert len(truth) == holdout + defects
    assert sum(p["truth"] == "good" for p in truth.values()) == holdout

    # the review: one verdict per scored part, each the ground truth, defects with their masks
    line = pd.read_csv(out / "preds" / "batch-1" / "predictions.csv")
    verdicts = [json.loads(x) for x in (out / "preds" / "batch-1" / "review" / "verdicts.jsonl").read_text().splitlines()]
    assert len(verdicts) == len(line) == holdout + defects
    assert {Path(v["image"]).name: v["verdict"] for v in verdicts} == {n: p["truth"] for n, p in truth.items()}
    masked = sum(1 for p in truth.values() if p["mask"] and read_mask(Path(p["mask"])).any())
    assert sum(v["mask"] is not None for v in verdicts) == masked

    # the feedback: every part copied once (the line holds no part the category had), good ones
    # into train/good (battery_weld has no validation/good), defective ones into validation/defective
    provenance = [json.loads(x) for x in (category / "feedback.jsonl").read_text().splitlines()]
    assert len(provenance) == len(verdicts)
    for row in provenance:
        folder = "train/good" if row["verdict"] == "good" else "validation/defective"
        assert str(Path(row["path"]).parent) == folder and (category / row["path"]).is_file()
    assert len(list((category / "train" / "good").iterdir())) == summary["data"]["train_good"] + holdout

    # a new DVC data version, committed: the .dvc file's md5 changed between the two commits, and
    # it is the hash of the category as it is now (the md5 `dvc add` records is mlops.hashing.data_hash)
    assert len(_git(out, "log", "--format=%H").split()) == 2
    before = yaml.safe_load(_git(out, "show", "HEAD~1:data/battery_weld.dvc"))["outs"][0]["md5"]
    after = yaml.safe_load(_git(out, "show", "HEAD:data/battery_weld.dvc"))["outs"][0]["md5"]
    assert before != after and after == data_hash(out / "data", "battery_weld")
    assert summary["data"]["dvc_md5"] == [before, after]
    assert _git(out, "status", "--porcelain") == ""

    # the registry: v1 tested on the first version, v2 on the second; champion moved iff promoted
    store = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name = "dualstpm-data-battery_weld"
    versions = {str(v.version): v for v in client.search_model_versions(f"name='{name}'")}
    assert sorted(versions) == ["1", "2"]
    assert versions["1"].tags["dualstpm.data_hash"] == before and versions["2"].tags["dualstpm.data_hash"] == after
    assert versions["1"].tags["promotion.promoted"] == "True"  # the first champion, floor 0
    promoted = versions["2"].tags["promotion.promoted"] == "True"
    champion = str(client.get_model_version_by_alias(name, "champion").version)
    assert champion == ("2" if promoted else "1")
    assert summary["retrain"]["promoted"] == promoted and summary["retrain"]["champion_after"] == champion
    assert summary["retrain"]["reason"] == versions["2"].tags["promotion.reason"]
    if promoted:  # only on evidence: the challenger's metric beat the champion's
        assert float(versions["2"].tags["promotion.challenger_value"]) > float(versions["2"].tags["promotion.champion_value"])
    assert summary["retrain"]["same_test_split"] is True  # feedback never touches test/

    # false alarms on the reviewed good parts: v1's labels on the line, v2's on the same images
    good_names = {n for n, p in truth.items() if p["truth"] == "good"}
    v1_good = line[line["path"].map(lambda p: Path(p).name in good_names)]
    v2_good = pd.read_csv(out / "preds" / "v2" / "reviewed-good" / "predictions.csv")
    assert sorted(v2_good["path"].map(lambda p: Path(p).name)) == sorted(good_names)
    reviewed = summary["false_alarms"]["reviewed_good"]
    assert reviewed["v1"]["flagged"] == int((v1_good["label"] == "defective").sum())
    assert reviewed["v2"]["flagged"] == int((v2_good["label"] == "defective").sum())
    assert reviewed["v1"]["n"] == reviewed["v2"]["n"] == holdout

    # the monitor: both batches are the test split's good parts, the alarm exactly when a bound is crossed
    monitor = json.loads((out / "monitor" / "monitor.json").read_text())
    n_good = len(list((category / "test" / "good").iterdir()))
    batches = {b["name"]: b for b in monitor["batches"]}
    assert sorted(batches) == ["normal", "shifted"]
    bounds = monitor["bounds"]
    for batch in batches.values():
        assert batch["n_scored"] == n_good
        drifted = batch["drift"]["ks_pvalue"] < bounds["ks_p"] and batch["drift"]["ks_statistic"] > bounds["ks_statistic"]
        # input drift: a statistic's KS p below ks_p / 2 (Bonferroni over brightness and contrast) and KS above the bound
        inputs = batch["inputs"]["statistics"].values()
        input_drift = any(f["ks_pvalue"] < bounds["ks_p"] / 2 and f["ks_statistic"] > bounds["ks_statistic"] for f in inputs)
        assert batch["inputs"]["drift"] == input_drift
        assert batch["crossed"] == (drifted or input_drift or batch["alarms"]["alarm_pvalue"] < bounds["alarm_p"])
    # the darker, flatter batch's images part from the training images' (the shift halves brightness and contrast)
    assert batches["shifted"]["inputs"]["drift"] is True
    assert summary["monitor"]["exit"] == (3 if any(b["crossed"] for b in batches.values()) else 0)
    assert summary["monitor"]["batches"]["shifted"]["ks_statistic"] == batches["shifted"]["drift"]["ks_statistic"]
