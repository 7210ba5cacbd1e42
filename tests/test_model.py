"""The dual student-teacher network: shapes, losses, frozen teachers (METHOD.md §2-3)."""

import pytest
import torch

from dualstpm.config import ModelParams
from dualstpm.model.loss import distance_map, distance_map_chunked, pyramid_loss
from dualstpm.model.recon import ReconstructionStudent
from dualstpm.detector import build_network


def params(t1: str, t2: str, weights: str = "random", attention: str = "spatial") -> ModelParams:
    return ModelParams.model_validate(
        {"t1": {"name": t1, "weights": weights}, "t2": {"name": t2, "weights": weights}, "attention": attention}
    )


def test_distance_is_half_squared_distance_of_normalised_features():
    t, s = torch.randn(2, 7, 3, 3), torch.randn(2, 7, 3, 3)
    expected = 0.5 * ((t / t.norm(dim=1, keepdim=True) - s / s.norm(dim=1, keepdim=True)) ** 2).sum(1)
    torch.testing.assert_close(distance_map(t, s), expected, rtol=1e-5, atol=1e-6)
    assert pyramid_loss([t, t], [s, s]).item() == pytest.approx(2 * expected.mean().item(), rel=1e-5)


def test_distance_of_a_zero_student_is_one_not_nan():
    t = torch.randn(1, 4, 2, 2)
    torch.testing.assert_close(distance_map(t, torch.zeros_like(t)), torch.ones(1, 2, 2))


@pytest.mark.parametrize("elements", [1, 40, 10**6])  # one image per chunk, a few, all at once
def test_chunked_distance_equals_the_whole_batch(elements):
    t, s = torch.randn(7, 5, 4, 2), torch.randn(7, 5, 4, 2)
    torch.testing.assert_close(distance_map_chunked(t, s, elements), distance_map(t, s), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("t1, t2, channels", [
    ("tf_efficientnet_lite0", "tf_efficientnet_lite2", (24, 48, 120)),
    ("resnet18", "resnet50", (256, 512, 1024)),
])
def test_six_maps_at_input_size_and_decoder_matches_t2(t1, t2, channels):
    torch.manual_seed(0)
    model = build_network(params(t1, t2))
    images = torch.rand(2, 3, 64, 64)
    model.train()
    pairs = model(images)
    assert [f.shape[1] for f in pairs.student_b] == list(channels)
    for teacher, student in zip(pairs.teacher_b + pairs.teacher_a, pairs.student_b + pairs.student_a):
        assert teacher.shape == student.shape
    assert [f.shape[-1] for f in pairs.teacher_a] == [16, 8, 4]
    model.eval()
    maps = model(images)
    assert maps.shape == (2, 2, 3, 64, 64)
    assert (maps >= 0).all() and (maps <= 2 + 1e-6).all()


def test_only_students_learn():
    torch.manual_seed(0)
    model = build_network(params("tf_efficientnet_lite0", "tf_efficientnet_lite2"))
    model.train()
    loss_a, loss_b = model(torch.rand(2, 3, 64, 64)).losses()
    (loss_a + loss_b).backward()
    assert all(p.grad is None for p in model.t1.parameters())
    assert all(p.grad is None for p in model.t2.parameters())
    assert not model.t1.training and not model.t2.training
    assert any(p.grad is not None for p in model.s1.parameters())
    assert any(p.grad is not None for p in model.s2.parameters())


def test_branch_losses_reach_only_their_own_student():
    torch.manual_seed(0)
    model = build_network(params("tf_efficientnet_lite0", "tf_efficientnet_lite2"))
    model.train()
    loss_a, _ = model(torch.rand(2, 3, 64, 64)).losses()
    loss_a.backward()
    assert all(p.grad is None for p in model.s2.parameters())


def test_training_losses_of_some_branches_run_only_the_networks_they_need():
    """`losses` is what `Trainer.train_epoch` (and so `dualstpm bench`) trains on: the same
    values as the pyramids' losses; branch A alone runs neither T2 nor S2."""
    torch.manual_seed(0)
    model = build_network(params("tf_efficientnet_lite0", "tf_efficientnet_lite2"))
    model.train()
    images = torch.rand(2, 3, 64, 64)
    both = model.losses(images)
    loss_a, loss_b = model.pyramids(images).losses()
    assert set(both) == {"stpm", "recon"} and both["stpm"].item() == loss_a.item() and both["recon"].item() == loss_b.item()

    def unused(*_):
        raise AssertionError("branch A alone must not run T2 or S2")

    model.t2.forward = model.s2.forward = unused
    alone = model.losses(images, branches=("stpm",))
    assert set(alone) == {"stpm"} and alone["stpm"].item() == loss_a.item()


def test_attention_gate_can_be_switched_off():
    with_gate = ReconstructionStudent(320, (24, 48, 120), attention=True)
    without = ReconstructionStudent(320, (24, 48, 120), attention=False)
    assert hasattr(with_gate, "gate16") and not hasattr(without, "gate16")
    deep = torch.rand(1, 320, 2, 2)
    guides = [torch.rand(1, 24, 16, 16), torch.rand(1, 48, 8, 8), torch.rand(1, 120, 4, 4)]
    outs = without(deep, guides)
    assert [o.shape[1:] for o in outs] == [(24, 16, 16), (48, 8, 8), (120, 4, 4)]


def test_gate_uses_t2_features_of_the_coarser_levels():
    torch.manual_seed(0)
    decoder = ReconstructionStudent(320, (24, 48, 120)).eval()
    deep = torch.rand(1, 320, 2, 2)
    guides = [torch.rand(1, 24, 16, 16), torch.rand(1, 48, 8, 8), torch.rand(1, 120, 4, 4)]
    base = decoder(deep, guides)
    moved = decoder(deep, [guides[0], guides[1], guides[2] * 5])
    assert torch.equal(base[2], moved[2])  # a level's output never sees T2's feature of that level
    assert not torch.equal(base[0], moved[0])  # but the stride-16 gate shapes the finer levels

