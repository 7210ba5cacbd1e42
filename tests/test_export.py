"""The inference module, normalised scores, exports and backends (issue 12).

Parity is checked against PyTorch (the reference) with the real runtimes, ONNX Runtime
and OpenVINO, never mocks: fp32 exports within 1e-4 relative on image scores, 1e-3
absolute on maps, identical labels; reduced precisions by image and pixel AUROC on
magnetic_tile (within 0.005 of PyTorch's) and label agreement (at least 99 %).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PROJECT_ROOT, SHARED_DATA, TINY_OVERRIDES

from dualstpm import metrics
from dualstpm.backends import ExportedModel, load_scorer
from dualstpm.compute import Compute
from dualstpm.data import decode_images, decode_masks, load_category
from dualstpm.detector import Detector
from dualstpm.errors import ExportError, RunError
from dualstpm.export import (METADATA_FILE, PARITY_AUROC_GAP, PARITY_LABEL_AGREEMENT, export_run,
                             static_same_padding)
from dualstpm.model.calibration import ScoreNormalization
from dualstpm.model.inference import InferenceOutput

pytestmark = pytest.mark.filterwarnings("ignore")
SCORE_RTOL, MAP_ATOL = 1e-4, 1e-3


def float32_detector(run: Path) -> Detector:
    """PyTorch in float32 on the CPU: the reference of fp32 exports (`Detector.load`'s default
    precision, named here so that the reference cannot drift)."""
    return Detector.load(run, Compute.resolve("cpu", "float32"))


def assert_parity(exported: InferenceOutput, reference: InferenceOutput) -> None:
    """fp32 bounds of the issue: scores 1e-4 relative, maps 1e-3 absolute, identical labels;
    the normalised score (on [0, 1], near 0 for the quietest parts) 1e-4 absolute."""
    for name in ("score", "stpm_score", "recon_score"):
        np.testing.assert_allclose(getattr(exported, name).numpy(), getattr(reference, name).numpy(),
                                   rtol=SCORE_RTOL, atol=0, err_msg=name)
    np.testing.assert_allclose(exported.normalized_score.numpy(), reference.normalized_score.numpy(),
                               rtol=0, atol=SCORE_RTOL)
    np.testing.assert_allclose(exported.anomaly_map.numpy(), reference.anomaly_map.numpy(), rtol=0, atol=MAP_ATOL)
    assert torch.equal(exported.label.bool(), reference.label.bool())


# --- normalised score ---------------------------------------------------------------------

def test_normalized_score_by_hand():
    """n = clip(0.5 (s - min) / (t - min), 0, 1): with t = 2, min = 1 the values below."""
    norm = ScoreNormalization(threshold=2.0, val_min=1.0)
    scores = torch.tensor([0.5, 1.0, 1.5, 2.0, 2.25, 2.5, 3.0, 4.0])
    assert norm(scores).tolist() == [0.0, 0.0, 0.25, 0.5, 0.625, 0.75, 1.0, 1.0]


def test_normalized_score_is_monotone_and_decides_like_the_threshold():
    norm = ScoreNormalization(threshold=0.8, val_min=0.3)
    scores = torch.sort(torch.rand(10_000, generator=torch.Generator().manual_seed(0)) * 2)[0]
    normalized = norm(scores)
    assert (normalized.diff() >= 0).all() and normalized.min() >= 0 and normalized.max() <= 1
    assert torch.equal(normalized > 0.5, scores > 0.8)
    # inside [min, 2t - min] it is strictly increasing, so ranks (and AUROC) are unchanged there
    inside = (scores > 0.3) & (scores < 1.3)
    labels = (torch.arange(len(scores)) % 3 == 0).numpy()[inside.numpy()]
    assert metrics.image_auroc(labels, scores[inside].numpy()) == metrics.image_auroc(labels, normalized[inside].numpy())


# --- the inference module -------------------------------------------------------------------

@pytest.fixture(scope="module")
def texture_images(synthetic_root: Path) -> torch.Tensor:
    paths = [s.path for s in load_category(synthetic_root, "synth_texture").test]
    return decode_images(paths, 64)


def test_inference_module_is_what_the_detector_scores_with(trained_run: Path, texture_images: torch.Tensor):
    detector = Detector.load(trained_run)
    out = detector.infer(texture_images)
    views = detector.score(texture_images)
    for view, name in (("fused", "score"), ("stpm", "stpm_score"), ("recon", "recon_score")):
        assert torch.equal(getattr(out, name), views.scores[view])
    assert torch.equal(out.anomaly_map, views.maps["fused"])
    assert torch.equal(out.label, out.score > detector.threshold)
    low = detector.calibration.val_score_summary["fused"]["min"]
    expected = ((out.score - low) / (detector.threshold - low) / 2).clamp(0, 1)
    torch.testing.assert_close(out.normalized_score, expected, rtol=1e-6, atol=1e-7)
    as_uint8 = (texture_images * 255).round().to(torch.uint8)
    assert torch.equal(detector.infer(as_uint8).score, detector.infer(as_uint8.float() / 255).score)


def test_a_fusion_json_without_its_validation_minimum_is_refused_naming_the_fix(trained_run: Path, tmp_path: Path):
    """The normalised score's 0 is the chosen fusion's lowest validation score, recorded by
    `dualstpm ablate`; a fusion.json without it (missing, or null as earlier versions wrote)
    is refused, and left as it was."""
    from dualstpm.detector import ChosenFusion, write_chosen_fusion
    from dualstpm.model.fusion import FusionSpec

    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("exports"))
    fusion_file = write_chosen_fusion(run, ChosenFusion(FusionSpec(mode="sum"), 2.0, {"config": "sum"}, 0.5))
    assert Detector.load(run).inference.normalization.val_min == 0.5
    written = json.loads(fusion_file.read_text())
    for damaged in ({k: v for k, v in written.items() if k != "val_min"}, {**written, "val_min": None}):
        fusion_file.write_text(json.dumps(damaged))
        with pytest.raises(RunError, match=r"fusion\.json is not a valid chosen fusion.*re-run `dualstpm ablate`"):
            Detector.load(run)
        assert json.loads(fusion_file.read_text()) == damaged


# --- exports on the synthetic run -------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_export(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_run(trained_run, "onnx", "fp32", tmp_path_factory.mktemp("exports") / "onnx")


def test_onnx_export_matches_pytorch(trained_run: Path, onnx_export: Path, texture_images: torch.Tensor):
    meta = json.loads((onnx_export / METADATA_FILE).read_text())
    detector = float32_detector(trained_run)
    assert meta["image_size"] == 64 and meta["threshold"] == detector.threshold
    assert meta["normalization"]["val_min"] == detector.calibration.val_score_summary["fused"]["min"]
    assert meta["fusion"]["mode"] == "product" and meta["source"]["run_dir"] == str(trained_run.resolve())
    assert meta["packages"]["onnxruntime"] and "resize_image" in meta["input"]["resize"]
    reference = detector.infer(texture_images)
    for backend in ("onnxruntime", "openvino"):  # OpenVINO reads the ONNX file as well
        assert_parity(ExportedModel(onnx_export, backend).infer(texture_images), reference)
    assert_parity(ExportedModel(onnx_export, "onnxruntime").infer(texture_images[:1]), detector.infer(texture_images[:1]))


def test_same_padding_is_fixed_by_hand_and_restored():
    from timm.layers.conv2d_same import Conv2dSame

    torch.manual_seed(0)
    net = torch.nn.Sequential(Conv2dSame(3, 4, 3, stride=2), Conv2dSame(4, 4, 5, stride=2), Conv2dSame(4, 4, 3, stride=1))
    example = torch.rand(2, 3, 128, 128)
    reference = net(example)
    with static_same_padding(net, example[:1]) as pads:
        # TF "same": total = max((ceil(in / s) - 1) * s + k - in, 0), the smaller half first.
        # 128 px, k 3, s 2: 63 * 2 + 3 - 128 = 1 -> (0, 1); 64 px, k 5, s 2: 31 * 2 + 5 - 64 = 3 -> (1, 2);
        # 32 px, k 3, s 1: 31 + 3 - 32 = 2 -> (1, 1)
        assert pads == {"0": (0, 1, 0, 1), "1": (1, 2, 1, 2), "2": (1, 1, 1, 1)}
        assert torch.equal(net(example), reference)
    assert all("forward" not in vars(conv) for conv in net)  # each convolution's own forward is back
    assert torch.equal(net(example), reference)


def test_onnx_export_pads_fold_into_the_convolutions(onnx_export: Path, tmp_path: Path):
    """The networks' "same" pads reach ONNX Runtime as constants, which its basic graph
    optimisations fold into the Conv: the dynamic padding left one Pad per stride-2
    convolution (15 here). Only the stems' pad may be left: T1, S1 and T2 read the same
    normalised image, the exporter shares their one identical Pad, and a Pad read by
    several convolutions cannot be folded into one."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(onnx_export / "model.onnx"), options, providers=["CPUExecutionProvider"])
    networks = ("/t1/", "/s1/", "/t2/", "/s2/")
    exported = [n for n in onnx.load(str(onnx_export / "model.onnx")).graph.node
                if n.op_type == "Pad" and n.name.startswith(networks)]
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph.node
    left = [n for n in optimized if n.op_type == "Pad" and n.name.startswith(networks)]
    readers = {pad.name: sum(pad.output[0] in n.input for n in optimized) for pad in left}
    assert len(exported) >= 10  # stems and stride-2 convolutions of three networks: there to be folded
    assert len(left) <= 1 and all(count > 1 for count in readers.values()), readers


