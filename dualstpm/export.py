"""`dualstpm export`: the whole detector (the inference module) as ONNX, OpenVINO or TorchScript.

An export folder holds the model file(s) and `metadata.json`; it is built in a staging
folder and swapped in complete (`dualstpm.files.staged_dir`). What is exported is a trace
of :class:`dualstpm.model.inference.DualStpmInference` in float32: teachers' and students'
normalisation, the six maps, the fusion with its validation statistics, smoothing, the
image score (the calibrated `score.*` reduction), the normalised score and the decision at the stored threshold are all
inside the graph. The resize is not (see `metadata.json` → `input.resize`), nor are defect
regions: `metadata.json` → `regions` records the pixel threshold, pixel scale and rule that
`dualstpm.model.regions` applies to the graph's `anomaly_map` output (docs/regions.md).

Supported (format, precision) pairs, see :data:`SUPPORTED`:

- `onnx`: `fp32`; `int8` = ONNX Runtime static post-training quantisation (QDQ, per-channel
  int8 weights, uint8 activations), calibrated on the run's validation good images, of the
  S2 decoder's convolutions (:data:`INT8_SCOPE`, chosen among :func:`int8_scope`'s scopes on
  validation images); the rest of the networks, the distances, fusion and scores stay float32.
- `openvino`: `fp32`; `fp16` (weights stored as fp16, computed at the plugin's precision);
  `int8` (the quantised ONNX graph converted to OpenVINO IR, whose CPU plugin runs it in int8).
- `torchscript`: `fp32` (a `torch.jit.trace`, loadable without this package).
"""

from __future__ import annotations

import importlib.metadata
import platform
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.padding import pad_same_arg

from dualstpm.compute import Compute
from dualstpm.detector import Detector
from dualstpm.errors import ExportError
from dualstpm.files import staged_dir, write_json
from dualstpm.model.fusion import MEMORY_VIEWS
from dualstpm.model.inference import INPUT_NAME, OUTPUT_NAMES, TILING_FUNCTION
from dualstpm.progress import stage
from dualstpm.rundir import MODEL_SUBDIR, PARAMS_FILE, RunDir, read_optional_json
from dualstpm.sizes import hw, to_json

FORMATS = ("onnx", "openvino", "torchscript")
PRECISIONS = ("fp32", "fp16", "int8")
SUPPORTED = {
    ("onnx", "fp32"), ("onnx", "int8"),
    ("openvino", "fp32"), ("openvino", "fp16"), ("openvino", "int8"),
    ("torchscript", "fp32"),
}
#: Parity of a reduced-precision export with PyTorch float32 on the same test images
#: (docs/results/exports-parity.md): its decisions agree on at least this share of the
#: images, and its image and pixel AUROC are within PARITY_AUROC_GAP. The export tests hold
#: every supported export to them; the int8 scope study and the comparison count an
#: export only when it meets them.
PARITY_LABEL_AGREEMENT = 0.99
PARITY_AUROC_GAP = 0.005
METADATA_FILE = "metadata.json"
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "torchscript": "model.pt"}
def resize_note(tiled: bool) -> str:
    """metadata.json's `input.resize`: how a deployment must prepare an image for the graph."""
    target = ("tiling.frame_size, then cut into tiles of image_size (see tiling)" if tiled
              else "image_size (one side: a square; [height, width])")
    return ("dualstpm.data.resize_image: decoded RGB float32 in [0, 1] (gray repeated to 3 channels, "
            f"8-bit / 255, 16-bit / 65535), resized to {target} by bilinear interpolation "
            "with antialiasing (torch.nn.functional.interpolate, align_corners=False), no crop, NCHW")
PACKAGES = ("dualstpm", "torch", "timm", "onnx", "onnxruntime", "onnxscript", "openvino", "numpy")
CALIBRATION_BATCH = 8
ONNX_OPSET = 17


