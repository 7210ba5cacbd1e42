"""The memory view (`dualstpm.model.memory`): PatchCore's nearest-neighbour distance, with
expected values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from dualstpm.model.memory import (MemoryBank, coreset_size, flatten_patches, greedy_coreset, nearest_distance,
                                   patch_features)


def test_nearest_distance_is_the_euclidean_distance_to_the_closest_bank_row():
    bank = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    queries = torch.tensor([[0.0, 0.0], [3.0, 0.0], [6.0, 8.0], [-3.0, -4.0]])
    # (0,0) is in the bank; (3,0) is 3 from (0,0) and 4 from (3,4); (6,8) is 5 from (3,4); (-3,-4) is 5 from (0,0)
    assert nearest_distance(queries, bank).tolist() == pytest.approx([0.0, 3.0, 5.0, 5.0], abs=1e-6)
    # chunking the queries changes nothing
    assert nearest_distance(queries, bank, chunk=1).tolist() == pytest.approx([0.0, 3.0, 5.0, 5.0], abs=1e-6)


def test_nearest_distance_refuses_an_empty_bank_and_mismatched_dimensions():
    with pytest.raises(ValueError, match="non-empty"):
        nearest_distance(torch.zeros(2, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="3 dimensions, the memory bank 2"):
        nearest_distance(torch.zeros(2, 3), torch.zeros(4, 2))


def test_greedy_coreset_adds_the_farthest_point_each_time():
    points = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0]])
    first = int(greedy_coreset(points, 1, seed=3)[0])
    picks = greedy_coreset(points, 3, seed=3).tolist()
    assert picks[0] == first
    # by hand from a start at 0: farthest is 11 (index 4); then 2 is 2 from {0, 11}, 1 and 10 only 1
    # from 1: 11, then 0, 2 and 10 are all 1 away: a tie goes to the lowest index, 0
    starts = {0: [0, 4, 2], 1: [1, 4, 0], 2: [2, 4, 0], 3: [3, 0, 2], 4: [4, 0, 2]}
    assert picks == starts[first]


def test_greedy_coreset_projection_is_seeded_and_the_count_is_checked():
    x = torch.randn(50, 300, generator=torch.Generator().manual_seed(0))
    a = greedy_coreset(x, 5, seed=1, projection_dim=16)
    assert torch.equal(a, greedy_coreset(x, 5, seed=1, projection_dim=16))
    assert len(set(a.tolist())) == 5  # never the same point twice: a chosen point is 0 from the set
    with pytest.raises(ValueError, match="coreset of 0 points"):
        greedy_coreset(x, 0)
    with pytest.raises(ValueError, match="coreset of 51 points cannot be drawn from 50"):
        greedy_coreset(x, 51)


def test_coreset_size_is_the_ratio_of_the_patches_at_least_one():
    assert coreset_size(625_000, 0.01) == 6250
    assert coreset_size(30, 0.01) == 1  # 0.3 rounds to 0: one entry at least
    with pytest.raises(ValueError, match=r"coreset ratio must be in \(0, 1\], got 0"):
        coreset_size(10, 0.0)


def test_patch_features_average_3x3_neighbourhoods_and_upsample_the_coarse_level():
    fine = torch.zeros(1, 1, 4, 4)
    fine[0, 0, 0, 0] = 9.0
    coarse = torch.full((1, 2, 2, 2), 9.0)
    out = patch_features([fine, coarse])
    assert out.shape == (1, 3, 4, 4)
    # the 3x3 mean counts the zero padding: 9 / 9 = 1 at (0, 0) and at (1, 1); (2, 2) is out of reach
    assert out[0, 0, 0, 0] == pytest.approx(1.0)
    assert out[0, 0, 1, 1] == pytest.approx(1.0)
    assert out[0, 0, 2, 2] == 0.0
    # a constant 9 on a 2x2 map: at a corner the window holds 4 of 9 cells (the rest padding), so 4; bilinear
    # upsampling of a constant 4 stays 4
    assert torch.allclose(out[0, 1:], torch.full((2, 4, 4), 4.0))
    with pytest.raises(ValueError, match="at least one feature level"):
        patch_features([])


def test_flatten_patches_is_row_major_per_image():
    features = torch.arange(2 * 1 * 2 * 2, dtype=torch.float32).reshape(2, 1, 2, 2)
    assert flatten_patches(features)[:, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]


def test_a_full_bank_scores_its_own_images_zero_and_a_new_patch_by_its_distance():
    generator = torch.Generator().manual_seed(0)
    levels = [torch.rand(2, 4, 4, 4, generator=generator), torch.rand(2, 6, 2, 2, generator=generator)]
    features = patch_features(levels)
    memory = MemoryBank.build(flatten_patches(features), ratio=1.0, sigma=0.0)
    assert len(memory.bank) == 2 * 4 * 4
    assert memory(levels, (16, 16)).abs().max() == 0.0  # every patch is in the bank: its own nearest row
    # one patch moved by a known vector: distance 5 there when nothing else in the bank is closer
    shifted = features.clone()
    shifted[0, :, 1, 2] += 1000.0  # far from every bank row: its distance is to the nearest of them
    distances = memory.patch_distances(shifted)
    expected = nearest_distance(shifted[0, :, 1, 2][None], memory.bank)[0]
    assert distances[0, 1, 2] == pytest.approx(float(expected), rel=1e-4)
    assert float(expected) > 900.0
    assert distances[1].abs().max() == 0.0


def test_memory_map_is_the_distance_upsampled_and_blurred_to_the_image_size():
    memory = MemoryBank(torch.zeros(1, 2), sigma=4.0)
    # 1x1 levels: the 3x3 mean of 9 (padding counted) is 1, of 18 is 2; the patch (1, 2) is sqrt(5) from the
    # bank's origin; a constant map stays constant under bilinear upsampling and a normalised blur
    levels = [torch.full((1, 1, 1, 1), 9.0), torch.full((1, 1, 1, 1), 18.0)]
    out = memory(levels, (40, 48))  # wider than the blur radius of 16 px (reflect padding)
    assert out.shape == (1, 40, 48)
    assert torch.allclose(out, torch.full((1, 40, 48), 5.0**0.5))
    with pytest.raises(ValueError, match="non-empty"):
        MemoryBank(torch.zeros(0, 2))
