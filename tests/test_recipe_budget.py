"""The training budget (issue 22, item 2): `fit.recipe` fixed | real | auto, the real-data
recipe's floor and ceiling of optimizer steps and its early stopping. Every expected number
is derived by hand in the comments: steps per epoch = ceil(train images / batch size)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import PROJECT_ROOT, TINY_OVERRIDES
from dualstpm.budget import plan_category, plan_fit, steps_per_epoch
from dualstpm.compute import Compute
from dualstpm.config import load_params
from dualstpm.errors import ConfigError
from dualstpm.training import Trainer, fit, train_epochs

pytestmark = pytest.mark.filterwarnings("ignore:teacher .* has RANDOM weights")


def real(*extra: str, recipe: str = "real"):
    return load_params(None, [f"fit.recipe={recipe}", *extra])


# --- params ----------------------------------------------------------------------------------

def test_a_fixed_plan_changes_nothing():
    params = load_params(None, ["fit.recipe=fixed"])
    plan = plan_fit(params, "/some/folder/of/mine", 30)
    assert plan.params == params  # fit.epochs at image_size
    # 30 images at batch 8: ceil(3.75) = 4 steps per epoch; fixed: exactly fit.epochs = 3, no early stop
    assert (plan.recipe, plan.steps_per_epoch, plan.min_epochs, plan.max_epochs, plan.patience_epochs) == (
        "fixed", 4, 3, 3, None)


def test_the_default_trains_a_folder_of_ones_own_with_the_real_recipe():
    """The built-in default and params.yaml both say `auto`: a folder of one's own gets the
    real-data recipe, never the demo's 3 epochs. 30 images at batch 8 = 4 steps per epoch:
    floor ceil(500 / 4) = 125 epochs, ceiling 1500 // 4 = 375, patience ceil(300 / 4) = 75."""
    for params in (load_params(None), load_params(PROJECT_ROOT / "params.yaml")):
        assert params.fit.recipe == "auto"
        plan = plan_fit(params, "/some/folder/of/mine", 30)
        assert (plan.recipe, plan.steps_per_epoch, plan.min_epochs, plan.max_epochs, plan.patience_epochs) == (
            "real", 4, 125, 375, 75)
        assert plan.params.fit.recipe == "real" and plan.params.fit.epochs == 375


def test_epochs_asked_for_under_auto_on_a_folder_say_how_to_get_them():
    """`--set fit.epochs=5` on a folder of one's own: the plan is the real recipe (as the default
    says), and its own warning (fit prints it apart from the plan line) names fit.epochs=5 and the
    fix, so the five epochs are not lost silently."""
    plan = plan_fit(load_params(None, ["fit.epochs=5"]), "/some/folder/of/mine", 30)
    assert plan.recipe == "real"
    assert plan.epochs_note == ("fit.epochs=5 is not used: fit.recipe=auto trains a folder of one's own with the "
                                "real-data recipe (fit.real.*); add --set fit.recipe=fixed to train exactly 5 epochs")
    assert "fit.epochs=5" not in plan.describe()
    assert plan_fit(load_params(None), "/some/folder/of/mine", 30).epochs_note is None  # the default: no note
    fixed = plan_fit(load_params(None, ["fit.epochs=5", "fit.recipe=fixed"]), "/some/folder/of/mine", 30)
    assert (fixed.recipe, fixed.max_epochs) == ("fixed", 5)


def test_the_demo_keeps_its_quick_budget_under_auto():
    """The demo's params (fit.recipe auto, the default) still train 3 epochs at 128 px on the
    synthetic demo data, and the real-data recipe on any other folder."""
    demo = load_params(PROJECT_ROOT / "params.yaml")
    plan = plan_fit(demo, PROJECT_ROOT / "data" / "synthetic", 16)  # data.root itself: the demo's data
    assert (plan.recipe, plan.params.fit.epochs, plan.params.image_size, plan.patience_epochs) == ("fixed", 3, 128, None)
    assert plan.params.fit.recipe == "fixed"
    mine = plan_fit(demo, "/data/of/my/own", 16)
    assert mine.recipe == "real" and "not the synthetic demo" in mine.reason
    folder = load_params(None, ["fit.recipe=auto", "data.source=folder", "data.root=/data/of/my/own"])
    assert plan_fit(folder, "/data/of/my/own", 16).recipe == "real"  # dvc repro on a folder of one's own


