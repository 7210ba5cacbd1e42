"""The fusion-weight ablation (issue 5): stored maps, the grid, choosing without peeking,
applying the choice, the cross-category report. Synthetic data, the tiny trained run."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dualstpm import metrics
from dualstpm.ablation import ablate, ablation_report, build_grid, report_metrics
from dualstpm.ablation.defects import paste_defects
from dualstpm.ablation.rescore import SplitScorer
from dualstpm.ablation.run import chosen_fusion
from dualstpm.config import AblationParams, load_params
from dualstpm.data import decode_images
from dualstpm.detector import Detector, read_model_dir, write_chosen_fusion
from dualstpm.errors import RunError
from dualstpm.evaluation import test_run
from dualstpm.maps import MapSet
from dualstpm.model.fusion import FusionSpec, MapStats, ScoreSpec, fuse
from dualstpm.model.inference import MapViews

HEADLINE = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
PARAMS = AblationParams(panel_images=2)


def headline(row) -> dict:
    return {m: row[m] for m in HEADLINE}


@pytest.fixture(scope="module")
def ablated(trained_run: Path, synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A copy of the trained run, tested (maps stored) and ablated with the default grid."""
    run = tmp_path_factory.mktemp("ablated") / "run"
    shutil.copytree(trained_run, run)
    before = test_run(run, synthetic_root, "synth_texture")
    return run, before, ablate(run, PARAMS)


# --------------------------------------------------------------------------- the grid


def test_default_grid_is_the_issues_grid():
    configs = build_grid(AblationParams())
    # (5 named + 6 level subsets x 3 modes + 11 branch weights x 2 modes) x 2 normalisations
    assert len(configs) == (5 + 6 * 3 + 11 * 2) * 2
    assert configs[0].name == "published" and configs[0].spec == FusionSpec()
    assert len({c.name for c in configs}) == len(configs)
    sweep = [c for c in configs if c.group == "sweep" and c.spec.mode == "sum" and c.spec.normalize == "none"]
    assert [c.branch_weight for c in sweep] == pytest.approx([k / 10 for k in range(11)])


def test_grid_follows_the_params():
    params = AblationParams(level_modes=["sum"], level_subsets=[[1, 3]], sweep_modes=["product"],
                            branch_weight_step=0.5, normalizations=["val_stats"])
    configs = build_grid(params, sigma=2.0)
    assert len(configs) == 5 + 1 + 3
    assert {c.spec.normalize for c in configs} == {"val_stats"} and {c.spec.sigma for c in configs} == {2.0}
    level = next(c for c in configs if c.group == "levels")
    assert level.spec.weights == ((1.0, 0.0, 1.0), (1.0, 0.0, 1.0)) and level.levels == "1,3"


def test_table_has_one_row_per_configured_configuration(ablated):
    run, _, result = ablated
    assert len(result.table) == len(build_grid(PARAMS)) == result.summary["n_configurations"]
    on_disk = (run / "ablation" / "table.csv").read_text().splitlines()
    assert len(on_disk) == len(result.table) + 1
    for column in ("name", "mode", "normalize", "weights", "branch_weight", *HEADLINE, "selection_score"):
        assert column in on_disk[0].split(",")
    assert result.table["chosen"].sum() == 1 and result.table["oracle"].sum() == 1
    for name in ("branch_weight_heatmap.png", "six_map_panel.png", "summary.json"):
        assert (run / "ablation" / name).stat().st_size > 0


# --------------------------------------------------------------------------- exactness


def test_branch_A_alone_equals_testing_branch_A(ablated):
    _, before, result = ablated
    rows = result.table.set_index("name")
    assert headline(rows.loc["branch_A"]) == headline(before["stpm"])
    assert headline(rows.loc["branch_B"]) == headline(before["recon"])
    assert headline(rows.loc["published"]) == headline(before["fused"])
    assert result.summary["stpm_alone"] == {"config": "branch_A", **headline(before["stpm"])}


@pytest.mark.parametrize("mode", ["product", "sum", "product_all"])
@pytest.mark.parametrize("normalize", ["none", "val_stats"])
def test_weight_zero_ignores_that_branch_exactly(mode: str, normalize: str):
    maps = torch.rand(3, 2, 3, 8, 8, generator=torch.Generator().manual_seed(1)) + 0.05
    garbage = maps.clone()
    garbage[:, 1] = torch.rand_like(garbage[:, 1]) * 50
    stats = MapStats(torch.rand(2, 3) + 0.5, torch.rand(2, 3) + 0.5)
    spec = FusionSpec(mode, ((0.3, 0.3, 0.3), (0.0, 0.0, 0.0)), normalize)
    assert torch.equal(fuse(maps, spec, stats), fuse(garbage, spec, stats))


