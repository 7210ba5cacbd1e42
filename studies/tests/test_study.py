"""studies/study.py: the choice rule, the variant syntax, the score-reduction adapter, and the
subcommands end to end on a tiny synthetic category (64 px, 1 epoch, random teachers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from studies import study

TINY = ["--image-size", "64", "--epochs", "1", "--set", "fit.batch_size=8", "--set", "fit.device=cpu",
        "--set", "model.t1.name=tf_efficientnet_lite0", "--set", "model.t1.weights=random",
        "--set", "model.t2.name=tf_efficientnet_lite2", "--set", "model.t2.weights=random", "--category", "synth_texture"]


def figures(image: float, pixel: float | None, pro: float | None) -> dict:
    return {"image_auroc": image, "pixel_auroc": pixel, "aupro": pro}


# --------------------------------------------------------------------------- the choice rule


def test_choice_is_the_best_mean_over_datasets_of_the_validation_selection_score():
    evidence = {
        # per-dataset selection scores (means of the three): 0.8 and 0.6 -> 0.7
        "baseline": {"a": figures(0.8, 0.9, 0.7), "b": figures(0.6, 0.6, 0.6)},
        # 0.9 and 0.5 -> 0.7: ties with the baseline
        "tie": {"a": figures(0.9, 0.9, 0.9), "b": figures(0.4, 0.5, 0.6)},
        # 0.85 and (0.7 + 0.7) / 2 = 0.7 (an undefined metric is left out) -> 0.775
        "better": {"a": figures(0.85, 0.85, 0.85), "b": figures(0.7, None, 0.7)},
    }
    choice = study.choose_variant(evidence)
    assert choice.best == "better"
    assert choice.means == pytest.approx({"baseline": 0.7, "tie": 0.7, "better": 0.775})
    assert choice.datasets == ("a", "b")


def test_choice_ties_go_to_the_earliest_variant():
    a = {"d": figures(0.8, 0.8, 0.8)}
    b = {"d": figures(0.7, 0.9, 0.8)}  # also 0.8
    assert study.choose_variant({"baseline": a, "other": b}).best == "baseline"
    assert study.choose_variant({"other": b, "baseline": a}).best == "other"


def test_choice_refuses_variants_measured_on_different_datasets_or_without_a_score():
    with pytest.raises(ValueError, match="measured on"):
        study.choose_variant({"x": {"a": figures(0.9, 0.9, 0.9)},
                              "y": {"a": figures(0.5, 0.5, 0.5), "b": figures(0.5, 0.5, 0.5)}})
    with pytest.raises(ValueError, match="no validation selection metric"):
        study.choose_variant({"x": {"a": {"image_auroc": None, "pixel_auroc": None, "aupro": None}}})


# --------------------------------------------------------------------------- variants and reductions


def test_variant_syntax_keeps_values_with_commas_whole():
    assert study.parse_variant("w=fusion.weights=[[1,1,1],[0,0,0]],fit.lr=0.1") == (
        "w", ("fusion.weights=[[1,1,1],[0,0,0]]", "fit.lr=0.1"))
    assert study.parse_variant("plain=") == ("plain", ())
    with pytest.raises(study.StudyError, match="NAME=key=value"):
        study.parse_variant("no_equals_sign")


def test_only_picks_variants_in_its_order_and_names_unknown_ones():
    picked = study.pick_variants(["low=fit.lr=0.1"], "low,baseline")
    assert picked == {"low": ("fit.lr=0.1",), "baseline": ()}
    with pytest.raises(study.StudyError, match="nope"):
        study.pick_variants([], "baseline,nope")
    with pytest.raises(study.StudyError, match="taken"):
        study.pick_variants(["baseline=fit.lr=0.1"], None)


def test_a_variant_with_an_unknown_key_fails_before_any_fit(synthetic_root: Path, tmp_path: Path, capsys):
    code = study.main(["recipe", "--data-root", str(synthetic_root), *TINY, "--variant", "bad=fit.no_such_key=1",
                       "--only", "baseline,bad", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "variant bad" in err and "fit.no_such_key" in err
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- end to end


def test_recipe_writes_both_rows_and_the_choice(synthetic_root: Path, tmp_path: Path, capsys):
    code = study.main(["recipe", "--data-root", str(synthetic_root), *TINY, "--only", "baseline,attention_none",
                       "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err[-2000:]
    saved = json.loads((tmp_path / "recipe.json").read_text())
    results = saved["datasets"]["synth_texture"]
    assert list(results) == ["baseline", "attention_none"]
    for name, r in results.items():
        assert set(r["validation"]) == {"fused", "stpm", "recon"}
        for split in ("validation", "test"):
            for value in r[split]["fused"].values():
                assert 0.0 <= value <= 1.0, (name, split)
        assert r["fit_s"] >= r["epoch_s"] > 0 and len(r["epochs_s"]) == 1
        assert (tmp_path / "runs" / "synth_texture" / name / "model").is_dir()
    assert results["attention_none"]["overrides"] == ["model.attention=none"]
    assert saved["chosen"]["variant"] in ("baseline", "attention_none")
    table = (tmp_path / "recipe.md").read_text()
    rows = [line.split(" | ")[0].removeprefix("| ") for line in table.splitlines() if line.startswith("| ")]
    assert "baseline" in rows and "attention_none" in rows
    assert "Chosen by validation across all datasets" in table and table in capsys.readouterr().out

    # the same command again reuses both fits and their timings
    assert study.main(["recipe", "--data-root", str(synthetic_root), *TINY, "--only", "baseline,attention_none",
                       "--out", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "recipe.json").read_text())["datasets"]["synth_texture"]
    assert all(r["fit_reused"] for r in again.values())
    assert again["baseline"]["fit_s"] == results["baseline"]["fit_s"]


@pytest.mark.slow
def test_curve_and_reduce(synthetic_root: Path, tmp_path: Path):
    assert study.main(["curve", "--data-root", str(synthetic_root), *TINY, "--curve-epochs", "1,2",
                       "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "curve.json").read_text())["datasets"]["synth_texture"]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_s"] > rows[0]["train_s"] > 0
    assert rows[0]["test"]["fused"] != rows[1]["test"]["fused"]  # the state after each epoch, not one model

    assert study.main(["reduce", "--data-root", str(synthetic_root), *TINY, "--out", str(tmp_path)]) == 0
    reduced = json.loads((tmp_path / "reduce.json").read_text())["datasets"]["synth_texture"]
    assert set(reduced) == {"fused", "stpm", "recon"}
    labels = [spec.label for spec in study.REDUCTIONS]
    for view in reduced.values():
        for split in ("validation", "test"):
            assert list(view[split]) == labels
            assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in view[split].values())


def test_pooled_margin_adopts_only_a_robust_gain():
    """Ten units, each a good image (score 0.1 i) and its defective copy. The baseline scores
    each copy 0.05 below its own good image: copy i beats the good images j < i, so image
    AUROC = (0 + 1 + ... + 9) / 100 = 0.45. A challenger scoring every copy 2.0 has AUROC 1:
    a gain of 0.55, and every resample keeps some copy below its own good image, so the
    baseline stays below 1 and the lower bound is > 0. Identical evidence gains exactly 0."""
    from dualstpm.ablation.margin import contributions

    good = np.arange(10) * 0.1
    labels = np.r_[np.zeros(10), np.ones(10)].astype(np.int8)
    units = np.r_[np.arange(10), np.arange(10)]
    base = contributions(np.r_[good, good - 0.05], labels, units, 10)
    better = contributions(np.r_[good, np.full(10, 2.0)], labels, units, 10)
    margin = study.pooled_margin("better", {"a": base, "b": base}, {"a": better, "b": better}, n_resamples=200)
    assert margin.per_dataset == pytest.approx({"a": 0.55, "b": 0.55}) and margin.observed == pytest.approx(0.55)
    assert margin.lower_bound > 0 and margin.adopted
    same = study.pooled_margin("same", {"a": base}, {"a": base}, n_resamples=200)
    assert same.observed == 0 and same.lower_bound == 0 and not same.adopted