def test_unsupported_configurations_are_named(trained_run: Path, onnx_export: Path, tmp_path: Path):
    for fmt, precision in (("torchscript", "int8"), ("onnx", "fp16"), ("tflite", "fp32")):
        with pytest.raises(ExportError, match=f"{fmt}.*{precision}.*supported: onnx/fp32"):
            export_run(trained_run, fmt, precision, tmp_path / "x")
        assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="backend 'torch' cannot run the onnx export.*onnxruntime or openvino"):
        ExportedModel(onnx_export, "torch")
    with pytest.raises(ExportError, match="not a dualstpm export"):
        load_scorer("onnxruntime", exported=tmp_path)
    earlier = tmp_path / "earlier"  # an export whose metadata.json does not say which view decides
    shutil.copytree(onnx_export, earlier)
    meta = json.loads((earlier / METADATA_FILE).read_text())
    del meta["decision"]
    (earlier / METADATA_FILE).write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"metadata\.json has no decision: .*export the run again"):
        ExportedModel(earlier, "onnxruntime")
    with pytest.raises(ExportError, match="either --run .* or --exported .*not both"):
        load_scorer("onnxruntime", run=trained_run, exported=onnx_export)


def test_torchscript_export_matches_pytorch(trained_run: Path, tmp_path: Path, texture_images: torch.Tensor):
    exported = ExportedModel(export_run(trained_run, "torchscript", "fp32", tmp_path / "ts"), "torch")
    assert_parity(exported.infer(texture_images), float32_detector(trained_run).infer(texture_images))