def test_weight_zero_ignores_that_branch_in_the_stored_maps(ablated):
    run, _, result = ablated
    test = MapSet.load(run / "maps" / "test.npz")
    garbage = test.maps.copy()
    garbage[:, 1] = np.random.default_rng(0).uniform(0, 2, garbage[:, 1].shape).astype(np.float16)
    calibration = read_model_dir(run)[2]
    stats = calibration.map_stats
    views = MapViews(FusionSpec(), stats, score=calibration.score)
    original = SplitScorer(test, views)
    changed = SplitScorer(dataclasses.replace(test, maps=garbage), views)
    for config in build_grid(PARAMS):
        if config.branch_weight == 0.0:
            assert changed.score(config.spec) == original.score(config.spec), config.name
    rows = result.table.set_index("name")
    assert headline(rows.loc["wB_0_product"]) == headline(rows.loc["branch_A"])


def test_pixel_truth_prepared_once_gives_the_same_metrics():
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 16, 16), bool)
    masks[1, 2:6, 3:9] = masks[2, 10:14, 10:12] = masks[2, 0:2, 0:2] = True
    truth = metrics.PixelTruth(masks)
    for _ in range(3):
        maps = rng.random((4, 16, 16)).astype(np.float32) + masks
        assert metrics.pixel_metrics(truth, maps) == (metrics.pixel_auroc(masks, maps), metrics.aupro(masks, maps))


# --------------------------------------------------------------------------- choosing without peeking


def test_the_choice_never_depends_on_test_data(ablated, tmp_path: Path):
    run, _, result = ablated
    other = tmp_path / "run"
    shutil.copytree(run, other)
    test = MapSet.load(other / "maps" / "test.npz")
    rng = np.random.default_rng(7)
    scrambled = dataclasses.replace(
        test,
        maps=rng.uniform(0, 1, test.maps.shape).astype(np.float16),
        labels=rng.permutation(test.labels),
        masks=rng.random(test.masks.shape) < 0.1,
    )
    scrambled.save(other / "maps" / "test.npz")
    again = ablate(other, PARAMS)
    assert again.summary["fused_chosen"]["config"] == result.summary["fused_chosen"]["config"]
    assert again.table["selection_score"].tolist() == result.table["selection_score"].tolist()
    assert again.table["image_auroc"].tolist() != result.table["image_auroc"].tolist()  # the test data did change


def test_synthetic_defects_are_seeded_with_exact_masks(synthetic_root: Path):
    paths = sorted((synthetic_root / "synth_texture" / "train" / "good").iterdir())[:4]
    images = decode_images(paths, 64)
    defective, masks, kinds = paste_defects(images, ["cutpaste", "scratch"], 2, seed=3)
    assert defective.shape == (8, 3, 64, 64) and masks.shape == (8, 64, 64)
    assert kinds == ["cutpaste", "scratch"] * 4
    again, masks_again, _ = paste_defects(images, ["cutpaste", "scratch"], 2, seed=3)
    assert torch.equal(defective, again) and np.array_equal(masks, masks_again)
    for index in range(8):
        source = images[index // 2]
        outside = torch.from_numpy(~masks[index])
        assert masks[index].any()
        assert torch.allclose(defective[index][:, outside], source[:, outside], atol=1e-6)  # nothing outside the mask
        assert not torch.allclose(defective[index][:, ~outside], source[:, ~outside], atol=1e-3)


# --------------------------------------------------------------------------- applying the choice


def test_the_applied_choice_decides_and_test_keeps_params_fusion_as_fused(ablated, synthetic_root: Path,
                                                                          tmp_path: Path):
    run, before, result = ablated
    chosen = int(np.flatnonzero(result.table["chosen"])[0])
    applied = result.summary["applied"]
    assert applied == (result.summary["fused_chosen"]["adopted"] and result.table["name"][chosen] != "published")
    assert Detector.load(run).spec == (build_grid(PARAMS)[chosen].spec if applied else FusionSpec())
    other = tmp_path / "run"
    shutil.copytree(run, other)
    retested = test_run(other, synthetic_root, "synth_texture")
    assert retested["fused"] == before["fused"]  # the fused row never depends on the ablation
    assert retested["default"] == ("chosen" if applied else "fused") == result.summary["decision_view"]
    assert ("chosen" in retested) == applied

    # Apply a configuration that certainly differs from the trained fusion, as ablate does when it adopts one.
    config = next(c for c in build_grid(PARAMS) if c.name == "levels_2_sum+val_stats")
    calibration = read_model_dir(other)[2]
    val = MapSet.load(other / "maps" / "val.npz")
    views = MapViews(FusionSpec(), calibration.map_stats, score=calibration.score)
    write_chosen_fusion(other, chosen_fusion(config, val, views, calibration.false_alarm_rate, {"config": config.name}))
    detector = Detector.load(other)
    assert detector.spec == config.spec and detector.threshold != calibration.thresholds["fused"]
    assert detector.decision_view == "chosen" and detector.view_spec("fused") == FusionSpec()
    assert detector.view_spec("stpm") == FusionSpec().view("stpm")  # the branch views stay as trained
    trained = Detector(detector.model, detector.params, detector.calibration, detector.compute)  # no choice
    images = decode_images([Path(p) for p in val.paths[:2]], 64)
    assert not torch.equal(detector.score(images, ("chosen",)).scores["chosen"], trained.score(images).scores["fused"])
    # every view by its test name: `fused` stays the params' fusion, `chosen` is what the model decides with
    views = detector.score(images, detector.views)
    assert list(views.scores) == list(detector.views) == ["fused", "stpm", "recon", "chosen"]
    assert torch.equal(views.scores["fused"], trained.score(images).scores["fused"])
    assert torch.equal(views.scores["chosen"], detector.infer(images).score)
    with pytest.raises(RunError, match="no view 'chosen'"):
        trained.score(images, ("chosen",))

    after = test_run(other, synthetic_root, "synth_texture")
    row = result.table.set_index("name").loc[config.name]
    assert after["chosen_fusion"] == config.name and after["default"] == "chosen"
    assert headline(after["chosen"]) == headline(row)
    assert after["fused"] == before["fused"]  # identical, although a different fusion is applied
    assert headline(after["stpm"]) == headline(before["stpm"])

    # apply=false records the choice but leaves the trained fusion in charge
    ablate(other, AblationParams(panel_images=0, apply=False, level_subsets=[], sweep_modes=[], normalizations=["none"]))
    assert Detector.load(other).spec == FusionSpec() and Detector.load(other).chosen is None
    assert json.loads((other / "model" / "fusion.json").read_text())["applied"] is False


def test_the_summary_reports_the_adoption_margin(ablated):
    _, _, result = ablated
    summary, table = result.summary, result.table
    margin = summary["margin"]
    assert margin["n_resamples"] <= PARAMS.bootstrap and margin["confidence"] == PARAMS.confidence
    assert margin["metric"] == PARAMS.select_metric and margin["n_units"] == summary["selection_set"][
        "normal_validation_images"]
    assert margin["min_units"] == 5  # ceil(log2(1 / 0.05)) at confidence 0.95
    enough = margin["n_units"] >= margin["min_units"]
    assert margin["adopted"] == (margin["lower_bound"] > 0 and enough) == summary["fused_chosen"]["adopted"]
    assert ("cannot show a gain" in margin["decision"]) == (not enough)
    assert margin["decision"].startswith("adopted" if margin["adopted"] else "kept the default")
    candidate, chosen = (table["name"][table[c]].item() for c in ("candidate", "chosen"))
    assert summary["candidate"]["config"] == candidate
    assert summary["default"]["config"] == "published"  # params.fusion is the grid's published fusion
    assert chosen == (candidate if margin["adopted"] else "published")
    assert summary["fused_chosen"]["config"] == chosen


def test_stale_or_missing_maps_are_refused(ablated, tmp_path: Path):
    run, _, _ = ablated
    other = tmp_path / "run"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("maps"))
    with pytest.raises(RunError, match="dualstpm test"):
        ablate(other, PARAMS)
    shutil.copytree(run / "maps", other / "maps")
    test = MapSet.load(other / "maps" / "test.npz")
    dataclasses.replace(test, meta={**test.meta, "weights_sha256": "0" * 64}).save(other / "maps" / "test.npz")
    with pytest.raises(RunError, match="another model"):
        ablate(other, PARAMS)


