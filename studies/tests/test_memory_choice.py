"""The pooled bootstrap choice of `studies.memory_choice`, on hand-made scores."""

from __future__ import annotations

import pytest


def dataset(name: str, fused: tuple[list, list], memory: tuple[list, list], both: tuple[list, list],
            pixel: dict[str, float]) -> dict:
    views = {"fused": fused, "memory": memory, "fused+memory": both}
    return {"category": name, "image_size": 64,
            "validation": {"real": None, "synthetic": {v: {"image_auroc": None, "pixel_auroc": pixel[v]} for v in views}},
            "validation_scores": {"synthetic": {v: {"good": g, "defect": d, "defect_base": list(range(len(d)))}
                                                for v, (g, d) in views.items()}}}


def test_a_view_that_separates_perfectly_where_fused_does_not_is_chosen():
    from studies.memory_choice import auroc, choose

    # fused interleaves goods and defects: defect 0.55 beats 1 good, 0.65 two, 0.75 three, 0.85 four: 10/16
    good, bad = [0.5, 0.6, 0.7, 0.8], [0.55, 0.65, 0.75, 0.85]
    assert auroc(good, bad) == pytest.approx(10 / 16)
    perfect = ([0.1, 0.2, 0.3, 0.4], [0.6, 0.7, 0.8, 0.9])
    pixel = {"fused": 0.9, "memory": 0.9, "fused+memory": 0.9}
    results = [dataset(f"d{i}", (good, bad), perfect, perfect, pixel) for i in range(2)]
    out = choose(results, resamples=200)
    # the candidates are perfect (1) in every resample, fused below 1 in almost all: gain 6/16 on the full sets
    assert out["gains"]["memory"]["mean_gain"] == pytest.approx(6 / 16)
    assert out["gains"]["memory"]["lower_bound_95"] > 0.0
    assert out["chosen"] == "memory"  # a tie with fused+memory goes to the first candidate


def test_no_gain_keeps_fused_and_a_pixel_loss_refuses_a_candidate():
    from studies.memory_choice import choose

    same = ([0.1, 0.2, 0.3], [0.7, 0.8, 0.9])
    pixel = {"fused": 0.9, "memory": 0.9, "fused+memory": 0.9}
    assert choose([dataset("d", same, same, same, pixel)], resamples=50)["chosen"] == "fused"
    worse = ([0.5, 0.6, 0.7, 0.8], [0.55, 0.65, 0.75, 0.85])
    perfect = ([0.1, 0.2, 0.3, 0.4], [0.6, 0.7, 0.8, 0.9])
    pixel = {"fused": 0.9, "memory": 0.9, "fused+memory": 0.9}
    low_pixel = {"fused": 0.9, "memory": 0.894, "fused+memory": 0.894}  # 0.006 below fused: beyond 0.005
    # a clear image gain on both datasets, but one of them loses pixel AUROC: refused, fused kept
    out = choose([dataset("a", worse, perfect, perfect, pixel), dataset("b", worse, perfect, perfect, low_pixel)],
                 resamples=50)
    assert out["gains"]["memory"]["lower_bound_95"] > 0 and out["chosen"] == "fused"
    assert out["gains"]["memory"]["pixel_losses"] == ["b: 0.894 against 0.900"]
