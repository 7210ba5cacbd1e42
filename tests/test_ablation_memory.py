"""The memory views offered to the ablation like the six-map fusions (issue 22, item 3): on a
model with a memory bank the grid ends with `memory` and `fused_memory`, scored from the
stored memory maps, and an adopted memory view is what the model decides with, at its
recalibrated threshold. The tiny synthetic run of the memory tests; expected values by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES

from dualstpm.compute import Compute

pytestmark = pytest.mark.filterwarnings("ignore")
TOPK = 41  # score.topk 0.01 of a 64 x 64 map: round(40.96) = 41 pixels averaged
FEW = dict(panel_images=2, level_subsets=[], sweep_modes=[], normalizations=["none"])  # the named fusions only


def topk_mean_by_hand(maps: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N,): the mean of each map's 41 largest values."""
    flat = np.sort(maps.reshape(len(maps), -1).astype(np.float64), axis=1)
    return flat[:, -TOPK:].mean(axis=1)


def auroc_by_hand(labels: np.ndarray, scores: np.ndarray) -> float:
    """The share of (defective, good) pairs ranked right, ties counting half."""
    bad, good = scores[labels == 1], scores[labels == 0]
    wins = (bad[:, None] > good[None, :]).sum() + 0.5 * (bad[:, None] == good[None, :]).sum()
    return float(wins / (len(bad) * len(good)))


@pytest.fixture(scope="module")
def tested_memory_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    """A model with a memory bank deciding with `fused` (the default view), tested: maps stored."""
    from dualstpm.config import load_params
    from dualstpm.evaluation import test_run
    from dualstpm.training import fit

    run = tmp_path_factory.mktemp("ablation_memory") / "run"
    fit(load_params(None, [*TINY_OVERRIDES, "fit.epochs=1", "memory.enabled=true"]), synthetic_root,
        "synth_texture", run)
    test_run(run, synthetic_root, "synth_texture", Compute.resolve("cpu", "float32"))
    return run


def test_the_grid_offers_the_memory_views_only_on_a_model_with_a_bank():
    from dualstpm.ablation import build_grid
    from dualstpm.config import AblationParams

    plain, with_bank = build_grid(AblationParams(**FEW)), build_grid(AblationParams(**FEW), memory=True)
    assert [c.name for c in plain] == ["published", "branch_A", "branch_B", "sum_all", "product_all"]
    assert [c.name for c in with_bank] == [c.name for c in plain] + ["memory", "fused_memory"]
    memory = with_bank[-2]
    assert (memory.group, memory.spec, memory.view, memory.levels) == ("memory", "memory", "memory", "")
    assert np.isnan(memory.branch_weight) and memory.row()["mode"] == "memory"
    assert all(c.view is None for c in plain)


def test_the_memory_rows_are_scored_from_the_stored_memory_maps(tested_memory_run: Path, tmp_path: Path):
    from dualstpm.ablation import ablate
    from dualstpm.config import AblationParams
    from dualstpm.maps import MapSet
    from dualstpm.model.fusion import FusionSpec, fuse

    run = tmp_path / "run"
    shutil.copytree(tested_memory_run, run)
    result = ablate(run, AblationParams(**FEW))
    rows = result.table.set_index("name")
    assert list(rows.index[-2:]) == ["memory", "fused_memory"]
    assert set(rows.loc[["memory", "fused_memory"], "group"]) == {"memory"}

    test = MapSet.load(run / "maps" / "test.npz")
    labels = test.labels.astype(int)
    memory = test.memory.astype(np.float32)
    assert rows.loc["memory", "image_auroc"] == pytest.approx(auroc_by_hand(labels, topk_mean_by_hand(memory)),
                                                              abs=1e-9)
    # fused_memory: (fused - mean) / std + (memory - mean) / std, the calibration's moments
    stats = json.loads((run / "model" / "calibration.json").read_text())["memory_stats"]
    (fm, fs), (mm, ms) = stats["fused"], stats["memory"]
    from dualstpm.detector import read_model_dir

    map_stats = read_model_dir(run)[2].map_stats
    fused = fuse(torch.from_numpy(test.maps.astype(np.float32)), FusionSpec(), map_stats).numpy()
    combined = (fused - fm) / fs + (memory - mm) / ms
    assert rows.loc["fused_memory", "image_auroc"] == pytest.approx(
        auroc_by_hand(labels, topk_mean_by_hand(combined)), abs=1e-6)
    # the selection set has the memory maps too: every memory row has its validation figures
    assert rows.loc[["memory", "fused_memory"], ["val_image_auroc", "val_pixel_auroc"]].notna().all().all()
    summary = json.loads((run / "ablation" / "summary.json").read_text())
    assert summary["n_configurations"] == 7
    # 20 images less 16 for training: 4 validation images, 2 select: too few to adopt anything
    assert summary["applied"] is False and summary["decision_view"] == "fused"