def test_predict_cli_runs_an_export_like_pytorch(trained_run: Path, onnx_export: Path, synthetic_root: Path,
                                                  tmp_path: Path):
    images = sorted((synthetic_root / "synth_texture" / "test" / "hole").iterdir())[:3]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}

    def predict(*args: str) -> pd.DataFrame:
        out = tmp_path / "-".join(a.strip("-") for a in args[:2])
        done = subprocess.run([sys.executable, "-m", "dualstpm", "predict", *args, *map(str, images), "--out", str(out)],
                              check=False, capture_output=True, text=True, timeout=600, env=env, cwd=PROJECT_ROOT)
        assert done.returncode == 0, done.stderr
        return pd.read_csv(out / "predictions.csv")

    from dualstpm.predict import predict as predict_in_process

    torch_table = predict_in_process(float32_detector(trained_run), images, tmp_path / "float32")
    onnx_table = predict("--backend", "onnxruntime", "--exported", str(onnx_export))
    assert len(predict("--run", str(trained_run))) == len(images)  # the default backend, torch
    assert {"score", "normalized_score", "label", "threshold"} <= set(torch_table.columns)
    np.testing.assert_allclose(onnx_table["score"], torch_table["score"], rtol=SCORE_RTOL)
    np.testing.assert_allclose(onnx_table["normalized_score"], torch_table["normalized_score"], rtol=0, atol=SCORE_RTOL)
    assert list(onnx_table["label"]) == list(torch_table["label"])


