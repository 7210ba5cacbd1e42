"""`fit.schedule`: the learning rate of every step, and that a fit applies and resumes it."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dualstpm.config import FitParams, load_params
from dualstpm.errors import TrainingError
from dualstpm.training import fit, learning_rate

from conftest import TINY_OVERRIDES


def test_cosine_rates_by_hand():
    """2 epochs x 2 batches = 4 steps, t = 0..3: lr (1 + cos(pi t / 4)) / 2 with cos(pi/4) = sqrt(2)/2."""
    params = FitParams(epochs=2, lr=0.4, schedule="cosine")
    rates = [learning_rate(params, epoch, batch, 2) for epoch in (1, 2) for batch in (0, 1)]
    half_root2 = math.sqrt(2) / 2
    expected = [0.4, 0.2 * (1 + half_root2), 0.2, 0.2 * (1 - half_root2)]
    assert rates == pytest.approx(expected, abs=1e-12)
    assert rates[-1] > 0  # the last step still moves; the rate reaches 0 only after it


def test_constant_is_the_learning_rate_on_every_step():
    params = FitParams(epochs=3, lr=0.25)
    assert {learning_rate(params, e, b, 5) for e in (1, 2, 3) for b in range(5)} == {0.25}


def test_unknown_schedule_is_refused_naming_the_key():
    with pytest.raises(Exception, match="fit.schedule"):
        load_params(None, ["fit.schedule=step"])


def test_a_cosine_fit_interrupted_and_resumed_ends_where_an_uninterrupted_one_ends(
        synthetic_root: Path, tmp_path: Path):
    """Ctrl-C after epoch 1 of 2; the resumed fit replays epoch 2's rates (not epoch 1's), so its
    weights equal the uninterrupted fit's; a constant-rate fit of 2 epochs ends elsewhere."""
    cosine = load_params(None, TINY_OVERRIDES + ["fit.schedule=cosine"])  # 2 epochs
    whole, interrupted, constant = tmp_path / "whole", tmp_path / "interrupted", tmp_path / "constant"
    fit(cosine, synthetic_root, "synth_texture", whole)

    def stop_after_epoch_1(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cosine, synthetic_root, "synth_texture", interrupted, on_epoch=stop_after_epoch_1)
    fit(cosine, synthetic_root, "synth_texture", interrupted, resume=True)
    fit(load_params(None, TINY_OVERRIDES), synthetic_root, "synth_texture", constant)
    a, b, c = (load_file(r / "model/weights.safetensors") for r in (whole, interrupted, constant))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_cosine_fit_cannot_resume_into_another_length(synthetic_root: Path, tmp_path: Path):
    """Under cosine, fit.epochs sets every step's rate: 1 epoch of a 1-epoch fit is not epoch 1 of 2."""
    run = tmp_path / "run"
    fit(load_params(None, TINY_OVERRIDES + ["fit.schedule=cosine", "fit.epochs=1"]), synthetic_root, "synth_texture", run)
    with pytest.raises(TrainingError) as info:
        fit(load_params(None, TINY_OVERRIDES + ["fit.schedule=cosine"]), synthetic_root, "synth_texture", run,
            resume=True)
    assert "fit.epochs=1" in str(info.value) and "--set fit.epochs=1" in str(info.value) and "--overwrite" in str(info.value)
