"""Fusion of the six maps, validation statistics and threshold calibration (METHOD.md §4)."""

import numpy as np
import pytest
import torch

from dualstpm.model.calibration import (
    MapStatsAccumulator,
    allowed_false_alarms,
    calibrate_threshold,
    calibration_images_needed,
    calibration_note,
    false_alarm_bound,
)
from dualstpm.model.fusion import FusionSpec, fuse, gaussian_blur


def six_maps(seed: int = 0, batch: int = 2, size: int = 5) -> torch.Tensor:
    return torch.rand(batch, 2, 3, size, size, generator=torch.Generator().manual_seed(seed)) + 0.1


def test_published_default_is_per_level_sum_then_product():
    m = six_maps()
    expected = (m[:, 0, 0] + m[:, 1, 0]) * (m[:, 0, 1] + m[:, 1, 1]) * (m[:, 0, 2] + m[:, 1, 2])
    torch.testing.assert_close(fuse(m, FusionSpec()), expected)


def test_sum_mode_with_weights():
    m = six_maps()
    spec = FusionSpec(mode="sum", weights=((1, 2, 0), (0.5, 0, 3)))
    expected = m[:, 0, 0] + 2 * m[:, 0, 1] + 0.5 * m[:, 1, 0] + 3 * m[:, 1, 2]
    torch.testing.assert_close(fuse(m, spec), expected)


def test_branch_views_ignore_the_other_branch_exactly():
    m = six_maps()
    changed = m.clone()
    changed[:, 1] = torch.rand_like(changed[:, 1]) * 100  # branch B replaced by garbage
    spec = FusionSpec()
    assert torch.equal(fuse(m, spec.view("stpm")), fuse(changed, spec.view("stpm")))
    assert not torch.equal(fuse(m, spec.view("recon")), fuse(changed, spec.view("recon")))
    torch.testing.assert_close(fuse(m, spec.view("stpm")), m[:, 0].prod(dim=1))


def test_level_with_zero_weights_is_left_out_of_the_product():
    m = six_maps()
    spec = FusionSpec(weights=((1, 0, 0), (1, 0, 0)))
    torch.testing.assert_close(fuse(m, spec), m[:, 0, 0] + m[:, 1, 0])


def test_val_stats_normalisation():
    # Two validation images of one pixel; every map is 1 on the first and 3 on the second
    # (fed in two batches), so each map's mean is 2 and its (population) std is 1.
    m = torch.tensor([1.0, 3.0])[:, None, None, None, None].expand(2, 2, 3, 1, 1).contiguous()
    acc = MapStatsAccumulator()
    acc.update(m[:1])
    acc.update(m[1:])
    stats = acc.result()
    assert stats.mean.tolist() == [[2.0] * 3] * 2 and stats.std.tolist() == [[1.0] * 3] * 2
    # sum: each of the six maps standardised to (1 - 2) / 1 = -1 and (3 - 2) / 1 = +1, summed.
    z = fuse(m, FusionSpec(mode="sum", normalize="val_stats"), stats)
    assert z.flatten().tolist() == [-6.0, 6.0]
    # product: each map divided by its mean, 0.5 and 1.5; per level 0.5 + 0.5 = 1 and 1.5 + 1.5 = 3;
    # across the three levels 1 * 1 * 1 = 1 and 3 * 3 * 3 = 27.
    p = fuse(m, FusionSpec(mode="product", normalize="val_stats"), stats)
    assert p.flatten().tolist() == [1.0, 27.0]


