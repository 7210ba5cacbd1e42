"""The benchmark runs end to end and its figures are consistent (no timing assertions)."""

import json
import math
from pathlib import Path

from dualstpm.benchmark import benchmark, write_results
from dualstpm.config import load_params

from conftest import TINY_OVERRIDES


def test_benchmark_reports_every_figure(synthetic_root: Path, tmp_path: Path):
    params = load_params(None, TINY_OVERRIDES)
    results = benchmark(params, synthetic_root, "synth_texture", n_images=8, repeats=1)
    write_results(results, tmp_path / "bench.json")
    saved = json.loads((tmp_path / "bench.json").read_text())
    train, infer = saved["train"], saved["inference"]
    for tag in ("no_cache", "cache"):
        for name in ("stpm+recon", "stpm", "recon"):
            assert train[f"{tag}_{name}_images_per_s"] > 0
            assert math.isclose(train[f"{tag}_{name}_images_per_s"] * train[f"{tag}_{name}_epoch_s"], 8, rel_tol=1e-6)
    # The cache changes where teacher features come from, not what the students learn from.
    assert train["cache_loss_rel_diff"] < 1e-3
    assert infer["inference_over_floor"] > 0 and infer["latency_batch1_ms"] > 0
    assert train["train_peak_rss_mib"] > 100 and infer["infer_peak_rss_mib"] > 100
    assert saved["setup"]["images"] == 8 and saved["setup"]["image_size"] == 64


def test_benchmark_times_each_backend_and_precision(synthetic_root: Path):
    params = load_params(None, TINY_OVERRIDES)
    results = benchmark(params, synthetic_root, "synth_texture", n_images=8, repeats=1,
                        backends=("onnxruntime", "openvino"), precisions=("fp32", "fp16"), train=False)
    assert "train" not in results and results["inference"]["fused_images_per_s"] > 0
    # onnx has no fp16 export: that pair is skipped, every other one timed beside PyTorch float32
    assert set(results["backends"]) == {"torch/fp32", "onnxruntime/fp32", "openvino/fp32", "openvino/fp16"}
    for figures in results["backends"].values():
        assert figures["images_per_s"] > 0 and figures["latency_batch1_ms"] > 0 and figures["peak_rss_mib"] > 50
    assert results["backends"]["torch/fp32"]["speedup_vs_torch_fp32"] == 1.0


def test_the_frame_benchmark_scores_a_frame_tiled_and_squashed():
    """`dualstpm bench-frame` on a small frame: every phase ran in its own process and reported."""
    from dualstpm.config import load_params
    from dualstpm.frame_benchmark import frame_benchmark

    params = load_params(None, ["image_size=32", "fit.batch_size=8"])
    results = frame_benchmark(params, 96, 160)
    # 96 high: (96 - 32) / 24 = 2.7 -> 3 steps, 4 rows; 160 wide: (160 - 32) / 24 = 5.3 -> 6 steps, 7 columns
    assert results["setup"]["tiles"] == 28 and results["setup"]["frame"] == [96, 160]
    for phase in ("floor", "tiled", "squashed"):
        assert results[phase]["seconds"] > 0 and results[phase]["peak_rss_mib"] > 0
    for phase in ("tiled", "squashed"):
        figures = results[phase]
        assert figures["above_floor_mib"] == figures["peak_rss_mib"] - results["floor"]["peak_rss_mib"]
        assert figures["bytes_per_frame_pixel"] == figures["above_floor_mib"] * 2**20 / (96 * 160)