def check_supported(fmt: str, precision: str) -> None:
    """Raise :class:`ExportError` naming an unsupported (format, precision) pair and the supported ones."""
    if (fmt, precision) not in SUPPORTED:
        pairs = ", ".join(f"{f}/{p}" for f, p in sorted(SUPPORTED))
        raise ExportError(f"export format {fmt!r} with precision {precision!r} is not supported; "
                          f"supported: {pairs}")


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def _require(module: str, fmt: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"{fmt} export needs the package {module!r}: pip install -e '.[deploy]'") from None


def _vecdot_symbolic(g, x, y, dim):
    """ONNX for `torch.linalg.vecdot` of real tensors (the distance maps): ReduceSum(x * y, dim)."""
    from torch.onnx import symbolic_helper

    axis = symbolic_helper._get_const(dim, "i", "dim")
    return g.op("ReduceSum", g.op("Mul", x, y), g.op("Constant", value_t=torch.tensor([axis])), keepdims_i=0)


#: torch's exporters keep process-wide state (`torch.onnx` GLOBALS, the JIT tracer, and the
#: warnings filter silenced around them): one export at a time per process, even when the
#: flows register several categories in threads.
_EXPORTING = threading.Lock()


def _example_images(detector: Detector, batch: int) -> torch.Tensor:
    """A fixed example batch for tracing (its values do not matter; no global RNG is drawn)."""
    generator = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, *hw(detector.image_size), generator=generator)


@contextmanager
def static_same_padding(module: torch.nn.Module, example: torch.Tensor) -> Iterator[dict[str, tuple[int, ...]]]:
    """Within the block, timm's TF "same" convolutions (`Conv2dSame`: the EfficientNet-Lite
    teachers' and students' stride-2 convolutions) in `module` pad by constants instead of
    computing their padding from the input's size on every call.

    Traced, that run-time computation becomes Shape/Gather/Ceil ops feeding each Pad. While the
    batch axis is dynamic ONNX Runtime cannot fold them, so every Pad stays a copy of its
    activation with layout changes around it (a fifth of ONNX Runtime's time at 128 px,
    docs/results/exports-speed.md). An export's height and width are fixed (its metadata's
    input shape), so each convolution's padding is a constant: it is measured on one forward
    pass of `example` (B, 3, H, W) with timm's own `pad_same_arg`, and given to the graph as a
    zero pad with an explicit value, the form ONNX Runtime's pad fusion folds into the Conv.

    Yields {module name: (left, right, top, bottom)} px, the padding fixed per convolution;
    every convolution's own forward is back on exit. Outputs at `example`'s size are unchanged
    (tests/test_export.py); at any other size they would be wrong, which an export never sees.
    """
    convs = {name: conv for name, conv in module.named_modules() if isinstance(conv, Conv2dSame)}
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str):
        def hook(_conv: torch.nn.Module, args: tuple) -> None:  # returns None: the inputs pass unchanged
            sizes.setdefault(name, tuple(args[0].shape[-2:]))
        return hook

    hooks = [conv.register_forward_pre_hook(record(name)) for name, conv in convs.items()]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    pads = {name: tuple(int(p) for p in pad_same_arg(list(sizes[name]), conv.weight.shape[-2:], conv.stride, conv.dilation))
            for name, conv in convs.items() if name in sizes}

    def padded(conv: Conv2dSame, pad: tuple[int, ...]):
        # value=0.0 given explicitly: without it the exporter leaves the Pad's value input empty,
        # which ONNX Runtime's pad fusion does not take for a constant
        return lambda x: F.conv2d(F.pad(x, pad, value=0.0), conv.weight, conv.bias, conv.stride, 0, conv.dilation,
                                  conv.groups)

    for name, pad in pads.items():
        convs[name].forward = padded(convs[name], pad)
    try:
        yield pads
    finally:
        for name in pads:
            del convs[name].forward


