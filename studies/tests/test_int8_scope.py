"""The int8 scope: its names (dualstpm.export.int8_scope) and the validation-only rule of
studies/int8_scope.py that picks the shipped one, on hand-built figures and end to end on a tiny
synthetic category."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from studies import int8_scope as int8_scope_study


def row(agree: int, images: int, image_delta: float, pixel_delta: float, speedup: float) -> dict:
    return {"validation": {"labels_agree": agree, "images": images, "image_auroc_delta": image_delta,
                           "pixel_auroc_delta": pixel_delta}, "speedup_vs_fp32": speedup}


def both(*args) -> dict:
    return {"onnxruntime": row(*args), "openvino": row(*args)}


def test_the_rule_pools_labels_over_datasets_bounds_every_delta_and_takes_the_fastest_that_qualifies():
    per_dataset = {
        "a": {"scopes": {
            "all": both(9, 10, 0.0, 0.0, 3.0),           # a flip in 10 ...
            "students": both(10, 10, 0.006, 0.0, 2.5),   # an image AUROC moved by 0.006 > 0.005
            "t1_deep_s2": both(10, 10, 0.001, -0.001, 2.0),
            "s2": both(10, 10, 0.004, -0.005, 1.5),       # 0.005 is within the bound
        }},
        "b": {"scopes": {
            "all": both(99, 100, 0.0, 0.0, 3.0),         # ... and one in 100: 108/110 = 98.2 % < 99 %
            "students": both(100, 100, 0.0, 0.0, 2.5),
            "t1_deep_s2": both(99, 100, 0.0, 0.0, 1.0),  # 109/110 = 99.1 %: qualifies; speedups (2 + 1) / 2 = 1.5
            "s2": both(100, 100, 0.0, 0.0, 1.7),          # (1.5 + 1.7) / 2 = 1.6: the fastest that qualifies
        }},
    }
    chosen, summary = int8_scope_study.choose_scope(per_dataset, ("all", "students", "t1_deep_s2", "s2"))
    assert chosen == "s2"
    assert summary["all"]["labels_agree"]["openvino"] == pytest.approx(108 / 110)
    assert [summary[s]["qualifies"] for s in ("all", "students", "t1_deep_s2", "s2")] == [False, False, True, True]
    assert summary["students"]["worst_auroc_delta"] == pytest.approx(0.006)
    assert summary["t1_deep_s2"]["openvino_speedup"] == pytest.approx(1.5)
    assert summary["s2"]["openvino_speedup"] == pytest.approx(1.6)


def test_one_backend_failing_or_an_undefined_auroc_disqualifies():
    fails_on_openvino = {"onnxruntime": row(10, 10, 0.0, 0.0, 2.0), "openvino": row(9, 10, 0.0, 0.0, 2.0)}
    undefined = both(10, 10, math.nan, 0.0, 2.0)
    chosen, summary = int8_scope_study.choose_scope({"a": {"scopes": {"x": fails_on_openvino, "y": undefined}}},
                                                    ("x", "y"))
    assert chosen is None and not summary["x"]["qualifies"] and not summary["y"]["qualifies"]


def test_scope_names_and_an_unknown_one(trained_run: Path):
    from dualstpm.detector import Detector
    from dualstpm.errors import ExportError
    from dualstpm.export import INT8_SCOPE, INT8_SCOPES, int8_scope

    detector = Detector.load(trained_run, device="cpu")
    assert INT8_SCOPE in INT8_SCOPES
    assert int8_scope(detector, "s2") == ("/s2/",)
    assert int8_scope(detector, "students") == ("/s1/", "/s2/")
    deep = int8_scope(detector, "t1_deep_s2")
    assert deep[-1] == "/s2/" and deep[:-1] and all(p.startswith("/t1/body/") for p in deep[:-1])
    with pytest.raises(ExportError, match=r"unknown int8 scope 'most'.*all, students, t1_deep_s2, s2"):
        int8_scope(detector, "most")


@pytest.mark.slow
def test_the_study_end_to_end_on_a_tiny_category(synthetic_root: Path, tmp_path: Path, capsys):
    pytest.importorskip("openvino")
    tiny = ["--image-size", "64", "--epochs", "1", "--set", "fit.batch_size=8", "--set", "fit.device=cpu",
            "--set", "model.t1.name=tf_efficientnet_lite0", "--set", "model.t1.weights=random",
            "--set", "model.t2.name=tf_efficientnet_lite2", "--set", "model.t2.weights=random",
            "--set", "ablation.synthetic_per_image=2"]
    args = ["--data-root", str(synthetic_root), "--category", "synth_texture", *tiny, "--scope", "s2",
            "--repeats", "1", "--test", "--out", str(tmp_path)]
    assert int8_scope_study.main(args) == 0
    result = json.loads((tmp_path / "int8_scope.json").read_text())
    s2 = result["datasets"]["synth_texture"]["scopes"]["s2"]
    # synth_texture: 20 training images, fit.val_fraction 0.2 -> 4 validation images, 2 defective copies each
    assert s2["openvino"]["validation"]["images"] == 4 + 8
    assert s2["onnxruntime"]["test"]["images"] == 6 + 3 * len({p.parent.name for p in
                                                                   (synthetic_root / "synth_texture" / "test").glob("*/*")
                                                                   if p.parent.name != "good"})
    assert 0 < s2["onnxruntime"]["quantized_convolutions"] < s2["onnxruntime"]["convolutions"]
    assert set(result["summary"]) == {"s2"}
    assert "### synth_texture" in (tmp_path / "int8_scope.md").read_text()
