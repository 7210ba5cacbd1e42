"""The teacher-feature cache: same training signal, computed once, in RAM or on disk."""

from pathlib import Path

import pytest
import torch

from dualstpm.compute import Compute
from dualstpm.config import load_params
from dualstpm.feature_cache import TeacherFeatureCache
from dualstpm.detector import build_network
from dualstpm.training import fit

from conftest import TINY_OVERRIDES


@pytest.mark.parametrize("budget_gb, location", [(4.0, "ram"), (0.0, "disk")])
def test_cached_features_equal_fresh_ones_to_float16(budget_gb, location, tmp_path: Path):
    torch.manual_seed(0)
    model = build_network(load_params(None, TINY_OVERRIDES).model)
    images = torch.rand(5, 3, 64, 64)
    cpu = Compute(torch.device("cpu"), torch.float32)
    cache = TeacherFeatureCache.build(model, images, 2, cpu, budget_gb * 2**30, tmp_path)
    assert cache.location == location
    indices = torch.tensor([4, 0, 2])
    cached = cache.batch(indices, cpu).tensors()
    fresh = model.teacher_features(images[indices]).tensors()
    for a, b in zip(cached, fresh, strict=True):
        assert a.dtype == torch.float32 and a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    cache.close()
    assert list(tmp_path.iterdir()) == []  # a disk spill is deleted


@pytest.mark.parametrize("budget_gb", [4.0, 0.0])
def test_bfloat16_teacher_outputs_are_cached_exactly(budget_gb, tmp_path: Path):
    torch.manual_seed(0)
    model = build_network(load_params(None, TINY_OVERRIDES).model)
    images = torch.rand(4, 3, 64, 64)
    low = Compute(torch.device("cpu"), torch.bfloat16)
    cache = TeacherFeatureCache.build(model, images, 3, low, budget_gb * 2**30, tmp_path)
    indices = torch.tensor([3, 1])
    with low.autocast():
        fresh = model.teacher_features(low.images(images[indices])).tensors()
    for a, b in zip(cache.batch(indices, low).tensors(), fresh, strict=True):
        assert a.dtype == b.dtype == torch.bfloat16
        assert torch.equal(a, b)
    cache.close()


def test_first_epoch_losses_match_without_cache(synthetic_root: Path, tmp_path: Path):
    one = ["fit.epochs=1"]
    with_cache = fit(load_params(None, TINY_OVERRIDES + one), synthetic_root, "synth_texture", tmp_path / "a")
    without = fit(load_params(None, TINY_OVERRIDES + one + ["fit.cache=false"]), synthetic_root, "synth_texture", tmp_path / "b")
    for key in ("loss_stpm", "loss_recon"):
        assert with_cache.history[0][key] == pytest.approx(without.history[0][key], rel=1e-3)
    assert not any(p.name.startswith(".feature-cache") for p in (tmp_path / "a").iterdir())
