"""`studies.recall_transfer`: recall at the product's calibrated threshold, and the pick, by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest


def test_recall_at_a_threshold_that_is_the_highest_of_few_good_scores():
    from studies.recall_transfer import recall_at_calibrated_threshold

    # 3 good calibration scores at 1 %: floor(0.01 * 4) - 1 = -1 allowed, so the threshold is their maximum 0.3;
    # strictly above it: 0.35 and 0.9 of the four defects (0.3 itself is not), none of the one good image
    recall, far = recall_at_calibrated_threshold(np.array([0.1, 0.2, 0.3]), np.array([0.25, 0.3, 0.35, 0.9, 0.1]),
                                                 np.array([1, 1, 1, 1, 0]), 0.01)
    assert (recall, far) == (0.5, 0.0)


def test_recall_at_a_threshold_that_allows_one_false_alarm():
    from studies.recall_transfer import recall_at_calibrated_threshold

    # 199 good scores 1..199 at 1 %: floor(0.01 * 200) - 1 = 1 allowed, so the threshold is the 2nd largest, 198
    recall, far = recall_at_calibrated_threshold(np.arange(1.0, 200.0), np.array([198.0, 198.5, 199.5]),
                                                 np.array([1, 1, 1]), 0.01)
    assert recall == pytest.approx(2 / 3) and far is None
    with pytest.raises(ValueError, match="no defective image"):
        recall_at_calibrated_threshold(np.arange(1.0, 5.0), np.array([1.0]), np.array([0]), 0.01)


def test_the_pick_is_the_highest_mean_and_ties_go_to_the_first_row():
    from studies.recall_transfer import mean_pick

    table = pd.DataFrame({"a": [0.9, 0.8, 0.95], "b": [0.8, 0.95, 0.75]})  # means 0.85, 0.875, 0.85
    assert mean_pick(table, ["a", "b"]) == 1
    assert mean_pick(table, ["a"]) == 2
    assert mean_pick(pd.DataFrame({"a": [0.5, 0.5]}), ["a"]) == 0
