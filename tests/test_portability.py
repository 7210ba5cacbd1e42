"""Train anywhere, serve anywhere: inference picks its own device, the ablation gives back
torch's threads, impossible params are refused when they load, and non-finite scores say where."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import PROJECT_ROOT, TINY_OVERRIDES

from dualstpm.ablation import build_grid
from dualstpm.ablation.rescore import SplitScorer, score_grid
from dualstpm.compute import Compute
from dualstpm.config import AblationParams, load_params
from dualstpm.data import decode_images
from dualstpm.detector import Detector
from dualstpm.errors import ConfigError, TrainingError
from dualstpm.evaluation import test_run
from dualstpm.model.fusion import FusionSpec, MapStats, ScoreSpec, fuse, gaussian_blur
from dualstpm.model.inference import MapViews
from dualstpm.maps import MapSet
from dualstpm.mlops.register import MODEL_CODE
from dualstpm.training import Trainer

# This machine's inference device under `auto`: the GPU when there is one.
HERE = "cuda" if torch.cuda.is_available() else "cpu"


def _dualstpm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dualstpm", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=600)


def _copy_model(trained_run: Path, run: Path, device: str) -> Path:
    """A copy of a trained run's model directory whose params.yaml says it trained on `device`."""
    shutil.copytree(trained_run / "model", run / "model")
    path = run / "model" / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["fit"]["device"] = device
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return run


def test_a_model_trained_on_a_gpu_is_tested_predicted_and_served_here(
        trained_run: Path, synthetic_root: Path, tmp_path: Path) -> None:
    gpu_run = _copy_model(trained_run, tmp_path / "gpu_run", "cuda")
    cpu_run = _copy_model(trained_run, tmp_path / "cpu_run", "cpu")
    assert Detector.load(gpu_run).compute.device.type == HERE
    assert Detector.load(gpu_run, device="cpu").compute.device.type == "cpu"
    # Where it was trained changes no figure.
    on_cpu = test_run(cpu_run, synthetic_root, "synth_texture", device="cpu")
    assert test_run(gpu_run, synthetic_root, "synth_texture", device="cpu") == on_cpu

    done = _dualstpm("test", "--run", str(gpu_run), "--data-root", str(synthetic_root), "--device", "cpu")
    assert done.returncode == 0, done.stderr
    images = sorted((synthetic_root / "synth_texture" / "test" / "hole").iterdir())[:2]
    done = _dualstpm("predict", "--run", str(gpu_run), *map(str, images), "--out", str(tmp_path / "pred"))
    assert done.returncode == 0, done.stderr
    predicted = pd.read_csv(tmp_path / "pred" / "predictions.csv")

    mlflow.pyfunc.save_model(tmp_path / "pyfunc", python_model=str(MODEL_CODE),
                             artifacts={"model": str(gpu_run / "model")})
    served = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"), model_config={"device": "cpu"})
    assert served.unwrap_python_model().detector.compute.device.type == "cpu"
    answer = served.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    assert answer["score"].tolist() == pytest.approx(predicted["score"].tolist(), rel=1e-6)


@pytest.mark.parametrize(("device", "fragment"), [
    ("gpu", "device 'gpu' is not one of auto, cpu, cuda"),
    pytest.param("cuda", "no CUDA device is visible", marks=pytest.mark.skipif(HERE == "cuda", reason="has a GPU")),
])
def test_an_impossible_inference_device_is_one_clear_error(
        trained_run: Path, synthetic_root: Path, tmp_path: Path, device: str, fragment: str) -> None:
    image = next((synthetic_root / "synth_texture" / "test" / "hole").iterdir())
    done = _dualstpm("predict", "--run", str(trained_run), str(image), "--out", str(tmp_path / "p"),
                     "--device", device)
    assert done.returncode == 2 and fragment in " ".join(done.stderr.split()) and "Traceback" not in done.stderr


def test_the_ablation_leaves_torch_threads_to_the_threads_that_come_after() -> None:
    rng = np.random.default_rng(0)
    stored = MapSet(rng.random((4, 2, 3, 8, 8)).astype(np.float16), np.array([0, 0, 1, 1], np.int8),
                    np.array(["good", "good", "a", "a"]), np.array(["w", "x", "y", "z"]), rng.random((4, 8, 8)) < 0.3,
                    {"split": "test"})
    splits = {"test": SplitScorer(stored, MapViews(FusionSpec(), MapStats(torch.ones(2, 3), torch.ones(2, 3)),
                                                   score=ScoreSpec()))}
    original = torch.get_num_threads()
    torch.set_num_threads(2)  # a count that 1 differs from, whatever this machine has
    try:
        table = score_grid(build_grid(AblationParams())[:6], splits, workers=2)
        assert len(table) == 6
        assert torch.get_num_threads() == 2
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]  # a thread started afterwards (a fit in a flow) gets them all
    finally:
        torch.set_num_threads(original)


# ceil(4 sigma) px of reflect padding must stay below the image_size px map:
# 128 px -> sigma <= 127 / 4 = 31.75; 64 px -> sigma <= 63 / 4 = 15.75.
@pytest.mark.parametrize(("image_size", "sigma", "allowed"), [
    (128, 31.75, True), (128, 31.76, False), (128, 40, False), (64, 15.75, True), (64, 16, False), (64, 0.1, True),
])
def test_fusion_sigma_must_fit_the_map_when_params_load(image_size: int, sigma: float, allowed: bool) -> None:
    settings = [f"image_size={image_size}", f"fusion.sigma={sigma}"]
    if allowed:
        assert load_params(None, settings).fusion.sigma == sigma
        blurred = gaussian_blur(torch.rand(1, image_size, image_size), sigma)  # and the blur does run
        assert blurred.shape == (1, image_size, image_size)
    else:
        with pytest.raises(ConfigError, match=rf"fusion.sigma={sigma:g} .* use fusion.sigma <= {(image_size - 1) / 4:g}"):
            load_params(None, settings)
        with pytest.raises(RuntimeError):  # what calibration would have hit after the whole training
            gaussian_blur(torch.rand(1, image_size, image_size), sigma)


def test_non_finite_validation_scores_name_the_epoch_and_the_branch(synthetic_root: Path, tmp_path: Path) -> None:
    params = load_params(None, TINY_OVERRIDES)
    trainer = Trainer(params, tmp_path, Compute.resolve("cpu"), data={})  # no checkpoint is written: no data record needed
    paths = sorted((synthetic_root / "synth_texture" / "train" / "good").iterdir())[:3]
    images = decode_images(paths, params.image_size, "validation images")
    with torch.no_grad():
        next(trainer.model.s2.parameters()).fill_(float("nan"))
    trainer.epochs_done = 2
    with pytest.raises(TrainingError, match=r"the recon branch gave 3 of 3 validation images a non-finite score .* "
                                            r"after epoch 2.*fit.precision=float32"):
        trainer.select(images)


@pytest.mark.parametrize("mode", ["product", "sum", "product_all"])
def test_a_diverged_branch_stays_out_of_the_other_branchs_view(mode: str) -> None:
    maps = torch.rand(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) + 0.1
    diverged = maps.clone()
    diverged[:, 1] = float("nan")  # branch B
    view = FusionSpec(mode, ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)))  # branch A alone
    assert torch.equal(fuse(diverged, view), fuse(maps, view))