def test_onnx_fp32_export_of_a_method_gated_full_width_model(synthetic_root: Path, tmp_path: Path,
                                                             texture_images: torch.Tensor):
    """The recipe-fidelity variants (issue 11) survive the model directory and the export:
    fitted with all four non-default values, saved, loaded back as the same network (a
    strict state-dict load: full-width layers only fit a full-width network) and exported."""
    from dualstpm.config import load_params
    from dualstpm.training import fit

    recipe = ["model.gate_form=method", "model.decoder_width=full", "fit.loss_scale=2.0", "fit.select=map_mean"]
    params = load_params(None, [*TINY_OVERRIDES, "fit.epochs=1", *recipe])
    run = tmp_path / "run"
    fit(params, synthetic_root, "synth_texture", run)
    detector = float32_detector(run)
    # every param as fitted; the data section records the data trained on (synthetic_root, one category)
    assert detector.params.model_copy(update={"data": params.data}) == params
    assert (detector.params.data.source, detector.params.data.categories) == ("folder", ["synth_texture"])
    decoder = detector.model.s2
    assert not decoder.gate16.residual and decoder.gate8.residual
    assert decoder.up4.up[0].out_channels == 24  # Lite2's stride-4 channels: full width (quarter would be 64)
    assert "val_map_mean_recon" in (run / "history.csv").read_text()
    exported = export_run(run, "onnx", "fp32", tmp_path / "onnx")
    assert_parity(ExportedModel(exported, "onnxruntime").infer(texture_images), detector.infer(texture_images))


# --- one precision for calibration and serving --------------------------------------------------

def test_a_model_trained_in_bfloat16_decides_alike_in_pytorch_and_its_float32_export(
        synthetic_root: Path, tmp_path: Path, texture_images: torch.Tensor):
    """Training in bfloat16 autocast (fit.precision=bfloat16; `auto` picks it on CPUs with
    native bfloat16) must not leave bfloat16 statistics in the model: calibration and
    PyTorch inference run in float32, the precision of the float32 exports, so the stored
    threshold is the float32 validation scores' and torch and ONNX decide alike."""
    from dualstpm.config import load_params
    from dualstpm.data import split_train_val, validation_parts
    from dualstpm.model.calibration import calibrate_threshold
    from dualstpm.training import fit

    params = load_params(None, [*TINY_OVERRIDES, "fit.epochs=1", "fit.precision=bfloat16"])
    run = tmp_path / "run"
    fit(params, synthetic_root, "synth_texture", run)
    detector = Detector.load(run)  # the default: float32, whatever fit.precision trained in
    assert detector.compute.precision == "float32" and detector.calibration.precision == "float32"

    _, val_paths = split_train_val(load_category(synthetic_root, "synth_texture"), params.fit.val_fraction, params.seed)
    calibration_part = validation_parts(len(val_paths), params.calibration.split, params.seed).calibration
    val_images = decode_images(val_paths, 64)[calibration_part]  # the images that calibrated the model
    rate = params.calibration.false_alarm_rate
    val_scores = detector.infer(val_images).score.numpy()
    assert detector.threshold == pytest.approx(calibrate_threshold(val_scores, rate), rel=1e-6)
    assert detector.inference.normalization.val_min == pytest.approx(float(val_scores.min()), rel=1e-6)
    # the precisions do differ on this model, else the comparison below would prove nothing
    bf16_scores = Detector.load(run, Compute.resolve("cpu", "bfloat16")).infer(val_images).score.numpy()
    assert abs(calibrate_threshold(bf16_scores, rate) / detector.threshold - 1) > SCORE_RTOL

    exported = ExportedModel(export_run(run, "onnx", "fp32", tmp_path / "onnx"), "onnxruntime")
    assert exported.threshold == detector.threshold and exported.metadata["threshold_precision"] == "float32"
    assert_parity(exported.infer(texture_images), detector.infer(texture_images))


