"""params.yaml validation and --set overrides."""

from pathlib import Path

import pytest

from dualstpm.config import Params, apply_overrides, load_params, valid_keys
from dualstpm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

CONTRACT_KEYS = [
    "image_size", "seed", "model.t1.name", "model.t1.weights", "model.t2.name", "model.t2.weights",
    "model.attention", "fit.epochs", "fit.batch_size", "fit.lr", "fit.val_fraction",
    "fusion.mode", "fusion.weights", "fusion.normalize",
]


def test_contract_keys_exist():
    assert set(CONTRACT_KEYS) <= set(valid_keys())


def test_defaults_are_the_published_recipe():
    p = Params()
    assert (p.model.t1.name, p.model.t2.name, p.image_size, p.fit.epochs, p.fit.batch_size, p.fit.lr) == (
        "resnet18", "resnet50", 256, 100, 32, 0.4)


@pytest.mark.parametrize("path", ["params.yaml", "configs/published.yaml"])
def test_shipped_params_files_are_valid(path):
    load_params(ROOT / path)


def test_set_overrides_are_typed():
    p = load_params(ROOT / "params.yaml", ["fit.epochs=7", "fusion.weights=[[1, 0, 1], [0, 1, 0]]", "fit.lr=0.01"])
    assert p.fit.epochs == 7 and p.fit.lr == 0.01
    assert p.fusion.weights == [[1, 0, 1], [0, 1, 0]]


def test_unknown_key_lists_valid_keys(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("fit:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as info:
        load_params(bad)
    message = str(info.value)
    assert "fit.epoch" in message and "fit.epochs" in message and str(bad) in message


def test_unknown_set_key_is_rejected():
    with pytest.raises(ConfigError, match="valid keys"):
        load_params(None, ["fusion.wieghts=[[1,1,1],[1,1,1]]"])


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("fusion.mode=max", "product"),
        ("fusion.normalize=zscore", "val_stats"),
        ("model.attention=channel", "spatial"),
        ("fit.epochs=0", "fit.epochs"),
        ("image_size=100", "multiple of 32"),
        ("fusion.weights=[[1,1],[1,1]]", "2x3"),
        ("model.t1.weights=internet", "file:<path"),
    ],
)
def test_bad_values_name_the_key_and_the_allowed_values(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_params(None, [override])
    assert fragment in str(info.value)
    assert override.split("=")[0].split(".")[-1] in str(info.value)


def test_set_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_params(None, ["fit.epochs"])


def test_apply_overrides_does_not_mutate_input():
    raw = {"fit": {"epochs": 1}}
    assert apply_overrides(raw, ["fit.epochs=2"])["fit"]["epochs"] == 2
    assert raw["fit"]["epochs"] == 1


def test_missing_params_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_params(tmp_path / "nope.yaml")
