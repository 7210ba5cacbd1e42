"""params.yaml validation and --set overrides."""

from pathlib import Path

import pytest

from dualstpm.config import Params, load_params, valid_keys
from dualstpm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

CONTRACT_KEYS = [
    "image_size", "seed", "model.t1.name", "model.t1.weights", "model.t2.name", "model.t2.weights",
    "model.attention", "fit.epochs", "fit.batch_size", "fit.lr", "fit.val_fraction",
    "fusion.mode", "fusion.weights", "fusion.normalize",
]


def test_contract_keys_exist():
    assert set(CONTRACT_KEYS) <= set(valid_keys())


def test_builtin_defaults_are_the_offline_cpu_ones_of_params_yaml():
    p = Params()
    assert (p.model.t1.name, p.model.t1.weights, p.model.t2.name, p.model.t2.weights) == (
        "tf_efficientnet_lite0", "package", "tf_efficientnet_lite2", "package")
    assert (p.image_size, p.fit.epochs, p.fit.batch_size) == (128, 3, 8)
    assert (p.data.source, p.data.root, p.data.categories) == ("synthetic", "data/synthetic", ["synth_texture", "synth_object"])
    assert load_params(None) == load_params(ROOT / "params.yaml")  # outside the project = inside it


def test_published_recipe_is_complete_on_its_own():
    p = load_params(ROOT / "configs/published.yaml")
    assert (p.model.t1.name, p.model.t1.weights, p.model.t2.name, p.model.t2.weights) == (
        "resnet18", "hub", "resnet50", "hub")
    assert (p.image_size, p.fit.epochs, p.fit.batch_size, p.fit.lr) == (256, 100, 32, 0.4)
    assert (p.data.source, p.data.root, len(p.data.categories)) == ("mvtec", "data/mvtec", 15)


@pytest.mark.parametrize("override, key", [
    ("fit.epochs=true", "fit.epochs"), ("fit.batch_size=yes", "fit.batch_size"), ("seed=off", "seed"),
    ("fit.lr=on", "fit.lr"), ("fusion.weights=[[1, 1, true], [1, 1, 1]]", "fusion.weights.0.2"),
    ("fit.cache=1", "fit.cache"), ("fit.epochs=2.5", "fit.epochs"),
])
def test_no_silent_coercion_between_booleans_and_numbers(override, key):
    with pytest.raises(ConfigError) as info:
        load_params(None, [override])
    assert f"{key} = " in str(info.value)


def test_an_int_still_fills_a_float_and_exponents_are_numbers(tmp_path):
    assert load_params(None, ["fit.lr=1"]).fit.lr == 1.0
    assert load_params(None, ["fit.weight_decay=1e-4"]).fit.weight_decay == 0.0001  # YAML 1.1 alone: a string
    (tmp_path / "p.yaml").write_text("fit:\n  lr: 5E-2\n  cache_ram_gb: 2.5e+1\n")
    p = load_params(tmp_path / "p.yaml")
    assert (p.fit.lr, p.fit.cache_ram_gb) == (0.05, 25.0)


@pytest.mark.parametrize("overrides, fragments", [
    (["model.t2.name=tf_efficientnet_lite0"], ["both 'tf_efficientnet_lite0'", "model.t2.name=tf_efficientnet_lite2"]),
    (["model.t1.name=tf_efficientnet_lite2"], ["both 'tf_efficientnet_lite2'", "model.t2.name=tf_efficientnet_lite0"]),
    # the same architecture with a pretrained tag is the same teacher
    (["model.t1.name=resnet18", "model.t1.weights=hub", "model.t2.name=resnet18.tv_in1k", "model.t2.weights=hub"],
     ["both 'resnet18'"]),
    (["model.t1.name=resnet50", "model.t1.weights=hub", "model.t2.name=resnet50", "model.t2.weights=hub"],
     ["both 'resnet50'", "or wide_resnet50_2 (weights hub)"]),
    (["model.t1.name=resnet81", "model.t1.weights=hub"], ["model.t1.name = 'resnet81'", "did you mean", "resnet18"]),
    (["model.t2.name=tf_efficientnet_lite9"], ["model.t2.name", "did you mean tf_efficientnet_lite"]),
    (["model.t1.name=resnet18"], ["weights=package", "resnet18", "weights=hub"]),
])
def test_teacher_checks_are_made_when_params_load(overrides, fragments):
    with pytest.raises(ConfigError) as info:
        load_params(None, overrides)
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_teacher_checks_need_no_weights(tmp_path, monkeypatch):
    """Checking names is a registry lookup: hub teachers whose weights are nowhere (an empty
    Hugging Face cache, offline) still load as params; only fit needs the weights."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    p = load_params(None, ["model.t1.name=resnet18", "model.t1.weights=hub", "model.t2.name=resnet50", "model.t2.weights=hub"])
    assert (p.model.t1.name, p.model.t2.name) == ("resnet18", "resnet50")


def test_an_unknown_key_names_the_closest_valid_one(tmp_path):
    from dualstpm.config import did_you_mean

    assert did_you_mean("fusion.veiw") == " (did you mean 'fusion.view'?)"
    assert did_you_mean("fit.lr_schedule") == " (did you mean 'fit.schedule'?)"
    assert did_you_mean("nothing.like.it") == ""
    params = tmp_path / "params.yaml"
    params.write_text("score:\n  redcue: max\n")
    with pytest.raises(ConfigError, match=r"unknown key 'score.redcue' \(did you mean 'score.reduce'\?\)"):
        load_params(params)


def test_a_real_category_name_with_the_synthetic_source_is_refused_with_the_fix():
    """`data.source: synthetic` generates each category it lacks: a real name would silently become made-up images."""
    with pytest.raises(ConfigError, match=r"data.categories \['battery_weld'\] with data.source=synthetic.*"
                                          r"--set data.source=folder --set data.root="):
        load_params(None, ["data.categories=[battery_weld]"])
    own = load_params(None, ["data.source=folder", "data.root=mine", "data.categories=[battery_weld]"])
    assert own.data.categories == ["battery_weld"]
    assert load_params(None, ["data.categories=[synth_texture, synth_other]"]).data.source == "synthetic"
