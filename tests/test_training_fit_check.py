"""The fit check (issue 22, item 5): after training, `fit` measures the validation AUROC on
synthetic defects, and below `fit.min_val_auroc` warns with the cause and the fix, on the
console and recorded (calibration.json, metrics.json, MLflow). Expected values by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from conftest import TINY_OVERRIDES
from dualstpm.config import load_params
from dualstpm.detector import Calibration
from dualstpm.fit_check import FitEvidence, check_fit, fit_check_metrics, fit_check_tags, poor_fit_warning
from dualstpm.progress import labelled

# 3 epochs of 3 steps on 37 images at 128 px under the demo's fixed budget; the real floor is 500 steps
STARVED = FitEvidence(recipe="fixed", train_images=37, image_size=128, epochs=3, steps=9, real_min_steps=500)
WELL_FED = FitEvidence(recipe="real", train_images=610, image_size=256, epochs=40, steps=1560, real_min_steps=500)


def flat_images(n: int) -> Tensor:
    """n uniform grey images (every pixel 0.5): any pasted defect changes some pixel."""
    return torch.full((n, 3, 64, 64), 0.5)


def seeing(images: Tensor) -> dict[str, Tensor]:
    """A model that sees every change: the score is the largest departure from grey, 0 on a clean image."""
    departure = (images - 0.5).abs().flatten(1).amax(dim=1)
    return {"fused": departure, "stpm": departure}


def blind(images: Tensor) -> dict[str, Tensor]:
    """A model that cannot separate: every image scores 1, so every pair ties and the AUROC is 0.5."""
    return {"fused": torch.ones(len(images)), "stpm": torch.ones(len(images))}


def test_a_model_that_cannot_separate_is_warned_about_with_cause_and_fix():
    check = check_fit(blind, flat_images(6), "fused", 0.7, seed=0, batch_size=4, evidence=STARVED)
    assert check.val_auroc == {"fused": 0.5, "stpm": 0.5}  # all ties: AUROC 0.5
    assert check.poor and (check.good_images, check.defective_images) == (6, 6)
    warning = check.warning
    assert "`fused` view's image AUROC" in warning and "0.500, below fit.min_val_auroc=0.7" in warning
    assert "9 optimizer steps per branch in 3 epochs" in warning and "--set fit.recipe=real" in warning
    assert "--set image_size=256" in warning and "few good training images (37)" in warning
    assert "on only 6 calibration images the figure is rough" in warning  # fewer than 10


def test_a_model_that_separates_is_not_warned_about():
    # every defective copy departs from grey (> 0), every clean image scores 0: AUROC 1
    check = check_fit(seeing, flat_images(6), "fused", 0.7, seed=0, batch_size=4, evidence=STARVED)
    assert check.val_auroc == {"fused": 1.0, "stpm": 1.0}
    assert not check.poor and check.warning is None
    assert "fused 1.000, at or above fit.min_val_auroc=0.7" in check.summary()


def test_the_floor_is_inclusive_and_zero_never_warns():
    assert poor_fit_warning("fused", 0.7, 0.7, STARVED, 50) is None
    assert poor_fit_warning("fused", 0.6999, 0.7, STARVED, 50) is not None
    assert poor_fit_warning("fused", 0.0, 0.0, STARVED, 50) is None
    assert "could not be measured" in poor_fit_warning("fused", None, 0.7, STARVED, 50)


def test_the_causes_follow_the_evidence():
    # trained past the real floor, at 256 px, on 610 images: none of the budget causes applies
    warning = poor_fit_warning("fused", 0.6, 0.7, WELL_FED, 50)
    assert "too little training" not in warning and "image size" not in warning and "few good" not in warning
    assert "raise fit.real.min_steps" in warning and "rough" not in warning
    # under the real recipe the size fix names the recipe's key
    small = FitEvidence(recipe="real", train_images=610, image_size=128, epochs=40, steps=1560, real_min_steps=500)
    assert "--set fit.real.image_size=256" in poor_fit_warning("fused", 0.6, 0.7, small, 50)


def test_the_tags_and_metrics_of_a_recorded_check():
    record = check_fit(blind, flat_images(4), "fused", 0.7, seed=0, batch_size=4, evidence=STARVED).to_json()
    assert json.loads(json.dumps(record)) == record  # JSON as calibration.json stores it
    tags = fit_check_tags(record, "dualstpm.")
    assert tags["dualstpm.fit_check"] == "poor" and tags["dualstpm.fit_check.val_auroc"] == "0.5"
    assert tags["dualstpm.fit_check.warning"] == record["warning"]
    assert fit_check_metrics(record) == {"fit_check.val_auroc.fused": 0.5, "fit_check.val_auroc.stpm": 0.5}
    assert fit_check_tags(None, "dualstpm.") == {} and fit_check_metrics(None) == {}  # fitted before the check


def test_a_poor_fit_is_said_and_recorded_in_the_run(synthetic_root: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    """A tracked fit whose check finds a hand-set AUROC of 0.55 on every view: the warning goes to
    the log (here a Prefect-like sink), calibration.json, metrics.json and the MLflow run."""
    import mlflow

    from dualstpm.evaluation import test_run
    from dualstpm.mlops.runs import RunRecord
    from dualstpm.mlops.stages import tracked_fit
    from dualstpm.mlops.tracking import entry_store

    monkeypatch.setattr("dualstpm.fit_check.synthetic_defect_auroc",
                        lambda score, images, kinds, seed, batch_size: {"stpm": 0.55, "recon": 0.55, "fused": 0.55})
    params = load_params(None, [*TINY_OVERRIDES, "fit.epochs=1"])
    run_dir = tmp_path / "run"
    lines: list[str] = []
    with labelled("synth_texture", lines.append):
        result = tracked_fit(params, synthetic_root, "synth_texture", run_dir, store=entry_store(params))
    warnings = [line for line in lines if "warning: poor fit" in line]
    assert len(warnings) == 1 and "0.550, below fit.min_val_auroc=0.7" in warnings[0]
    assert result.fit_check["poor"] and result.fit_check["warning"] in warnings[0]

    stored = json.loads((run_dir / "model" / "calibration.json").read_text())["fit_check"]
    assert stored == result.fit_check and stored["val_auroc"]["fused"] == 0.55
    # 16 train images at batch 8 = 2 steps per epoch, 1 epoch: 2 steps; 64 px; 16 good training images
    assert stored["evidence"] == {"recipe": "fixed", "train_images": 16, "image_size": 64, "epochs": 1, "steps": 2,
                                  "real_min_steps": 500}
    run = mlflow.tracking.MlflowClient(entry_store(params).uri).get_run(RunRecord.read(run_dir).run_id)
    assert run.data.tags["dualstpm.fit_check"] == "poor"
    assert run.data.tags["dualstpm.fit_check.warning"] == result.fit_check["warning"]
    assert run.data.metrics["fit_check.val_auroc.fused"] == 0.55
    assert test_run(run_dir, synthetic_root, "synth_texture")["calibration"]["fit_check"] == stored


def test_a_model_fitted_before_the_check_still_loads(trained_run: Path):
    data = json.loads((trained_run / "model" / "calibration.json").read_text())
    assert set(data["fit_check"]["val_auroc"]) == {"stpm", "recon", "fused"}  # every view is checked
    data.pop("fit_check")
    assert Calibration.from_json(data).fit_check is None