def write_onnx(detector: Detector, path: Path) -> Path:
    """Export the detector's inference module to ONNX (opset 17, float32 input, dynamic batch,
    the image size fixed; "same" padding as constants, :func:`static_same_padding`).

    The TorchScript-based exporter (`dynamo=False`) is used: on 2 CPU cores it takes about
    15 s where the `torch.export` path took 4 to 10 minutes for the same graph. It lacks
    only `linalg_vecdot`, registered here.
    """
    _require("onnx", "onnx")
    inference = detector.inference
    inference.chunked = False  # one graph for every batch size
    example = _example_images(detector, 1)
    try:
        with stage("exporting the detector to ONNX"), _EXPORTING, warnings.catch_warnings():
            torch.onnx.register_custom_op_symbolic("aten::linalg_vecdot", _vecdot_symbolic, ONNX_OPSET)
            warnings.simplefilter("ignore")  # tracer warnings about Python constants (the fusion's weights)
            with static_same_padding(inference, example):
                torch.onnx.export(
                    inference, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                    input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                    dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)},
                )
    finally:
        inference.chunked = True
    return path


def write_torchscript(detector: Detector, path: Path) -> Path:
    inference = detector.inference
    inference.chunked = False
    try:
        with stage("tracing the detector to TorchScript"), _EXPORTING, torch.inference_mode(False), torch.no_grad():
            example = _example_images(detector, 2)
            traced = torch.jit.trace(inference, (example,), check_trace=False)
        traced.save(str(path))
    finally:
        inference.chunked = True
    return path


#: the int8 scopes `studies/int8_scope.py` compares, widest first (node-name prefixes, :func:`int8_scope`)
INT8_SCOPES = ("all", "students", "t1_deep_s2", "s2")
#: the scopes whose node-name prefixes do not depend on the teachers
_FIXED_SCOPES = {"all": ("/",), "students": ("/s1/", "/s2/"), "s2": ("/s2/",)}
#: the scope `dualstpm export --precision int8` quantises: chosen on validation images of every
#: dataset in ../shared/data (docs/results/exports-parity.md, "The int8 scope")
INT8_SCOPE = "s2"


def int8_scope(detector: Detector, name: str = INT8_SCOPE) -> tuple[str, ...]:
    """ONNX node-name prefixes of the convolutions int8 quantises under the scope `name`:

    - `all`: every convolution (teachers, students, the discriminative stage);
    - `students`: S1 and S2;
    - `t1_deep_s2`: T1's stages past its last compared level (they only compute the deep map
      S2 decodes) and the S2 decoder;
    - `s2`: the S2 decoder only.

    What stays float32 keeps the anomaly signal, a small teacher-student difference
    (1 - cosine): int8 rounding of the compared pyramids adds a difference of the same order.
    Raises ExportError for an unknown name, or when T1's deep level is not a sibling of its
    last compared one (`t1_deep_s2` cannot tell its deep-only stages apart).
    """
    if name not in INT8_SCOPES:
        raise ExportError(f"unknown int8 scope {name!r}; choose one of {', '.join(INT8_SCOPES)}")
    if name in _FIXED_SCOPES:
        return _FIXED_SCOPES[name]
    t1 = detector.model.t1
    compared, deep = t1.module_names[-2], t1.module_names[-1]
    parent = compared.rpartition(".")[0]
    container = t1.body.get_submodule(parent) if parent else t1.body
    siblings = [f"{parent}.{child}" if parent else child for child, _ in container.named_children()]
    if deep not in siblings:
        raise ExportError(f"int8 export: T1 {t1.name!r} has its deep level {deep!r} outside {parent or 'its body'}, "
                          "so its deep-only stages cannot be told apart; export it in fp32 or fp16")
    return (*(f"/t1/body/{child}/" for child in siblings[siblings.index(compared) + 1 : siblings.index(deep) + 1]), "/s2/")