def test_the_published_recipe_stays_fixed_whatever_the_default():
    assert load_params(PROJECT_ROOT / "configs" / "published.yaml").fit.recipe == "fixed"


def test_the_step_floor_trains_a_tiny_category():
    # 30 images at batch 16: ceil(30 / 16) = 2 steps per epoch.
    # floor ceil(500 / 2) = 250 epochs (500 steps); ceiling 1500 // 2 = 750; patience ceil(300 / 2) = 150
    plan = plan_fit(real("fit.batch_size=16"), "/mine", 30)
    assert (plan.steps_per_epoch, plan.min_epochs, plan.max_epochs, plan.patience_epochs) == (2, 250, 750, 150)
    assert plan.params.fit.epochs == 750 and plan.params.fit.recipe == "real"
    # a floor that is not a whole number of epochs rounds up: 37 images at batch 16 = 3 steps,
    # ceil(500 / 3) = 167 epochs = 501 steps >= 500
    assert plan_fit(real("fit.batch_size=16"), "/mine", 37).min_epochs == 167


def test_the_step_floor_on_battery_weld(shared_data: Path):
    """battery_weld: 37 train/good images, fit.val_fraction 0.2 holds out round(7.4) = 7, so 30 train."""
    plan = plan_category(real("fit.batch_size=16"), shared_data, "battery_weld")
    assert (plan.train_images, plan.steps_per_epoch, plan.min_epochs) == (30, 2, 250)


def test_the_ceiling_in_whole_epochs_never_below_the_floor():
    # 2000 images at batch 16 = 125 steps per epoch: floor ceil(500 / 125) = 4, ceiling 1500 // 125 = 12
    plan = plan_fit(real("fit.batch_size=16"), "/mine", 2000)
    assert (plan.min_epochs, plan.max_epochs) == (4, 12)
    # floor ceil(200 / 125) = 2 epochs, ceiling 240 // 125 = 1 epoch: the floor wins (2 epochs, 250 steps)
    plan = plan_fit(real("fit.batch_size=16", "fit.real.min_steps=200", "fit.real.max_steps=240"), "/mine", 2000)
    assert (plan.min_epochs, plan.max_epochs) == (2, 2)


def test_the_recipe_image_size_and_a_second_plan_gives_the_same():
    plan = plan_fit(real("fit.real.image_size=256"), "/mine", 100)
    assert plan.params.image_size == 256
    again = plan_fit(plan.params, "/mine", 100)  # `tracked_fit` plans, then `fit` plans its params again
    assert again.params == plan.params and again.to_json() == plan.to_json()
    assert plan_fit(real(), "/mine", 100).params.image_size == 128  # null: image_size


def test_a_recipe_image_size_that_breaks_the_blur_is_refused_before_training():
    # fusion.sigma 10 blurs with ceil(40) = 40 px, fine at 128 px, not at fit.real.image_size 32
    params = real("fusion.sigma=10", "fit.real.image_size=32")
    with pytest.raises(ConfigError, match=r"(?s)fit.recipe=real \(image_size=32.*fusion.sigma=10 blurs"):
        plan_fit(params, "/mine", 100)


@pytest.mark.parametrize("override, fragment", [
    ("fit.recipe=long", "fit.recipe = 'long'"),
    ("fit.real.min_steps=0", "fit.real.min_steps = 0"),
    ("fit.real.max_steps=-5", "fit.real.max_steps = -5"),
    ("fit.real.patience_steps=0", "fit.real.patience_steps = 0"),
    ("fit.real.image_size=100", "fit.real.image_size = 100: each side must be a multiple of 32"),
    ("fit.real.min_steps=true", "give a number"),
    ("fit.min_val_auroc=1.5", "fit.min_val_auroc = 1.5"),
    ("fit.min_val_auroc=-0.1", "fit.min_val_auroc = -0.1"),
])
def test_bad_values_are_refused_naming_key_and_value(override, fragment):
    with pytest.raises(ConfigError) as error:
        load_params(None, [override])
    assert fragment in str(error.value)


