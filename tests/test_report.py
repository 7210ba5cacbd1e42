"""The report stage: one AUC table over categories, curves and overlays laid out for DVC."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dualstpm.errors import RunError
from dualstpm.mlops.report import _step_at, write_report


@pytest.fixture(scope="module")
def tested_runs(tmp_path_factory: pytest.TempPathFactory, trained_run: Path, synthetic_root: Path) -> dict[str, Path]:
    """Two tested copies of the trained run, the second one ablated as well."""
    from dualstpm.ablation import ablate
    from dualstpm.config import load_params
    from dualstpm.evaluation import test_run

    root = tmp_path_factory.mktemp("tested")
    runs = {}
    for name in ("plain", "ablated"):
        runs[name] = root / name
        shutil.copytree(trained_run, runs[name])
        test_run(runs[name], synthetic_root, "synth_texture")
    ablate(runs["ablated"], load_params(None, ["ablation.branch_weight_step=0.5", "ablation.panel_images=0"]).ablation)
    return runs


def test_roc_staircase_is_sampled_at_the_last_point_left_of_each_grid_value() -> None:
    fpr, tpr = np.array([0.0, 0.0, 0.5, 0.5, 1.0]), np.array([0.0, 0.4, 0.4, 0.9, 1.0])
    assert list(_step_at(fpr, tpr, np.array([0.0, 0.25, 0.5, 0.75, 1.0]))) == [0.4, 0.4, 0.9, 0.9, 1.0]


def test_report_of_tested_runs(tested_runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "reports"
    out.mkdir()
    (out / ".gitignore").write_text("/overlays\n")  # what DVC keeps there must survive
    table = write_report({"a": tested_runs["plain"], "b": tested_runs["plain"]}, out)

    assert list(table["category"]) == ["a"] * 3 + ["b"] * 3 + ["mean"] * 3
    assert pd.read_csv(out / "auc_table.csv").shape == (9, 6)
    assert sorted(p.name for p in (out / "metrics").iterdir()) == ["a.json", "b.json", "mean.json"]
    roc = pd.read_csv(out / "plots" / "roc" / "a.csv")
    assert list(roc.columns) == ["fpr", "fused", "stpm", "recon"]
    assert roc.iloc[-1][["fused", "stpm", "recon"]].tolist() == [1.0, 1.0, 1.0]
    assert (roc[["fused", "stpm", "recon"]].diff().dropna() >= 0).all().all()  # a ROC never goes down
    assert (out / "plots" / "pro" / "b.csv").is_file() and (out / "overlays" / "a.png").is_file()
    assert not (out / "ablation.csv").exists()
    # not ablated: the test's overlays are the decision view
    assert (out / "overlays" / "a.png").read_bytes() == (tested_runs["plain"] / "plots" / "overlays.png").read_bytes()
    charts = [next(iter(plot.items())) for plot in yaml.safe_load((out / "dvc.yaml").read_text())["plots"]]
    assert [name for name, _ in charts] == ["a roc", "a pro", "b roc", "b pro"]
    assert charts[1][1]["title"] == "a: per-region overlap (AUPRO to 30 % FPR), views fused, stpm, recon"
    assert charts[2][1]["y"] == {"plots/roc/b.csv": ["fused", "stpm", "recon"]}  # relative to the report folder

    write_report({"a": tested_runs["plain"]}, out)  # one category fewer: its files go, DVC's stay
    assert sorted(p.name for p in (out / "metrics").iterdir()) == ["a.json"]
    assert not (out / "overlays" / "b.png").exists()
    assert (out / ".gitignore").read_text() == "/overlays\n"


def test_a_report_that_crashes_half_way_leaves_the_previous_one(tested_runs: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import dualstpm.mlops.report

    out = tmp_path / "reports"
    write_report({"a": tested_runs["plain"], "b": tested_runs["plain"]}, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    figures = dualstpm.mlops.report._write_category_figures

    def crash_at_b(category: str, run_dir: Path, into: Path) -> None:
        if category == "b":
            raise OSError("disk full")  # after a's figures, the metrics and ablation files are written
        figures(category, run_dir, into)

    monkeypatch.setattr(dualstpm.mlops.report, "_write_category_figures", crash_at_b)
    with pytest.raises(OSError, match="disk full"):
        write_report({"a": tested_runs["ablated"], "b": tested_runs["ablated"]}, out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not (out / "ablation.csv").exists()  # nothing of the crashed report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]  # no staging folder left


def test_report_adds_the_validation_chosen_fusion_of_ablated_runs(tested_runs: dict[str, Path], tmp_path: Path) -> None:
    table = write_report({"synth_texture": tested_runs["ablated"]}, tmp_path)
    assert list(table["model"]) == ["stpm", "recon", "fused", "fused_chosen"]
    ablation = pd.read_csv(tmp_path / "ablation.csv")
    chosen = ablation[ablation["model"] == "fused_chosen"].iloc[0]
    assert table.iloc[3]["image_auroc"] == pytest.approx(chosen["image_auroc"])
    assert "oracle" in set(ablation["model"])
    # the overlays the ablation redrew in the model's decision view, not the test's
    redrawn = (tested_runs["ablated"] / "ablation" / "overlays.png").read_bytes()
    assert (tmp_path / "overlays" / "synth_texture.png").read_bytes() == redrawn


def test_report_refuses_missing_tests_and_half_ablated_runs(tested_runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(RunError, match="metrics.json does not exist"):
        write_report({"x": tmp_path / "untested"}, tmp_path / "out")
    with pytest.raises(RunError, match="runs of a have no ablation"):
        write_report({"a": tested_runs["plain"], "b": tested_runs["ablated"]}, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything
