"""The recipe-fidelity params (issue 11): loss scale, checkpoint selection rule, decoder
width and attention-gate form (the gates' leak test, a study, is in studies/tests/test_leak.py).
Expected values are derived by hand in each test's comments."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from dualstpm.compute import Compute
from dualstpm.config import ModelParams, load_params
from dualstpm.errors import ConfigError
from dualstpm.detector import build_network
from dualstpm.model.recon import ReconstructionStudent, SpatialAttentionGate, decoder_width
from dualstpm.model.torch_model import DualStpmModel
from dualstpm.training import Trainer

LITE = ("tf_efficientnet_lite0", "tf_efficientnet_lite2")
LITE2_CHANNELS = (24, 48, 120)  # T2 = Lite2 at strides 4, 8, 16
RESNET50_CHANNELS = (256, 512, 1024)
pytestmark = pytest.mark.filterwarnings("ignore:teacher .* has RANDOM weights")


def model_params(**extra: str) -> ModelParams:
    return ModelParams.model_validate(
        {"t1": {"name": LITE[0], "weights": "random"}, "t2": {"name": LITE[1], "weights": "random"}, **extra})


def tiny_model(**extra: str) -> DualStpmModel:
    torch.manual_seed(0)
    return build_network(model_params(**extra))


# --- params ----------------------------------------------------------------------------------

def test_defaults_are_the_ones_validation_chose():
    """docs/results/part-level/recipe.md: of the recipe variants only the full-width decoder beat the
    baseline robustly on validation (pooled bootstrap), so it is the default; the rest stay."""
    p = load_params(None)
    assert (p.fit.loss_scale, p.fit.select, p.model.decoder_width, p.model.gate_form) == (
        1.0, "score_mean", "full", "residual")


@pytest.mark.parametrize("override, fragment", [
    ("fit.loss_scale=0", "fit.loss_scale = 0"),
    ("fit.loss_scale=-2", "fit.loss_scale = -2"),
    ("fit.select=max", "fit.select = 'max'"),
    ("model.decoder_width=half", "model.decoder_width = 'half'"),
    ("model.gate_form=multiplicative", "model.gate_form = 'multiplicative'"),
])
def test_bad_values_are_refused_naming_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_params(None, [override])
    assert fragment in str(info.value)


def test_method_gates_without_gates_is_refused():
    with pytest.raises(ConfigError, match="model.gate_form=method.*model.attention=none.*attention=spatial"):
        load_params(None, ["model.attention=none", "model.gate_form=method"])
    assert load_params(None, ["model.attention=none"]).model.gate_form == "residual"


# --- fit.loss_scale ----------------------------------------------------------------------------

def test_loss_scale_two_doubles_the_loss_exactly():
    model = tiny_model().train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    teachers = model.teacher_features(images)
    pairs = model.pyramids(images, teachers)
    one, two = pairs.losses(1.0), pairs.losses(2.0)
    for a, b in zip(one, two, strict=True):
        assert b.item() == 2 * a.item()  # multiplying by 2 is exact in floating point


def test_loss_scale_two_steps_like_twice_the_learning_rate():
    """d(2L)/dp = 2 dL/dp, so with plain SGD (momentum 0, weight decay 0)
    p - lr * 2g = p - (2 lr) * g: one step at scale 2 and lr equals one at scale 1 and 2 lr.
    Scaling by 2 is exact in floating point, so the weights agree bit for bit."""
    base = tiny_model().train()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    teachers = base.teacher_features(images)
    stepped = {}
    for scale, lr in ((2.0, 0.05), (1.0, 0.1)):
        model = copy.deepcopy(base)
        optimizers = [torch.optim.SGD(s.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
                      for s in model.students().values()]
        sum(model.pyramids(images, teachers).losses(scale)).backward()
        for optimizer in optimizers:
            optimizer.step()
        stepped[scale] = {k: v for k, v in model.state_dict().items() if k.startswith(("s1.", "s2."))}
    before = {k: v for k, v in base.state_dict().items() if k.startswith(("s1.", "s2."))}
    assert any(not torch.equal(before[k], stepped[1.0][k]) for k in before)  # the step moved the students
    assert all(torch.equal(stepped[2.0][k], stepped[1.0][k]) for k in before)


# --- fit.select ----------------------------------------------------------------------------------

def hand_maps(epoch: int) -> torch.Tensor:
    """One validation image's six maps, (1, 2, 3, 4, 4). Levels 2 and 3 are 1 everywhere, so
    a branch's product view is its level-1 map. Level 1, the same in both branches:
      epoch 1: 0.125 with one pixel at 0.875 -> score (max) 0.875, map mean (15 * 0.125 + 0.875) / 16 = 0.171875
      epoch 2: 0.5 everywhere               -> score 0.5,   map mean 0.5
      epoch 3: 0.75 everywhere              -> score 0.75,  map mean 0.75
    score_mean keeps epoch 2 (0.5 < 0.75 < 0.875), map_mean keeps epoch 1 (0.171875 < 0.5 < 0.75)."""
    maps = torch.ones(1, 2, 3, 4, 4)
    level1 = {1: torch.full((4, 4), 0.125), 2: torch.full((4, 4), 0.5), 3: torch.full((4, 4), 0.75)}[epoch]
    if epoch == 1:
        level1[2, 1] = 0.875
    maps[0, :, 0] = level1
    return maps


@pytest.mark.parametrize("rule, expected_epoch", [("score_mean", 2), ("map_mean", 1)])
def test_selection_rules_keep_the_epochs_derived_by_hand(rule, expected_epoch, monkeypatch, tmp_path: Path):
    params = load_params(None, ["image_size=64", f"model.t1.name={LITE[0]}", "model.t1.weights=random",
                                f"model.t2.name={LITE[1]}", "model.t2.weights=random", "fit.device=cpu",
                                f"fit.select={rule}"])
    trainer = Trainer(params, tmp_path, Compute.resolve("cpu", "float32"), data={})
    monkeypatch.setattr("dualstpm.training.six_maps", lambda model, images, compute, tiling=None: hand_maps(trainer.epochs_done))
    records = []
    for epoch in (1, 2, 3):
        trainer.epochs_done = epoch
        records.append(trainer.select(torch.zeros(1, 3, 64, 64)))
    assert [r["val_score_stpm"] for r in records] == [0.875, 0.5, 0.75]
    assert [r["val_map_mean_recon"] for r in records] == [0.171875, 0.5, 0.75]
    assert {b: trainer.best[b]["epoch"] for b in ("stpm", "recon")} == {"stpm": expected_epoch, "recon": expected_epoch}
    assert trainer.best["stpm"]["score"] == {"score_mean": 0.5, "map_mean": 0.171875}[rule]


# --- model.decoder_width -------------------------------------------------------------------------

def test_decoder_widths_for_resnet50_channels():
    """quarter: 256/4, 512/4, 1024/4 = 64, 128, 256 (within [64, 256]); full: the channels themselves."""
    assert [decoder_width(c, "quarter") for c in RESNET50_CHANNELS] == [64, 128, 256]
    assert [decoder_width(c, "full") for c in RESNET50_CHANNELS] == [256, 512, 1024]
    with pytest.raises(ValueError, match="model.decoder_width"):
        decoder_width(256, "half")  # type: ignore[arg-type]


@pytest.mark.parametrize("width, inner", [("quarter", (64, 128, 256)), ("full", (256, 512, 1024))])
def test_decoder_of_each_width_emits_t2_shapes(width, inner):
    decoder = ReconstructionStudent(512, RESNET50_CHANNELS, width=width).eval()
    assert (decoder.up4.up[0].out_channels, decoder.up8.up[0].out_channels, decoder.up16.up[0].out_channels) == inner
    assert [h.in_channels for h in decoder.heads] == list(inner)
    deep = torch.rand(1, 512, 2, 2)  # T1's stride-32 map of a 64 px image
    guides = [torch.rand(1, c, s, s) for c, s in zip(RESNET50_CHANNELS, (16, 8, 4), strict=True)]
    with torch.no_grad():
        outs = decoder(deep, guides)
    assert [tuple(o.shape) for o in outs] == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 4, 4)]


def test_model_build_passes_the_width_on():
    """Lite2's channels 24/48/120: quarter = max(64, c // 4) = 64 each; full = 24/48/120."""
    assert tiny_model(decoder_width="quarter").s2.up4.up[0].out_channels == 64
    full = tiny_model().s2  # the default: full
    assert (full.up4.up[0].out_channels, full.up8.up[0].out_channels, full.up16.up[0].out_channels) == LITE2_CHANNELS


