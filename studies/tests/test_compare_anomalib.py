"""studies/compare_anomalib.py runs end to end as a script and reports its eight complete rows; its
recall at the calibrated false-alarm rate is checked on hand-made cases, without anomalib."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import PROJECT_ROOT

MODULE = "studies.compare_anomalib"
ROWS = ["anomalib STFPM", "anomalib PatchCore", "ours branch A (STPM)", "ours branch B (recon)", "ours fused",
        "ours disc", "ours default", "ours after ablate", "ours memory view (lever)", "ours fused + memory (lever)"]


def run_script(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", MODULE, *map(str, args)], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=1200)


def test_unknown_category_is_a_clear_error(synthetic_root: Path, tmp_path: Path):
    result = run_script("--data-root", synthetic_root, "--category", "no_such_part", "--out", tmp_path / "c.json")
    assert result.returncode == 2
    assert "no_such_part" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "c.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("anomalib") is None,
                    reason="anomalib is not installed: `pip install -e '.[compare]'`")
def test_compare_reports_every_row_with_finite_figures(synthetic_root: Path, tmp_path: Path):
    out = tmp_path / "compare.json"
    result = run_script("--data-root", synthetic_root, "--category", "synth_texture", "--image-size", "64",
                        "--epochs", "1", "--batch-size", "8", "--repeats", "1", "--coreset-ratio", "0.01",
                        "--set", "fit.discriminator=true", "--set", "disc.epochs=1", "--set", "fusion.view=disc",
                        "--set", "fit.recipe=fixed", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads(out.read_text())
    rows = {row["model"]: row for row in saved["rows"]}
    assert list(rows) == ROWS
    for name, row in rows.items():
        for key in ("image_auroc", "pixel_auroc", "aupro", "recall", "test_false_alarm_rate"):
            assert 0.0 <= row[key] <= 1.0, (name, key, row[key])
        assert math.isfinite(row["infer_images_per_s"]) and row["infer_images_per_s"] > 0, name
        if name not in ("anomalib PatchCore", *ROWS[-2:]):  # PatchCore and the memory levers: one pass, no epochs
            assert row["train_s_per_epoch"] > 0, name
    assert rows["anomalib STFPM"]["train_s_total"] >= rows["anomalib STFPM"]["train_s_per_epoch"]
    assert rows["ours fused"]["train_s_total"] > 0
    assert 0 < rows["ours disc"]["train_s_total"] == saved["ours"]["disc_train_s"] < rows["ours default"]["train_s_total"]
    assert saved["ours"]["default_view"] == "disc"
    # Our rows are the library's own `dualstpm test` figures, reached by the shared metric path.
    for view, name in (("fused", "ours fused"), ("stpm", "ours branch A (STPM)"), ("recon", "ours branch B (recon)"),
                       ("disc", "ours disc"), ("disc", "ours default")):
        assert rows[name]["image_auroc"] == pytest.approx(saved["ours"]["test_metrics"][view]["image_auroc"], abs=1e-3)
    # the pipeline's ablate stage ran on the fitted run; an applied fusion replaces only `fused`,
    # and this model decides with `disc`, so the model the pipeline ships is the default row's
    ablation = saved["ours"]["ablation"]
    assert ablation["decision_view"] == "disc" and ablation["margin"].startswith(("adopted", "kept the default"))
    assert {k: rows["ours after ablate"][k] for k in ("image_auroc", "pixel_auroc", "aupro")} == {
        k: rows["ours default"][k] for k in ("image_auroc", "pixel_auroc", "aupro")}
    assert saved["setup"]["train_images"] == 16 and saved["setup"]["image_size"] == 64
    assert saved["setup"]["calibration_images"] == 2 and saved["setup"]["coreset_ratio"] == 0.01
    assert all(isinstance(v, bool) for v in saved["targets"].values())
    assert out.with_suffix(".md").read_text().startswith("Settings: synth_texture, 64 px")
    table = [line for line in out.with_suffix(".md").read_text().splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0].removeprefix("| ") for line in table[1:]] == ROWS
    assert saved["markdown"] in result.stdout
    # the shipped model on every parity-tested backend: fp32 exports score as PyTorch does
    exports = saved["shipped_exports"]
    assert list(exports) == ["torch/fp32", "onnxruntime/fp32", "openvino/fp32", "onnxruntime/int8", "openvino/int8"]
    for name, figures in exports.items():
        assert figures["images_per_s"] > 0 and 0.0 <= figures["label_agreement"] <= 1.0, name
    for name in ("onnxruntime/fp32", "openvino/fp32"):
        assert exports[name]["label_agreement"] == 1.0 and exports[name]["max_relative_score_difference"] < 1e-3, name
    assert isinstance(saved["targets"]["shipped_fastest_backend_at_least_patchcore_speed"], bool)
    assert "fastest parity-holding backend of the shipped model" in saved["markdown"]


# --- recall at the calibrated false-alarm rate (issue 22, item 1): hand cases -----------------------

def test_recall_and_false_alarms_at_the_calibrated_threshold():
    from studies.compare_anomalib import decision_at_calibrated_rate

    # 9 good scores, rate 0.1: k = floor(0.1 * 10) - 1 = 0 allowed above, so the threshold is the max, 0.9
    val = np.arange(1, 10) / 10
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.95, 0.9, 1.2, 0.5, 0.91, 0.2, 0.3, 0.4])
    # defective above 0.9 (strictly): 0.95 and 1.2 -> 2 of 4; good above: 0.91 -> 1 of 4
    assert decision_at_calibrated_rate(val, labels, scores, 0.1) == {
        "threshold": 0.9, "recall": 0.5, "test_false_alarm_rate": 0.25}
    # 19 good scores 1..19, rate 0.1: k = floor(0.1 * 20) - 1 = 1, the threshold is the 2nd largest, 18
    val = np.arange(1, 20, dtype=float)
    labels = np.array([1, 1, 1, 1, 0, 0, 0])
    scores = np.array([18, 18.5, 19, 30, 17, 18, 18.01])
    # defective above 18: 18.5, 19, 30 -> 3 of 4; good above 18: 18.01 -> 1 of 3
    got = decision_at_calibrated_rate(val, labels, scores, 0.1)
    assert got["threshold"] == 18 and got["recall"] == 0.75 and got["test_false_alarm_rate"] == pytest.approx(1 / 3)
    # too few images for 1 %: k = floor(0.01 * 20) - 1 < 0, so again the max, 19
    assert decision_at_calibrated_rate(val, labels, scores, 0.01)["threshold"] == 19
    # no good test image: no false-alarm rate to observe (None, not 0)
    assert decision_at_calibrated_rate(val, np.array([1, 1]), np.array([20.0, 1.0]), 0.1)["test_false_alarm_rate"] is None


class MeanScorer(torch.nn.Module):
    """anomalib's output shape without anomalib: image score = the image's mean, map = its first channel."""

    def forward(self, images):
        from types import SimpleNamespace

        return SimpleNamespace(pred_score=images.mean(dim=(1, 2, 3)), anomaly_map=images[:, :1])


def flat(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 32, 32).contiguous()


def test_an_anomalib_row_is_thresholded_on_the_calibration_images():
    from dualstpm.compute import Compute
    from studies.compare_anomalib import Split, anomalib_row

    # calibration scores 0.1, 0.2, 0.3 at 1 %: too few, the threshold is the max, 0.3
    split = Split(train=flat([0.1]), test=flat([0.25, 0.35, 0.5, 0.3, 0.31]), labels=np.array([0, 0, 1, 1, 1]),
                  truth=None, calibration=flat([0.1, 0.2, 0.3]), false_alarm_rate=0.01, selection=flat([0.2]))
    row = anomalib_row("stub", MeanScorer(), split, Compute.resolve("cpu", "float32"), batch_size=2, repeats=1,
                       train_s=1.0, epoch_s=None, note="")
    assert row.threshold == pytest.approx(0.3)
    # defective above 0.3: 0.5 and 0.31 (0.3 is not above) -> 2 of 3; good above 0.3: 0.35 -> 1 of 2
    assert row.recall == pytest.approx(2 / 3) and row.test_false_alarm_rate == 0.5
    # image AUROC: defective > good in (0.5, 0.25), (0.5, 0.35), (0.3, 0.25), (0.31, 0.25): 4 of 6 pairs
    assert row.image_auroc == pytest.approx(4 / 6) and row.pixel_auroc is None


def test_the_fastest_backend_counts_only_exports_that_keep_parity():
    from studies.compare_anomalib import exports_lines, fastest_parity_backend

    exports = {"torch/fp32": {"images_per_s": 10.0, "label_agreement": 1.0, "max_relative_score_difference": 0.0},
               "openvino/fp32": {"images_per_s": 20.0, "label_agreement": 0.995, "max_relative_score_difference": 1e-5},
               "onnxruntime/int8": {"images_per_s": 30.0, "label_agreement": 0.98, "max_relative_score_difference": 0.1}}
    # int8 is the fastest but its labels agree on 98 % < 99 %: openvino fp32 (99.5 %) is the fastest that counts
    assert fastest_parity_backend(exports) == ("openvino/fp32", 20.0)
    lines = exports_lines(exports, 40.0)
    assert lines[1].endswith("openvino/fp32 at 20.0 img/s against anomalib PatchCore's 40.0 (0.50x)")
    assert "onnxruntime/int8 30.0 img/s (labels agree on 98.00% of the test images" in lines[0]
    assert fastest_parity_backend({"openvino/int8": {**exports["onnxruntime/int8"]}}) is None


def test_the_defaults_and_the_settings_beside_the_table():
    from studies.compare_anomalib import Row, markdown_table, parse_args

    assert parse_args(["--data-root", "d", "--category", "c", "--out", "o.json"]).coreset_ratio == 0.01
    setup = {"category": "weld", "image_size": 256, "epochs": 10, "recipe": "fixed", "trained_epochs": 10,
             "batch_size": 16, "seed": 0, "train_images": 30, "test_images": 40, "t1": "lite0", "t2": "lite2",
             "anomalib_normalize": "teacher", "stfpm_recipe": "ours", "anomalib_layout": "channels_last",
             "stfpm_layers": ["blocks.1"], "patchcore_layers": ["blocks.2", "blocks.4"], "coreset_ratio": 0.01,
             "false_alarm_rate": 0.01, "calibration_images": 4, "false_alarm_bound": 0.2}
    row = Row("anomalib PatchCore", 0.9, None, None, 0.75, 0.0, 1.5, 10.0, None, 20.0)
    table = markdown_table([row], setup)
    first = table.splitlines()[0]
    assert first.startswith("Settings: weld, 256 px, 30 train / 4 calibration / 40 test images")
    assert "coreset 0.01 (1.0%)" in first and "target false-alarm rate of 0.01 on 4 good calibration images" in first
    assert "| anomalib PatchCore | 0.900 | — | — | 0.750 | 0.000 | 10.0 | — | 20.0 |" in table


@pytest.mark.slow
def test_our_rows_are_thresholded_as_the_product_thresholds(synthetic_root: Path, tmp_path: Path):
    """Ours alone (no anomalib): the thresholds this script sets on the calibration images for the
    fitted views are the ones `fit` stored (else RunError), and every row has its recall."""
    from dualstpm.compute import Compute
    from dualstpm.config import load_params
    from studies.compare_anomalib import load_split, run_ours
    from tests.conftest import TINY_OVERRIDES

    params = load_params(None, [*TINY_OVERRIDES, "fit.epochs=1", "ablation.bootstrap=10", "ablation.panel_images=0"])
    split = load_split(params, synthetic_root, "synth_texture")
    assert len(split.calibration) == 2  # 4 validation images, calibration.split 0.5
    rows, details = run_ours(params, synthetic_root, "synth_texture", split, Compute.resolve("cpu", "float32"), 1,
                             tmp_path)
    assert details["trained_epochs"] == 1
    for row in rows:
        assert 0.0 <= row.recall <= 1.0 and 0.0 <= row.test_false_alarm_rate <= 1.0, row.model
    checks = details["threshold_cross_check"]
    assert set(checks) >= {"fused", "stpm", "recon"}
    assert all(c["agrees"] for c in checks.values()), checks


@pytest.mark.slow
def test_the_memory_lever_rows_on_a_fitted_model(synthetic_root: Path, tmp_path: Path):
    """The memory view with every training patch in its bank scores each training image 0 (it is
    its own nearest neighbour); both lever rows are thresholded like every row."""
    from dualstpm.compute import Compute
    from dualstpm.config import load_params
    from dualstpm.detector import Detector
    from dualstpm.training import fit
    from studies.compare_anomalib import ROW_FUSED_MEMORY, ROW_MEMORY, build_memory, load_split, memory_predictor, run_memory
    from tests.conftest import TINY_OVERRIDES

    params = load_params(None, [*TINY_OVERRIDES, "fit.epochs=1"])
    compute = Compute.resolve("cpu", "float32")
    fit(params, synthetic_root, "synth_texture", tmp_path / "run", overwrite=True)
    detector = Detector.load(tmp_path / "run", compute)
    split = load_split(params, synthetic_root, "synth_texture")
    full = build_memory(detector, split.train[:2], 1.0, 2, 0)
    scores, maps = memory_predictor(detector, full)(split.train[:2])
    assert float(maps.abs().max()) == 0.0 and float(scores.abs().max()) == 0.0
    rows, details = run_memory(detector, params, split, compute, 0.01, 1)
    assert [r.model for r in rows] == [ROW_MEMORY, ROW_FUSED_MEMORY]
    n_patches = len(split.train) * (params.image_size // 8) ** 2
    assert details["bank_entries"] == max(1, round(0.01 * n_patches))
    for row in rows:
        assert 0.0 <= row.image_auroc <= 1.0 and 0.0 <= row.recall <= 1.0, row.model


def test_pixel_stats_are_the_mean_and_std_over_every_pixel():
    from studies.compare_anomalib import pixel_stats

    # pixels 0, 2, 0, 2: mean 1, population std 1
    assert pixel_stats(np.array([[[0.0, 2.0]], [[0.0, 2.0]]], dtype=np.float32)) == (1.0, 1.0)
