"""The memory view in the product (issue 22, item 3): `memory.enabled` builds a memory bank at
fit, and the views `memory` and `fused_memory` are calibrated, tested, decided with and exported."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_OVERRIDES

from dualstpm.compute import Compute
from dualstpm.errors import ConfigError, RunError

pytestmark = pytest.mark.filterwarnings("ignore")
MEMORY_OVERRIDES = [*TINY_OVERRIDES, "fit.epochs=1", "memory.enabled=true", "fusion.view=fused_memory"]


@pytest.fixture(scope="module")
def texture_images(synthetic_root: Path) -> torch.Tensor:
    from dualstpm.data import decode_images, load_category

    return decode_images([s.path for s in load_category(synthetic_root, "synth_texture").test], 64)


@pytest.fixture(scope="module")
def memory_run(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> Path:
    from dualstpm.config import load_params
    from dualstpm.training import fit

    run = tmp_path_factory.mktemp("memory") / "run"
    fit(load_params(None, MEMORY_OVERRIDES), synthetic_root, "synth_texture", run)
    return run


def test_a_memory_view_without_a_memory_bank_is_refused_naming_the_fix():
    from dualstpm.config import load_params

    for view in ("memory", "fused_memory"):
        with pytest.raises(ConfigError, match=f"fusion.view = '{view}'.*set memory.enabled=true"):
            load_params(None, [*TINY_OVERRIDES, f"fusion.view={view}"])
    with pytest.raises(ConfigError, match="tiling.enabled=true with memory.enabled=true"):
        load_params(None, [*TINY_OVERRIDES, "memory.enabled=true", "tiling.enabled=true"])
    with pytest.raises(ConfigError, match="coreset_ratio"):
        load_params(None, [*TINY_OVERRIDES, "memory.coreset_ratio=0"])


def test_fit_writes_the_bank_and_calibrates_both_memory_views(memory_run: Path):
    from dualstpm.detector import Detector

    model_dir = memory_run / "model"
    assert (model_dir / "memory.safetensors").is_file()
    calibration = json.loads((model_dir / "calibration.json").read_text())
    assert {"memory", "fused_memory"} <= set(calibration["thresholds"]) <= set(calibration["pixel_thresholds"])
    assert set(calibration["memory_stats"]) == {"fused", "memory"}
    detector = Detector.load(memory_run, Compute.resolve("cpu", "float32"))
    # 16 training images (20 less the seeded 20 % for validation) at 64 px: 8 x 8 patches at stride 8 each,
    # 1024 in all; 1 % of them is 10.24, so 10 rows of 40 + 112 = 152 features (Lite0 at strides 8 and 16)
    assert tuple(detector.inference.memory.bank.shape) == (10, 152)
    assert detector.views == ("fused", "stpm", "recon", "memory", "fused_memory")
    assert detector.decision_view == "fused_memory"


def test_the_decision_score_is_the_standardised_sum_of_fused_and_memory(memory_run: Path,
                                                                         texture_images: torch.Tensor):
    from dualstpm.detector import Detector
    from dualstpm.model.fusion import image_score

    detector = Detector.load(memory_run, Compute.resolve("cpu", "float32"))
    parts = detector.score(texture_images, ("fused", "memory")).maps
    (fm, fs), (mm, ms) = detector.calibration.memory_stats.fused, detector.calibration.memory_stats.memory
    by_hand = (parts["fused"] - fm) / fs + (parts["memory"] - mm) / ms
    out = detector.infer(texture_images)
    torch.testing.assert_close(out.anomaly_map, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.score, image_score(by_hand, detector.score_spec), rtol=1e-5, atol=1e-6)
    assert torch.equal(out.label, out.score > detector.calibration.thresholds["fused_memory"])


def test_the_test_scores_every_view_and_stores_the_memory_maps(memory_run: Path, synthetic_root: Path):
    from dualstpm.evaluation import test_run
    from dualstpm.maps import MapSet

    result = test_run(memory_run, synthetic_root, "synth_texture", Compute.resolve("cpu", "float32"))
    assert result["default"] == "fused_memory"
    for view in ("fused", "memory", "fused_memory"):
        assert 0.0 <= result[view]["image_auroc"] <= 1.0, view
    from dualstpm.mlops.stages import metrics_table

    # the AUC table (auc_table.csv, the console) reports the memory views beside the others
    assert list(metrics_table({"synth_texture": result})["model"]) == ["stpm", "recon", "fused", "memory", "fused_memory"]
    stored = MapSet.load(memory_run / "maps" / "test.npz")
    assert stored.memory is not None and stored.memory.shape == (len(stored), 64, 64)
    # re-scoring the stored maps (what the ablation and the monitor do) gives the test's figures
    from dualstpm import metrics
    from dualstpm.detector import Detector

    detector = Detector.load(memory_run, Compute.resolve("cpu", "float32"))
    _, scores = detector.inference.views.stack(stored.raw, "memory")
    assert metrics.image_auroc(stored.labels, scores) == pytest.approx(result["memory"]["image_auroc"], abs=1e-12)


def test_a_memory_model_exports_with_parity(memory_run: Path, tmp_path: Path, texture_images: torch.Tensor):
    from dualstpm.backends import ExportedModel
    from dualstpm.detector import Detector
    from dualstpm.export import export_run
    from test_export import assert_parity

    exported = export_run(memory_run, "onnx", "fp32", tmp_path / "onnx")
    meta = json.loads((exported / "metadata.json").read_text())
    assert meta["decision"] == "fused_memory"
    assert (meta["memory"]["entries"], meta["memory"]["features"], meta["memory"]["coreset_ratio"]) == (10, 152, 0.01)
    reference = Detector.load(memory_run, Compute.resolve("cpu", "float32")).infer(texture_images)
    for backend in ("onnxruntime", "openvino"):
        assert_parity(ExportedModel(exported, backend).infer(texture_images), reference)
    # one graph for any batch size: a single image too
    single = Detector.load(memory_run, Compute.resolve("cpu", "float32")).infer(texture_images[:1])
    assert_parity(ExportedModel(exported, "onnxruntime").infer(texture_images[:1]), single)


def test_a_model_directory_without_its_bank_is_refused_naming_the_fix(memory_run: Path, tmp_path: Path):
    from dualstpm.detector import Detector

    broken = tmp_path / "run"
    shutil.copytree(memory_run / "model", broken / "model")
    (broken / "model" / "memory.safetensors").unlink()
    with pytest.raises(RunError, match="memory.enabled=true but memory.safetensors is missing.*retrain"):
        Detector.load(broken)


def test_save_detector_wants_a_bank_exactly_when_the_params_enable_it(memory_run: Path, tmp_path: Path):
    from dualstpm.detector import Detector, save_detector

    detector = Detector.load(memory_run, Compute.resolve("cpu", "float32"))
    with pytest.raises(ValueError, match="memory.enabled=True but a memory bank was not given"):
        save_detector(tmp_path / "run", detector.model, detector.params, detector.calibration, None, None)
    assert not (tmp_path / "run" / "model").exists()
    assert np.isfinite(detector.inference.memory.bank.numpy()).all()
