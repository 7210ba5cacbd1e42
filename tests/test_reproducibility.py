"""Same params, same figures: a fit's randomness is its own, whatever runs beside it."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dualstpm.rng import own_rng
from dualstpm.training import fit


def _figures(run_dir: Path) -> dict:
    """Everything a fit produces that a comparison could catch drifting: per-epoch losses and
    validation scores, calibration (thresholds, map statistics) and every weight."""
    return {
        "history": (run_dir / "history.csv").read_text(),
        "calibration": (run_dir / "model" / "calibration.json").read_text(),
        "weights": (run_dir / "model" / "weights.safetensors").read_bytes(),
    }


def _global_rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state()[1].tolist(), random.getstate()


def _layers() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))


def test_own_rng_draws_what_a_lone_seeded_thread_draws_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_init = _layers().state_dict()
    expected_noise = torch.randn(5)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    with own_rng(123):
        init = _layers().state_dict()
        noise = torch.randn(5)
    assert torch.equal(torch.get_rng_state(), before)  # not advanced: nothing was drawn from it
    assert all(torch.equal(init[k], expected_init[k]) for k in expected_init)
    assert torch.equal(noise, expected_noise)


def test_concurrent_fits_give_a_solo_fits_figures_while_another_thread_draws(
        synthetic_root: Path, tiny_params, tmp_path: Path) -> None:
    before = _global_rng_states()
    fit(tiny_params, synthetic_root, "synth_texture", tmp_path / "solo")
    solo = _figures(tmp_path / "solo")
    # A fit reads and writes none of the process-wide RNGs (torch, NumPy, random).
    after = _global_rng_states()
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]

    stop = threading.Event()

    def draw_meanwhile() -> None:
        while not stop.is_set():
            torch.rand(64)
            torch.nn.Linear(8, 8)  # a model built elsewhere, from the global RNG

    errors: list[BaseException] = []

    def fit_into(name: str) -> None:
        try:
            fit(tiny_params, synthetic_root, "synth_texture", tmp_path / name)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    drawer = threading.Thread(target=draw_meanwhile)
    fits = [threading.Thread(target=fit_into, args=(name,)) for name in ("a", "b")]
    drawer.start()
    for thread in fits:
        thread.start()
    for thread in fits:
        thread.join()
    stop.set()
    drawer.join()
    assert not errors, errors
    assert _figures(tmp_path / "a") == solo
    assert _figures(tmp_path / "b") == solo