def quantize_onnx(source: Path, target: Path, images: np.ndarray, scope: tuple[str, ...]) -> dict:
    """Static int8 quantisation of the convolutions of an ONNX export whose node names start
    with one of `scope` (:func:`int8_scope`), calibrated on `images` (N, 3, S, S) float32 in
    [0, 1]; returns what metadata records about it. Raises ExportError when none matches."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: images[i : i + CALIBRATION_BATCH]}
                                 for i in range(0, len(images), CALIBRATION_BATCH)])

        def get_next(self):
            return next(self.batches, None)

    convs = [n.name for n in onnx.load(str(source)).graph.node if n.op_type == "Conv"]
    chosen = [name for name in convs if name.startswith(scope)]
    if not chosen:
        raise ExportError(f"int8 export: no convolution of the graph lies in the quantised scope {list(scope)}")
    with stage(f"quantising {len(chosen)} of {len(convs)} convolutions to int8 on {len(images)} calibration images"):
        quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv"], nodes_to_quantize=chosen)
    return {"method": "onnxruntime.quantization.quantize_static", "format": "QDQ", "per_channel": True,
            "activations": "uint8", "weights": "int8", "ops": ["Conv"], "scope": list(scope),
            "quantized_convolutions": len(chosen), "convolutions": len(convs),
            "float32": "every other op: the convolutions outside the scope, the distances, fusion and scores",
            "calibration_images": len(images), "calibration_data": "the run's validation good images"}


def validation_images(detector: Detector, data_root: Path | None, run_dir: Path) -> np.ndarray:
    """The run's validation good images (the fit's seeded split) at its image size, found in
    `data_root`, default the data root the model was trained on (`data.root` of
    RUN/model/params.yaml). Raises ExportError when that folder no longer holds the category."""
    from dualstpm.data import decode_images, load_category, split_train_val
    from dualstpm.project import resolve_data_root

    params, category = detector.params, detector.calibration.category
    if data_root is None:
        data_root = resolve_data_root(params.data.root, run_dir)
        if not (data_root / category).is_dir():
            raise ExportError(
                f"int8 calibration needs the validation images of {run_dir}: its model was trained on {category} in "
                f"{data_root} (data.root in {Path(run_dir) / MODEL_SUBDIR / PARAMS_FILE}), and "
                f"{data_root / category} no longer exists. Pass --data-root DIR, the folder that now holds {category}/"
            )
    dataset = load_category(data_root, category, require_test=False)
    _, val_paths = split_train_val(dataset, params.fit.val_fraction, params.seed)
    images = decode_images(val_paths, detector.frame_size, "decoding calibration images")
    tiling = detector.tiling  # the graph scores tiles: under tiling, calibrate on the frames' tiles
    return (images if tiling is None else tiling.cut_all(images)).numpy()


def metadata(detector: Detector, run_dir: Path, fmt: str, precision: str, quantization: dict | None) -> dict:
    """What a user of the export needs besides the graph, and where it came from."""
    record = read_optional_json(RunDir(run_dir).run_record, "delete it and run `dualstpm test` again") or {}
    size = detector.image_size
    height, width = hw(size)
    return {
        "format": fmt,
        "precision": precision,
        "model_file": MODEL_FILES[fmt],
        "image_size": to_json(size),  # a side, or [height, width]
        "batch_size": detector.batch_size,
        "input": {"name": INPUT_NAME, "shape": ["N", 3, height, width], "dtype": "float32", "range": [0.0, 1.0],
                  "resize": resize_note(detector.tiling is not None)},
        "outputs": {
            "score": f"(N,) raw image score of the decision view (see decision): {detector.score_spec.label} of its map (see score)",
            "normalized_score": "(N,) in [0, 1]; 0.5 = the threshold (see normalization)",
            "label": "(N,) bool, true = defective (score > threshold)",
            "anomaly_map": f"(N, {height}, {width}) the decision view's anomaly map at image_size, raw score units (disc: logits)",
            "stpm_score": "(N,) branch A (STPM) alone", "recon_score": "(N,) branch B (reconstruction) alone",
            "disc_score": "(N,) the discriminative stage alone; NaN when the model has none",
            "stpm_map": f"(N, {height}, {width}) branch A's anomaly map", "recon_map": f"(N, {height}, {width}) branch B's",
        },
        "decision": detector.decision_view,
        # tiling: the graph scores one tile; frames are cut and its maps stitched outside it (docs/frames.md#tiling)
        "tiling": None if detector.tiling is None else {
            "frame_size": list(hw(detector.frame_size)), "tile": list(detector.tiling.tile),
            "overlap": detector.tiling.overlap, "function": TILING_FUNCTION},
        "threshold": detector.threshold,
        # the reduction of a map to the image score; threshold and normalization are in its units
        "score": {**detector.score_spec.to_json(), "function": "dualstpm.model.fusion.image_score"},
        "typical_level": detector.typical_level(),
        # defect regions: found outside the graph, on its anomaly_map output (docs/regions.md); null: none
        "regions": detector.regions.to_json() if detector.regions is not None else None,
        "threshold_precision": detector.calibration.precision,  # float32: the scores it was calibrated on
        "normalization": detector.inference.normalization.to_json(),
        "fusion": {**asdict(detector.spec),
                   "source": detector.chosen.source if detector.chosen and detector.chosen.spec else "params.fusion",
                   "map_stats": detector.calibration.map_stats.to_json()},
        # the memory bank inside the graph (the decision view is memory or fused_memory); null: none there
        "memory": None if detector.inference.memory is None or detector.decision_view not in MEMORY_VIEWS else {
            "entries": int(detector.inference.memory.bank.shape[0]), "features": int(detector.inference.memory.bank.shape[1]),
            "coreset_ratio": detector.params.memory.coreset_ratio, "sigma": detector.params.memory.sigma,
            "stats": detector.calibration.memory_stats.to_json()},
        "quantization": quantization,
        "source": {
            "run_dir": str(Path(run_dir).resolve()),
            "category": detector.calibration.category,
            "mlflow_run_id": record.get("run_id"),
            "data_hash": record.get("eval_data_hash"),
            "teachers": [detector.params.model.t1.name, detector.params.model.t2.name],
        },
        "packages": _versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def export_run(run_dir: Path, fmt: str, precision: str, out_dir: Path, data_root: Path | None = None,
               calibration_images: np.ndarray | None = None, scope: str = INT8_SCOPE) -> Path:
    """Export the trained model of `run_dir` into `out_dir` (replaced atomically); returns `out_dir`.

    int8 calibrates on the run's validation good images (found under `data_root`, default
    the data root the model was trained on, recorded in RUN/model/params.yaml), or on `calibration_images` (N, 3, S, S)
    float32 in [0, 1] when given, quantising the convolutions of `scope` (:data:`INT8_SCOPES`).
    Raises :class:`ExportError` for an unsupported (format,
    precision) pair, a missing package or validation images that cannot be found.
    """
    check_supported(fmt, precision)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    detector = Detector.load(run_dir, Compute.resolve("cpu", "float32"))
    scope_prefixes = int8_scope(detector, scope) if precision == "int8" else ()  # a bad scope fails before any work
    quantization = None
    with staged_dir(out_dir) as staging:
        if fmt == "torchscript":
            write_torchscript(detector, staging / MODEL_FILES[fmt])
        else:
            onnx_path = write_onnx(detector, staging / MODEL_FILES["onnx"])
            if precision == "int8":
                _require("onnxruntime", "int8")
                float_path = onnx_path.with_name("model-fp32.onnx")
                onnx_path.rename(float_path)
                if calibration_images is None:
                    calibration_images = validation_images(detector, data_root, run_dir)
                quantization = quantize_onnx(float_path, onnx_path, calibration_images, scope_prefixes)
                quantization["scope_name"] = scope
                float_path.unlink()
            if fmt == "openvino":
                ov = _require("openvino", "openvino")
                with stage("converting the ONNX graph to OpenVINO"):
                    ov.save_model(ov.convert_model(str(onnx_path)), str(staging / MODEL_FILES[fmt]),
                                  compress_to_fp16=precision == "fp16")
                onnx_path.unlink()
        write_json(staging / METADATA_FILE, metadata(detector, run_dir, fmt, precision, quantization))
    return out_dir