def test_maps_file_round_trip(tmp_path: Path):
    rng = np.random.default_rng(0)
    masks = rng.random((3, 7, 7)) < 0.3  # 147 bits: not a multiple of 8
    stored = MapSet(rng.random((3, 2, 3, 7, 7)).astype(np.float16), np.array([0, 1, 1], np.int8),
                    np.array(["good", "a", "b"]), np.array(["x.png", "y.png", "z.png"]), masks, {"split": "test"})
    loaded = MapSet.load(stored.save(tmp_path / "t.npz"))
    assert np.array_equal(loaded.maps, stored.maps) and np.array_equal(loaded.masks, masks)
    assert loaded.defect_types.tolist() == ["good", "a", "b"] and loaded.meta["split"] == "test"
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(RunError, match="dualstpm test"):
        MapSet.load(tmp_path / "bad.npz")


# --------------------------------------------------------------------------- across categories


def test_ablation_report_compares_stpm_published_chosen_and_oracle(ablated, tmp_path: Path):
    run, before, result = ablated
    second = tmp_path / "second"
    shutil.copytree(run, second)
    summary = json.loads((second / "ablation" / "summary.json").read_text())
    summary["category"] = "second"
    (second / "ablation" / "summary.json").write_text(json.dumps(summary))
    table = ablation_report([run, second])
    assert table["category"].tolist() == ["synth_texture"] * 4 + ["second"] * 4 + ["mean"] * 4
    assert table["model"].tolist()[:4] == ["stpm", "fused_published", "fused_chosen", "oracle"]
    rows = table.set_index(["category", "model"])
    assert rows.loc[("synth_texture", "stpm"), "image_auroc"] == before["stpm"]["image_auroc"]
    assert rows.loc[("mean", "fused_chosen"), "aupro"] == pytest.approx(result.summary["fused_chosen"]["aupro"])
    assert report_metrics(table)["synth_texture"]["oracle"]["aupro"] == result.summary["oracle"]["aupro"]
    with pytest.raises(RunError, match="dualstpm ablate"):
        ablation_report([tmp_path])


def test_ablation_reports_the_score_reductions_without_applying_one(ablated):
    """The score-reduction table re-scores the trained fusion's stored maps: the row of the
    model's own reduction is the grid's `published` row (same fusion, same reduction), and
    nothing changes the model's reduction."""
    run, _, result = ablated
    table = pd.read_csv(run / "ablation" / "score_reductions.csv")
    assert list(table["name"]) == ["max", "topk_mean(topk=0.001)", "topk_mean(topk=0.01)", "topk_mean(topk=0.05)",
                                   "smoothed_max(sigma=2)", "smoothed_max(sigma=4)", "smoothed_max(sigma=8)"]
    model_score = ScoreSpec.from_params(read_model_dir(run)[1].score)  # what the run was fitted with (the default)
    assert list(table["model"]) == [name == model_score.label for name in table["name"]]
    published = result.table.set_index("name").loc["published"]  # the grid is scored with the model's reduction
    own_row = table.set_index("name").loc[model_score.label]
    for column in ("image_auroc", "image_f1_max", "val_image_auroc", "val_image_f1_max"):
        assert own_row[column] == pytest.approx(published[column], abs=1e-12), column
    summary = result.summary["score_reductions"]
    assert summary["file"] == "score_reductions.csv" and len(summary["rows"]) == 7
    assert summary["best_on_validation_image_auroc"] in set(table["name"])
    assert read_model_dir(run)[2].score == model_score and Detector.load(run).score_spec == model_score


def test_the_reduction_grid_keeps_what_fits_the_map_and_adds_the_model_reduction():
    from dualstpm.ablation.reductions import table_reductions

    # at 32 px a sigma of 8 blurs with a radius of 32 px: no longer below the map size
    assert [r.label for r in table_reductions(32, ScoreSpec("max"))][-1] == "smoothed_max(sigma=4)"
    own = ScoreSpec("topk_mean", topk=0.02)
    assert table_reductions(64, own)[-1] == own and len(table_reductions(64, own)) == 8


def test_ablation_params_are_validated():
    from dualstpm.errors import ConfigError

    with pytest.raises(ConfigError, match="branch_weight_step"):
        load_params(None, ["ablation.branch_weight_step=0.3"])
    with pytest.raises(ConfigError, match="level_subsets"):
        load_params(None, ["ablation.level_subsets=[[4]]"])
    with pytest.raises(ConfigError, match="ablation.apply"):
        load_params(None, ["ablation.aply=true"])


# --------------------------------------------------------------------------- the command line