def test_gaussian_blur_keeps_mass_and_spreads_a_peak():
    impulse = torch.zeros(1, 41, 41)
    impulse[0, 20, 20] = 1.0
    blurred = gaussian_blur(impulse, sigma=4.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert blurred[0, 20, 20] < 0.02 and blurred[0, 20, 24] > 0.005


def test_threshold_flags_at_most_the_false_alarm_rate():
    scores = np.arange(1, 201, dtype=float)
    # n = 200 at 1 %: k = floor(0.01 * 201) - 1 = 1 score may lie above, so the threshold is the 2nd largest
    t = calibrate_threshold(scores, 0.01)
    assert t == 199 and (scores > t).sum() == 1
    assert false_alarm_bound(200, 0.01) == pytest.approx(2 / 201) and 2 / 201 <= 0.01
    few = np.array([0.3, 0.1, 0.2])
    assert calibrate_threshold(few, 0.01) == 0.3  # with few images: the max, so no good part is flagged
    assert false_alarm_bound(3, 0.01) == pytest.approx(1 / 4)  # ... yet a new good part is, one time in n + 1


def test_the_conformal_rank_by_hand():
    # the largest k with (k + 1) / (n + 1) <= rate; -1 when even k = 0 breaks it
    assert allowed_false_alarms(99, 0.01) == 0 and allowed_false_alarms(98, 0.01) == -1
    assert allowed_false_alarms(19, 0.05) == 0 and allowed_false_alarms(18, 0.05) == -1
    assert allowed_false_alarms(59, 0.05) == 2  # 3 / 60 = 0.05
    assert calibration_images_needed(0.01) == 99 and calibration_images_needed(0.05) == 19
    assert calibration_images_needed(0.1) == 9 and calibration_images_needed(0.03) == 33  # 0.03 * 34 >= 1 > 0.03 * 33
    assert calibration_note(99, 0.01) is None
    note = calibration_note(4, 0.01)
    assert "4 calibration images cannot keep calibration.false_alarm_rate=0.01" in note
    assert "1/5 = 0.2" in note and "99 are needed" in note and "validation/good" in note


def test_new_good_parts_are_flagged_at_the_promised_rate():
    """Exchangeable good scores: the share of new ones above a threshold calibrated on n is
    (k+1)/(n+1) (here 2/50 = 4 %, within the 5 % target); the empirical quantile the threshold
    used to be (k = floor(rate * n) = 2) flags 3/50 = 6 %, above the target."""
    rng = np.random.default_rng(0)
    n, rate, trials = 49, 0.05, 40000
    calibration = rng.normal(size=(trials, n))
    new = rng.normal(size=trials)
    flagged = np.mean([new[i] > calibrate_threshold(calibration[i], rate) for i in range(trials)])
    assert false_alarm_bound(n, rate) == pytest.approx(2 / 50)
    assert abs(flagged - 2 / 50) < 0.004 and flagged <= rate  # binomial sd ~ 0.001
    ordered = np.sort(calibration, axis=1)
    old_rule = np.mean(new > ordered[:, n - 1 - int(np.floor(rate * n))])
    assert abs(old_rule - 3 / 50) < 0.004 and old_rule > rate


def test_named_views_fused_is_the_params_fusion_and_chosen_the_applied_one():
    """Six constant maps at 1..6 (branch A: 1, 2, 3; branch B: 4, 5, 6), by hand: `fused`
    (the params' product) = (1+4)(2+5)(3+6) = 315 whatever fusion was chosen; `chosen` (sum)
    = 21; `stpm` = 1*2*3 = 6; `recon` = 4*5*6 = 120; a stored float16 stack scores alike."""
    from dualstpm.model.fusion import MapStats, ScoreSpec
    from dualstpm.model.inference import CHOSEN_VIEW, MapViews

    levels = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    views = MapViews(FusionSpec(), MapStats(levels, torch.ones(2, 3)), score=ScoreSpec(),
                     chosen=FusionSpec(mode="sum"))
    assert views.views == ("fused", "stpm", "recon", CHOSEN_VIEW)
    maps = levels[None, :, :, None, None].expand(2, 2, 3, 4, 4).contiguous()
    scored = views.score_maps(maps, views.views)
    expected = {"fused": 315.0, "stpm": 6.0, "recon": 120.0, CHOSEN_VIEW: 21.0}
    for view, value in expected.items():
        assert torch.equal(scored.maps[view], torch.full((2, 4, 4), value)), view
        assert scored.scores[view].tolist() == [value, value]
        stack_maps, stack_scores = views.stack(maps.numpy().astype(np.float16), view)
        assert stack_maps.shape == (2, 4, 4) and stack_scores.tolist() == [value, value]
    assert views.stack(maps.numpy(), FusionSpec(mode="sum", weights=((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))))[1].tolist() == [6.0, 6.0]
    assert views.typical_level("fused") == 315.0 and views.typical_level(CHOSEN_VIEW) == 21.0
    with pytest.raises(ValueError, match="no view 'disc'"):
        views.view_maps(maps, ("disc",))