def test_a_floor_above_the_ceiling_is_refused_with_the_fix():
    with pytest.raises(ConfigError) as error:
        load_params(None, ["fit.real.min_steps=4000"])  # ceiling 1500
    message = str(error.value)
    assert "fit.real.min_steps = 4000 is above fit.real.max_steps = 1500" in message
    assert "--set fit.real.max_steps=4000" in message and "--set fit.real.min_steps=1500" in message


# --- early stopping on a hand-made validation curve ---------------------------------------------

# Selection values (mean validation image score, lower is better) per epoch, one list per branch.
# 37 images at batch 16 = 3 steps per epoch; min_steps 10 -> floor ceil(10 / 3) = 4 epochs;
# max_steps 30 -> ceiling 30 // 3 = 10 epochs; patience_steps 6 -> ceil(6 / 3) = 2 epochs.
CURVE_SETTINGS = ["fit.batch_size=16", "fit.real.min_steps=10", "fit.real.max_steps=30", "fit.real.patience_steps=6"]
CURVES = {
    # stpm's best is epoch 3, recon's epoch 4; after epoch 6 neither improved for 6 - 4 = 2 epochs: stop at 6
    "plateau": ({"stpm": [5, 4, 3, 3.5, 3.6, 3.7, 3.8, 3.9, 4, 4.1],
                 "recon": [5, 4.5, 4.4, 4.3, 4.35, 4.4, 4.5, 4.6, 4.7, 4.8]}, 6),
    # both best at epoch 1: patience would stop at 3, but the floor holds training to 4 epochs
    "early plateau": ({"stpm": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "recon": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}, 4),
    # recon improves every other epoch (best 2, 4, 6, 8, 10): never 2 epochs without a new best: the ceiling, 10
    "still learning": ({"stpm": [9, 8, 7, 7, 7, 7, 7, 7, 7, 7], "recon": [9, 8, 8.5, 7, 7.5, 6, 6.5, 5, 5.5, 4]}, 10),
}