def test_an_adopted_memory_view_is_what_the_model_decides_with(tested_memory_run: Path, tmp_path: Path,
                                                                synthetic_root: Path):
    """What `ablate` writes when it adopts `memory`: the detector, predict's outputs and the
    test then decide with `memory` at the threshold recalibrated on the calibration part."""
    from dualstpm.ablation.grid import Config
    from dualstpm.ablation.run import chosen_fusion
    from dualstpm.ablation.selection import subset
    from dualstpm.data import decode_images, validation_parts
    from dualstpm.detector import Detector, read_model_dir, write_chosen_fusion
    from dualstpm.evaluation import test_run
    from dualstpm.maps import MapSet
    from dualstpm.model.fusion import FusionSpec
    from dualstpm.model.inference import MapViews

    run = tmp_path / "run"
    shutil.copytree(tested_memory_run, run)
    _, params, calibration = read_model_dir(run)
    val = MapSet.load(run / "maps" / "val.npz")
    parts = validation_parts(len(val), params.calibration.split, params.seed)
    views = MapViews(FusionSpec(), calibration.map_stats, score=calibration.score, memory=calibration.memory_stats)
    choice = chosen_fusion(Config("memory", "memory", "memory"), subset(val, parts.calibration), views,
                           calibration.false_alarm_rate, {"config": "memory"}, calibration.pixel_fpr)
    # 2 calibration images at a 1 % false-alarm rate: too few for the rate, so the threshold is their maximum
    scores = topk_mean_by_hand(val.memory[parts.calibration].astype(np.float32))
    assert len(parts.calibration) == 2
    assert choice.threshold == pytest.approx(scores.max(), rel=1e-6)
    assert choice.val_min == pytest.approx(scores.min(), rel=1e-6)
    assert (choice.view, choice.spec) == ("memory", None)
    write_chosen_fusion(run, choice)
    stored = json.loads((run / "model" / "fusion.json").read_text())
    assert (stored["view"], stored["fusion"], stored["applied"]) == ("memory", None, True)

    detector = Detector.load(run, Compute.resolve("cpu", "float32"))
    assert detector.decision_view == "memory" and detector.threshold == choice.threshold
    assert detector.spec == FusionSpec()  # no fusion was chosen: the fused view stays params.fusion
    assert "chosen" not in detector.views
    images = decode_images([Path(p) for p in val.paths], 64)
    out = detector.infer(images)
    memory_maps = detector.score(images, ("memory",)).maps["memory"]
    torch.testing.assert_close(out.anomaly_map, memory_maps)
    by_hand = torch.from_numpy(topk_mean_by_hand(memory_maps.numpy())).float()
    torch.testing.assert_close(out.score, by_hand, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.label, out.score > choice.threshold)

    metrics = test_run(run, synthetic_root, "synth_texture", Compute.resolve("cpu", "float32"))
    assert metrics["default"] == "memory" and metrics["chosen_fusion"] == "memory"
    assert metrics["memory"]["threshold"] == choice.threshold


def test_a_chosen_view_and_its_fusion_must_go_together():
    from dualstpm.detector import ChosenFusion
    from dualstpm.model.fusion import FusionSpec

    with pytest.raises(ValueError, match="got view 'memory' with fusion"):
        ChosenFusion(FusionSpec(), 1.0, {}, 0.0, view="memory")
    with pytest.raises(ValueError, match="got view 'chosen' with fusion None"):
        ChosenFusion(None, 1.0, {}, 0.0)
    with pytest.raises(ValueError, match="got view 'disc'"):
        ChosenFusion(None, 1.0, {}, 0.0, view="disc")
    # a fusion.json of an earlier dualstpm has no "view": it is a chosen fusion
    earlier = {"applied": True, "fusion": {"mode": "sum", "weights": [[1, 1, 1], [0, 0, 0]], "normalize": "none",
                                           "sigma": 0}, "threshold": 2.0, "source": {}, "val_min": 1.0}
    read = ChosenFusion.from_json(earlier)
    assert read.view == "chosen" and read.spec.mode == "sum" and read.pixel_threshold is None


def test_the_outcome_line_names_an_adopted_memory_view():
    from dualstpm.ablation import describe_outcome
    from dualstpm.detector import decision_view

    assert decision_view("fused", "memory") == "memory" and decision_view("disc", "memory") == "disc"

    def summary(view: str) -> dict:
        return {"applied": True, "decision_view": view, "chosen_view": "memory",
                "fused_chosen": {"config": "memory", "adopted": True}}

    assert describe_outcome(summary("memory")) == "adopted memory: the model now decides with its `memory` view"
    assert describe_outcome(summary("disc")) == (
        "adopted memory, its `memory` view recalibrated; the model decides with `disc` (fusion.view), "
        "which the choice does not change")