def test_a_summary_an_earlier_version_wrote_is_refused_naming_the_fix(tmp_path: Path):
    from dualstpm.ablation import read_summary
    from dualstpm.errors import RunError

    (tmp_path / "ablation").mkdir()
    earlier = {"applied": False, "fused_chosen": {"config": "published", "adopted": False}}  # no decision_view
    (tmp_path / "ablation" / "summary.json").write_text(json.dumps(earlier))
    with pytest.raises(RunError, match=r"summary\.json has no decision_view: .*run `dualstpm ablate --run .*` again"):
        read_summary(tmp_path)


@pytest.mark.slow  # three CLI processes, each importing torch and MLflow
def test_the_decision_view_and_the_outcome_line_say_what_the_model_decides_with():
    from dualstpm.ablation import describe_outcome
    from dualstpm.detector import decision_view

    # an applied fusion replaces `fused` only; a model deciding with another view keeps it
    assert decision_view("fused", "chosen") == "chosen" and decision_view("fused", None) == "fused"
    assert decision_view("disc", "chosen") == "disc" and decision_view("stpm", "chosen") == "stpm"

    def summary(applied: bool, adopted: bool, view: str) -> dict:
        return {"applied": applied, "decision_view": view, "fused_chosen": {"config": "levels_2_sum", "adopted": adopted}}

    assert describe_outcome(summary(True, True, "chosen")) == (
        "adopted levels_2_sum: the model now decides with its `chosen` view")
    assert describe_outcome(summary(True, True, "disc")) == (
        "adopted levels_2_sum, stored as the model's `chosen` view; the model decides with `disc` (fusion.view), "
        "which the choice does not change")
    assert describe_outcome(summary(False, True, "fused")) == (
        "levels_2_sum was adopted but not applied (ablation.apply=false): the model decides with `fused`")
    assert describe_outcome(summary(False, False, "recon")) == (
        "kept the default (levels_2_sum): the model decides with `recon`")


def test_ablate_through_the_cli_logs_to_mlflow(trained_run: Path, synthetic_root: Path, tmp_path: Path):
    import os
    import subprocess
    import sys

    from conftest import PROJECT_ROOT

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("maps", "ablation", "mlflow_run.json"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PREFECT_HOME": str(tmp_path)}

    def dualstpm(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dualstpm", *args], cwd=PROJECT_ROOT, env=env,
                              capture_output=True, text=True, timeout=600)

    refused = dualstpm("ablate", "--run", str(run))
    assert refused.returncode == 2 and "dualstpm test" in refused.stderr and "Traceback" not in refused.stderr
    assert dualstpm("test", "--run", str(run), "--data-root", str(synthetic_root)).returncode == 0
    done = dualstpm("ablate", "--run", str(run), "--set", "ablation.panel_images=0", "--set", "ablation.sweep_modes=[sum]")
    assert done.returncode == 0, done.stderr
    assert "STPM alone" in done.stdout and "oracle" in done.stdout
    said = " ".join(done.stdout.split())  # rich wraps at the terminal's width
    applied = json.loads((run / "ablation" / "summary.json").read_text())["applied"]
    assert ("the model now decides with its `chosen` view" in said) == applied
    assert ("the model decides with `fused`" in said) == (not applied)
    assert ("was measured before this choice" in said) == applied
    report = dualstpm("ablate-report", str(run), "--out", str(tmp_path / "a.csv"), "--metrics", str(tmp_path / "a.json"))
    assert report.returncode == 0, report.stderr
    assert set(json.loads((tmp_path / "a.json").read_text())) == {"synth_texture", "mean"}

    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    logged = client.get_run(json.loads((run / "mlflow_run.json").read_text())["run_id"])
    summary = json.loads((run / "ablation" / "summary.json").read_text())
    assert logged.data.metrics["ablation.fused_chosen.aupro"] == summary["fused_chosen"]["aupro"]
    assert logged.data.tags["dualstpm.ablation.chosen"] == summary["fused_chosen"]["config"]
    assert {a.path for a in client.list_artifacts(logged.info.run_id, "ablation")} >= {
        "ablation/table.csv", "ablation/table.json", "ablation/summary.json",
        "ablation/overlays.png"}  # the overlays in the model's decision view after the choice


def test_product_all_multiplies_every_weighted_map():
    maps = torch.rand(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(2)) + 0.1
    weights = ((1.0, 0.0, 2.0), (0.5, 1.0, 0.0))
    expected = maps[:, 0, 0] * 2 * maps[:, 0, 2] * 0.5 * maps[:, 1, 0] * maps[:, 1, 1]
    torch.testing.assert_close(fuse(maps, FusionSpec("product_all", weights)), expected)
