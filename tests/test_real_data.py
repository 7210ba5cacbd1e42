"""A real-data check: a small model on battery_weld must reach what a correct one reaches.

Measured on the development machine (128 px, Lite0/Lite2 package teachers, 20 epochs,
seed 0): fused image AUROC 0.903, pixel AUROC 0.874, AUPRO 0.617. With *random* teachers
the same recipe gives 0.920 / 0.821 / 0.415, and after 5 epochs the STPM branch alone
sits at image AUROC 0.28: image AUROC alone on this easy set would not catch a broken
teacher, so the bar is on all three figures.
"""

import pytest

from dualstpm.config import load_params
from dualstpm.evaluation import test_run
from dualstpm.training import fit

pytestmark = pytest.mark.real_data


def test_battery_weld_small_model_reaches_measured_quality(shared_data, tmp_path):
    params = load_params(None, [
        "image_size=128", "fit.epochs=20", "fit.batch_size=8", "fit.device=cpu",
        "model.t1.name=tf_efficientnet_lite0", "model.t1.weights=package",
        "model.t2.name=tf_efficientnet_lite2", "model.t2.weights=package",
    ])
    run = tmp_path / "battery_weld"
    fit(params, shared_data, "battery_weld", run)
    fused = test_run(run, shared_data, "battery_weld")["fused"]
    assert fused["image_auroc"] >= 0.85
    assert fused["pixel_auroc"] >= 0.83
    assert fused["aupro"] >= 0.55
