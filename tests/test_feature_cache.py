"""The teacher-feature cache: same training signal, computed once, in RAM or on disk."""

from pathlib import Path

import pytest
import torch

from dualstpm.config import load_params
from dualstpm.feature_cache import TeacherFeatureCache
from dualstpm.models.torch_model import DualStpmModel
from dualstpm.training import fit

from conftest import TINY_OVERRIDES


@pytest.mark.parametrize("budget_gb, location", [(4.0, "ram"), (0.0, "disk")])
def test_cached_features_equal_fresh_ones_to_float16(budget_gb, location, tmp_path: Path):
    torch.manual_seed(0)
    model = DualStpmModel.build(load_params(None, TINY_OVERRIDES).model)
    images = torch.rand(5, 3, 64, 64)
    cache = TeacherFeatureCache.build(model, images, 2, torch.device("cpu"), budget_gb * 2**30, tmp_path)
    assert cache.location == location
    indices = torch.tensor([4, 0, 2])
    cached = cache.batch(indices, torch.device("cpu")).tensors()
    fresh = model.teacher_features(images[indices]).tensors()
    for a, b in zip(cached, fresh, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    cache.close()
    assert list(tmp_path.iterdir()) == []  # a disk spill is deleted


def test_first_epoch_losses_match_without_cache(synthetic_root: Path, tmp_path: Path):
    one = ["fit.epochs=1"]
    with_cache = fit(load_params(None, TINY_OVERRIDES + one), synthetic_root, "synth_texture", tmp_path / "a")
    without = fit(load_params(None, TINY_OVERRIDES + one + ["fit.cache=false"]), synthetic_root, "synth_texture", tmp_path / "b")
    for key in ("loss_stpm", "loss_recon"):
        assert with_cache.history[0][key] == pytest.approx(without.history[0][key], rel=1e-3)
    assert not any(p.name.startswith(".feature-cache") for p in (tmp_path / "a").iterdir())
