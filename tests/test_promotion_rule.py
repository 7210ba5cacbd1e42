"""The promotion rule (`dualstpm.mlops.promote.decide`) on hand-worked cases: no store, no model.

Each expected outcome is worked out from the rule as documented: a first champion must
reach the floor (>=); a challenger must beat the champion on the same evaluation data by
more than the margin (strictly); a missing metric, other data or the champion itself is
never promoted; NaN compares false, so it is never promoted and never beaten.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from dualstpm.mlops.promote import Standing, decide

DATA = "d" * 32 + ".dir"


def standing(version: str, value: float | None, data_hash: str | None = DATA, metric: str = "image_auroc") -> Standing:
    return Standing(version, {metric: value}, data_hash)


@pytest.mark.parametrize(("value", "floor", "promoted"), [
    (0.79, 0.80, False),  # below the floor
    (0.80, 0.80, True),   # at the floor: >= reaches it
    (0.95, 0.80, True),   # above
    (0.0, 0.0, True),     # a floor of 0 admits anything measured
])
def test_the_first_champion_must_reach_the_floor(value: float, floor: float, promoted: bool):
    assert decide(standing("1", value), None, "image_auroc", 0.0, floor)[0] is promoted


def test_the_reasons_say_what_was_compared():
    assert decide(standing("1", 0.79), None, "image_auroc", 0.0, 0.8) == (
        False, "image_auroc 0.7900 is below the floor 0.8000 (tracking.promotion_floor) for a first champion")
    assert decide(standing("1", 0.85), None, "image_auroc", 0.0, 0.8) == (
        True, "first champion: image_auroc 0.8500 >= floor 0.8000")
    assert decide(standing("2", 0.95), standing("1", 0.90), "image_auroc", 0.02, 0.8) == (
        True, "image_auroc 0.9500 beats the champion's 0.9000 (version 1) by more than 0.02")
    assert decide(standing("2", 0.91), standing("1", 0.90), "image_auroc", 0.02, 0.8) == (
        False, "image_auroc 0.9100 does not beat the champion's 0.9000 (version 1) by more than 0.02")


@pytest.mark.parametrize(("challenger", "champion", "min_delta", "promoted"), [
    (0.95, 0.90, 0.0, True),     # better, no margin asked
    (0.95, 0.90, 0.02, True),    # 0.95 > 0.90 + 0.02
    (0.91, 0.90, 0.02, False),   # better, but not by the margin
    (0.90, 0.90, 0.0, False),    # a tie is not promoted
    (0.875, 0.75, 0.125, False),  # exactly the margin (binary-exact values): "more than" is strict
    (0.875, 0.75, 0.0625, True),
    (0.85, 0.90, 0.0, False),    # worse
])
def test_a_challenger_must_beat_the_champion_by_more_than_the_margin(challenger: float, champion: float,
                                                                      min_delta: float, promoted: bool):
    # the floor only gates a first champion: 0.99 here must not matter
    assert decide(standing("2", challenger), standing("1", champion), "image_auroc", min_delta, 0.99)[0] is promoted


def test_a_missing_metric_is_never_promoted():
    no_value = standing("2", None)
    assert decide(no_value, None, "image_auroc", 0.0, 0.0) == (
        False, "the challenger has no image_auroc (null for this data); choose another --metric")
    assert decide(no_value, standing("1", 0.5), "image_auroc", 0.0, 0.0)[0] is False
    assert decide(standing("2", 0.99), standing("1", None), "image_auroc", 0.0, 0.0) == (
        False, "the champion (version 1) has no image_auroc; choose another --metric")
    other_metric = standing("2", 0.99, metric="aupro")  # measured, but not on the metric asked
    assert decide(other_metric, None, "image_auroc", 0.0, 0.0)[0] is False


def test_only_results_on_the_same_data_are_compared():
    better_elsewhere = standing("2", 0.99, data_hash="e" * 32 + ".dir")
    promoted, reason = decide(better_elsewhere, standing("1", 0.5), "image_auroc", 0.0, 0.0)
    assert not promoted and reason.startswith("not comparable: the challenger was evaluated on data eeee")
    untagged = standing("2", 0.99, data_hash=None)  # no hash on either side is not "the same data"
    assert decide(untagged, standing("1", 0.5, data_hash=None), "image_auroc", 0.0, 0.0)[0] is False
    assert decide(standing("2", 0.99, data_hash=""), standing("1", 0.5, data_hash=""), "image_auroc", 0.0, 0.0)[0] is False


def test_the_champion_is_not_promoted_again():
    assert decide(standing("3", 0.99), standing("3", 0.5), "image_auroc", 0.0, 0.0) == (
        False, "version 3 is already the champion")


def test_nan_is_never_promoted_and_never_beaten():
    nan = math.nan
    assert decide(standing("1", nan), None, "image_auroc", 0.0, 0.0)[0] is False  # nan >= 0 is false
    assert decide(standing("2", nan), standing("1", 0.5), "image_auroc", 0.0, 0.0)[0] is False
    assert decide(standing("2", 0.99), standing("1", nan), "image_auroc", 0.0, 0.0)[0] is False  # 0.99 > nan is false


def test_a_standing_is_read_from_the_version_tags_register_writes():
    version = SimpleNamespace(version=7, tags={"metric.image_auroc": repr(0.9375), "metric.aupro": "null",
                                               "metric.pixel_auroc": "", "dualstpm.data_hash": DATA})
    assert Standing.of(version, "image_auroc") == Standing("7", {"image_auroc": 0.9375}, DATA)  # int from SQLite: "7"
    assert Standing.of(version, "aupro").metrics == {"aupro": None}  # null for its data
    assert Standing.of(version, "pixel_auroc").metrics == {"pixel_auroc": None}
    assert Standing.of(version, "image_f1_max").metrics == {"image_f1_max": None}  # not tagged
    assert Standing.of(SimpleNamespace(version="7", tags={}), "aupro").data_hash is None