def test_predict_and_test_refuse_overrides_they_would_not_apply(trained_run: Path, tmp_path: Path):
    from dualstpm.cli import serving_params
    from dualstpm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"predict` does not apply --set fit.precision=float32.*only data\.\*"
                                          r".*always runs in float32"):
        serving_params(None, ["fit.precision=float32"], "predict", ("data.",))
    with pytest.raises(ConfigError, match=r"test` does not apply --set image_size=128.*data\.\*, tracking\.\*"):
        serving_params(None, ["image_size=128"], "test", ("data.", "tracking."))
    assert serving_params(None, ["data.max_image_pixels=1000"], "predict", ("data.",)).data.max_image_pixels == 1000
    done = subprocess.run([sys.executable, "-m", "dualstpm", "predict", "--run", str(trained_run), "--set",
                           "fit.precision=bfloat16", str(tmp_path), "--out", str(tmp_path / "out")],
                          check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}, cwd=tmp_path)
    assert done.returncode != 0 and "does not apply --set fit.precision=bfloat16" in done.stderr + done.stdout
    assert not (tmp_path / "out").exists()


def test_int8_calibrates_on_the_data_the_model_was_trained_on(trained_run: Path, synthetic_root: Path, tmp_path: Path):
    import yaml

    from dualstpm.export import validation_images

    # trained_run was fitted on synth_texture in synthetic_root, not on the params' default data/synthetic
    data = yaml.safe_load((trained_run / "model" / "params.yaml").read_text())["data"]
    assert (data["source"], data["root"], data["categories"]) == ("folder", str(synthetic_root.resolve()),
                                                                  ["synth_texture"])
    detector = float32_detector(trained_run)
    recorded = validation_images(detector, None, trained_run)  # no --data-root: the one it was trained on
    # 20 train/good images, fit.val_fraction 0.2: round(0.2 * 20) = 4 held out for validation
    assert recorded.shape == (4, 3, 64, 64)
    assert np.array_equal(recorded, validation_images(detector, synthetic_root, trained_run))
    # an explicit --data-root wins: a copy holding 10 of the images holds out round(0.2 * 10) = 2
    other = tmp_path / "other" / "synth_texture" / "train" / "good"
    shutil.copytree(synthetic_root / "synth_texture" / "train" / "good", other)
    for path in sorted(other.iterdir())[10:]:
        path.unlink()
    assert validation_images(detector, tmp_path / "other", trained_run).shape[0] == 2
    # the recorded folder gone: said, with the fix
    moved = tmp_path / "moved"
    shutil.copytree(trained_run / "model", moved / "model")
    raw = yaml.safe_load((moved / "model" / "params.yaml").read_text())
    raw["data"]["root"] = str(tmp_path / "gone")
    (moved / "model" / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ExportError) as refused:
        validation_images(float32_detector(moved), None, moved)
    assert (f"its model was trained on synth_texture in {tmp_path / 'gone'} (data.root in "
            f"{moved / 'model' / 'params.yaml'}), and {tmp_path / 'gone' / 'synth_texture'} no longer exists. "
            "Pass --data-root DIR") in str(refused.value)


# --- real images: magnetic_tile ---------------------------------------------------------------

TILE_TRAIN_IMAGES = 60