@pytest.mark.parametrize("name", list(CURVES))
def test_early_stopping_stops_at_the_right_epoch(name, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    curves, expected = CURVES[name]
    params = load_params(None, [*TINY_OVERRIDES, "model.t1.weights=random", "model.t2.weights=random",
                                "fit.cache=false", "fit.recipe=real", *CURVE_SETTINGS])
    plan = plan_fit(params, tmp_path, 37)
    assert (plan.min_epochs, plan.max_epochs, plan.patience_epochs) == (4, 10, 2)
    params = plan.params
    trainer = Trainer(params, tmp_path, Compute.resolve("cpu", "float32"), {})

    def hand_made(model, images, spec, batch_size, compute, keep_maps=False, tiling=None):  # the statistics of the epoch just trained
        epoch = trainer.epochs_done
        return {b: {"score": np.array([values[epoch - 1]]), "map_mean": np.array([values[epoch - 1]])}
                for b, values in curves.items()}

    monkeypatch.setattr("dualstpm.training.branch_statistics", hand_made)
    # the loop, selection, checkpoints and the stop are real; the SGD steps are not needed for the curve
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, images, progress, cache=None: {"loss_stpm": 0.0})
    images = torch.rand(37, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ended = train_epochs(trainer, params, images, images[:2], trainer.compute, tmp_path, None, plan)
    assert len(trainer.history) == trainer.epochs_done == expected
    assert ("early stop" in ended) == (expected < plan.max_epochs)
    # a resumed fit asks the same pure question and trains nothing more
    best = {b: int(v["epoch"]) for b, v in trainer.best.items()}
    assert plan.stop_reason(expected, best) == ended


def test_a_real_fit_of_a_tiny_category_trains_the_floor(synthetic_root: Path, tmp_path: Path):
    """synth_texture: 20 train/good, 0.2 held out = 4, so 16 train at batch 8 = 2 steps per epoch.
    min_steps 5: floor ceil(5 / 2) = 3 epochs; max_steps 5: ceiling max(3, 5 // 2 = 2) = 3.
    fit.epochs=1 would train 1 epoch (2 steps); the recipe trains 3 (6 steps)."""
    params = load_params(None, [*TINY_OVERRIDES, "fit.epochs=1", "fit.recipe=auto", "fit.real.min_steps=5",
                                "fit.real.max_steps=5", "fit.min_val_auroc=0"])
    result = fit(params, synthetic_root, "synth_texture", tmp_path / "run")  # a tmp root: not the demo's data
    assert len(result.history) == 3
    saved = yaml.safe_load((tmp_path / "run" / "model" / "params.yaml").read_text())
    assert (saved["fit"]["recipe"], saved["fit"]["epochs"], saved["image_size"]) == ("real", 3, 64)
    # the recipe's memory bank (fit.real.memory): 1 % of 16 images x 8 x 8 patches = 10.24 -> 10 entries
    assert saved["memory"]["enabled"] is True and (tmp_path / "run" / "model" / "memory.safetensors").is_file()


def test_the_real_recipe_builds_the_memory_bank_unless_told_not_to_or_tiling():
    assert plan_fit(real(), "/mine", 100).params.memory.enabled is True
    assert plan_fit(real("fit.real.memory=false"), "/mine", 100).params.memory.enabled is False
    assert plan_fit(load_params(None, ["fit.recipe=fixed"]), "/mine", 100).params.memory.enabled is False
    tiled = plan_fit(real("tiling.enabled=true", "image_size=64", "tiling.frame_size=128"), "/mine", 10, [(128, 128)])
    assert tiled.params.memory.enabled is False  # tiling refuses the memory view: the recipe leaves it off
    demo = plan_fit(load_params(PROJECT_ROOT / "params.yaml"), PROJECT_ROOT / "data" / "synthetic", 16)
    assert demo.params.memory.enabled is False  # the demo's quick budget stays as it was


def test_steps_per_epoch_counts_the_last_partial_batch():
    assert (steps_per_epoch(32, 16), steps_per_epoch(33, 16), steps_per_epoch(1, 16)) == (2, 3, 1)
    with pytest.raises(ValueError, match="at least one image"):
        steps_per_epoch(0, 16)


def test_the_epoch_line_says_how_far_and_how_long_is_left():
    """The per-epoch log line: the epoch against the plan's span, the time so far and the time
    left, worked by hand: 3 epochs in 75 s -> 25 s each; 375 - 3 = 372 epochs left -> 9300 s =
    2:35:00, an upper bound under the real recipe (it may stop early), exact under fixed."""
    from dualstpm.training import epoch_line

    real = plan_fit(load_params(None), "/some/folder/of/mine", 30)  # 125 to 375 epochs (above)
    line = epoch_line({"epoch": 3, "loss_stpm": 0.5}, real, 75.0, 3)
    assert line == "epoch 3 of 125 to 375 (1:15 so far, at most 2:35:00 left)  loss_stpm 0.5"
    fixed = plan_fit(load_params(None, ["fit.recipe=fixed", "fit.epochs=4"]), "/some/folder/of/mine", 30)
    # a resumed fit that trained 1 epoch (epoch 2) in 10 s: 2 epochs left -> 20 s
    assert epoch_line({"epoch": 2}, fixed, 10.0, 1) == "epoch 2 of 4 (0:10 so far, 0:20 left)"
    assert epoch_line({"epoch": 2, "n": 7}, None, 10.0, 1) == "epoch 2  n 7"


def test_a_plan_made_for_other_data_is_refused_before_any_work(synthetic_root, tmp_path):
    """`fit(..., plan=...)` runs with a plan its caller made (read once); one counting other
    training images than this split (here 999) is a ValueError naming both counts, and nothing
    is written."""
    from dualstpm.training import fit

    params = load_params(None, TINY_OVERRIDES)
    with pytest.raises(ValueError, match="counts 999 training images, but synth_texture has"):
        fit(params, synthetic_root, "synth_texture", tmp_path / "run", plan=plan_fit(params, synthetic_root, 999))
    assert not (tmp_path / "run").exists()