# --- model.gate_form --------------------------------------------------------------------------------

def force_gate(gate: SpatialAttentionGate, open_: bool) -> None:
    """g = sigmoid(0 * h + b): b = 1e4 gives exactly 1.0 in float32, b = -1e4 exactly 0.0."""
    last = gate.gate[3]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(1e4 if open_ else -1e4)


@pytest.mark.parametrize("residual, open_, factor", [
    (True, False, 1.0), (True, True, 2.0),   # x + x*g: g = 0 keeps x, g = 1 doubles it
    (False, False, 0.0), (False, True, 1.0),  # x*g: g = 0 zeroes x, g = 1 keeps it
])
def test_gate_forms_with_a_forced_gate(residual, open_, factor):
    gate = SpatialAttentionGate(8, residual=residual).eval()
    force_gate(gate, open_)
    x, guide = torch.randn(2, 4, 3, 3), torch.randn(2, 8, 3, 3)
    assert torch.equal(gate(x, guide), factor * x)


@pytest.mark.parametrize("gate_form, stride8_depends_on_deep", [("method", False), ("residual", True)])
def test_method_form_closes_the_stride16_path(gate_form, stride8_depends_on_deep):
    """method: x16 * g16 with g16 = 0 is 0, so everything finer than stride 16 no longer depends
    on T1's deep map; residual: x16 + 0 = x16 flows on. The stride-16 output precedes the gate."""
    torch.manual_seed(0)
    decoder = ReconstructionStudent(320, LITE2_CHANNELS, gate_form=gate_form).eval()
    assert decoder.gate16.residual is (gate_form == "residual") and decoder.gate8.residual
    force_gate(decoder.gate16, open_=False)
    guides = [torch.rand(1, c, s, s) for c, s in zip(LITE2_CHANNELS, (16, 8, 4), strict=True)]
    with torch.no_grad():
        a, b = decoder(torch.rand(1, 320, 2, 2), guides), decoder(torch.rand(1, 320, 2, 2), guides)
    assert not torch.equal(a[2], b[2])
    for level in (0, 1):
        assert torch.equal(a[level], b[level]) is not stride8_depends_on_deep