@pytest.fixture(scope="module")
def tile(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small model trained here on magnetic_tile (64 px, 1 epoch, the first 60 good
    training images; all 582 test images), with PyTorch's answers on the test split.
    The data: ../shared/data beside the project, or $DUALSTPM_SHARED_DATA (a worktree elsewhere)."""
    from dualstpm.config import load_params
    from dualstpm.training import fit

    source = Path(os.environ.get("DUALSTPM_SHARED_DATA", SHARED_DATA)) / "magnetic_tile"
    if not source.is_dir():
        pytest.skip(f"{source} not found (the shared datasets sit beside the project root)")
    root = tmp_path_factory.mktemp("tile_data")
    target = root / "magnetic_tile"
    train = sorted((source / "train" / "good").iterdir())[:TILE_TRAIN_IMAGES]
    for path in [*train, *(p for p in (source / "test").rglob("*") if p.is_file()),
                 *(p for p in (source / "ground_truth").rglob("*") if p.is_file())]:
        link = target / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(path)
    run = tmp_path_factory.mktemp("tile_run") / "magnetic_tile"
    fit(load_params(None, [*TINY_OVERRIDES, "fit.epochs=1"]), root, "magnetic_tile", run)
    dataset = load_category(root, "magnetic_tile")
    images = decode_images([s.path for s in dataset.test], 64)
    return {
        "root": root, "run": run, "images": images,
        "labels": np.array([s.label for s in dataset.test]),
        "masks": decode_masks(dataset.test, 64)[0].numpy(),
        "torch": float32_detector(run).infer(images),
        "exports": tmp_path_factory.mktemp("tile_exports"),
    }


def tile_export(tile: dict, fmt: str, precision: str) -> Path:
    return export_run(tile["run"], fmt, precision, tile["exports"] / f"{fmt}-{precision}", data_root=tile["root"])


def aurocs(tile: dict, out: InferenceOutput) -> tuple[float, float]:
    return (metrics.image_auroc(tile["labels"], out.score.numpy()),
            metrics.pixel_auroc(tile["masks"], out.anomaly_map.numpy()))


@pytest.mark.real_data
@pytest.mark.parametrize("fmt, backend", [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_fp32_export_matches_pytorch_on_magnetic_tile(tile: dict, fmt: str, backend: str):
    exported = ExportedModel(tile_export(tile, fmt, "fp32"), backend).infer(tile["images"])
    assert_parity(exported, tile["torch"])


FP16_GAP = pytest.mark.xfail(reason=(
    "openvino fp16 (computed in bfloat16 by the CPU plugin on CPUs with bfloat16 units) keeps both AUROCs within "
    "0.0012 but its labels agree on 98.80 % (7 of 582 flip; bound 99 %) since the threshold is calibrated in float32: "
    "21 test images of this weak model lie within 1 % of it; see docs/results/exports-parity.md"), strict=False)


@pytest.mark.real_data
@pytest.mark.parametrize("fmt, precision, backend", [
    ("onnx", "int8", "onnxruntime"), ("openvino", "int8", "openvino"),
    pytest.param("openvino", "fp16", "openvino", marks=FP16_GAP),
])
def test_reduced_precision_keeps_auroc_on_magnetic_tile(tile: dict, fmt: str, precision: str, backend: str):
    exported = ExportedModel(tile_export(tile, fmt, precision), backend).infer(tile["images"])
    reference = tile["torch"]
    (image_ref, pixel_ref), (image_got, pixel_got) = aurocs(tile, reference), aurocs(tile, exported)
    agreement = float((exported.label.bool() == reference.label.bool()).float().mean())
    print(f"{fmt}/{precision}: image AUROC {image_got:.4f} vs {image_ref:.4f}, pixel AUROC {pixel_got:.4f} vs "
          f"{pixel_ref:.4f}, labels agree on {agreement:.2%}")
    assert abs(image_got - image_ref) <= PARITY_AUROC_GAP
    assert abs(pixel_got - pixel_ref) <= PARITY_AUROC_GAP
    assert agreement >= PARITY_LABEL_AGREEMENT


def test_exports_in_threads_at_once_both_succeed(trained_run: Path, tmp_path: Path, texture_images: torch.Tensor):
    """The flows register (and so export) several categories in threads: torch's ONNX
    exporter keeps process-wide state, and two exports at once used to fail one of them
    (`GLOBALS.in_onnx_export must be True`). Both must succeed and run like PyTorch."""
    from concurrent.futures import ThreadPoolExecutor

    import onnxruntime

    from dualstpm.export import write_onnx

    def one(k: int) -> Path:
        return write_onnx(float32_detector(trained_run), tmp_path / f"model{k}.onnx")

    with ThreadPoolExecutor(2) as pool:
        paths = list(pool.map(one, range(2)))

    reference = float32_detector(trained_run).infer(texture_images).score.numpy()
    for path in paths:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        score = session.run(["score"], {"images": texture_images.numpy()})[0]
        np.testing.assert_allclose(score, reference, rtol=1e-4)
