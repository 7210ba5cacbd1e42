"""Running the detector on a backend: PyTorch (the run's weights) or an export.

Every backend gives a :class:`dualstpm.model.inference.Scorer`: `image_size`, `batch_size`,
`threshold` and `infer(images) -> InferenceOutput`, so `dualstpm predict`, the MLflow
pyfunc and the benchmark score the same way whatever runs the graph.

- `torch`: :class:`dualstpm.detector.Detector` on the run directory, or a TorchScript export;
- `onnxruntime`: an ONNX export (`model.onnx`) on ONNX Runtime's CPU provider;
- `openvino`: an OpenVINO export (`model.xml`), or an ONNX export read by OpenVINO, on its
  CPU plugin (fp32 and int8 exports with `INFERENCE_PRECISION_HINT=f32`, so that a CPU
  with bfloat16 units does not silently compute their float ops in bfloat16; fp16 at the
  plugin's default, bfloat16 on such CPUs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dualstpm.errors import ExportError
from dualstpm.export import METADATA_FILE, MODEL_FILES, export_run
from dualstpm.model.inference import INPUT_NAME, OUTPUT_NAMES, InferenceOutput
from dualstpm.detector import read_score_spec
from dualstpm.model.calibration import ScoreNormalization
from dualstpm.model.fusion import ScoreSpec
from dualstpm.model.regions import RegionSpec
from dualstpm.model.tiling import Tiling
from dualstpm.rundir import EXPORTS_DIR
from dualstpm.sizes import ImageSize, check_size, from_json, hw

BACKENDS = ("torch", "onnxruntime", "openvino")
BACKEND_FORMATS = {"torch": ("torchscript",), "onnxruntime": ("onnx",), "openvino": ("openvino", "onnx")}
DEFAULT_FORMAT = {"torch": "torchscript", "onnxruntime": "onnx", "openvino": "openvino"}
#: the keys of an export's metadata.json that running it reads
METADATA_KEYS = ("format", "image_size", "batch_size", "threshold", "decision", "fusion", "model_file")


class ExportedModel:
    """An export folder run by one backend: the same inputs and outputs as the inference module."""

    def __init__(self, directory: Path, backend: str, threads: int | None = None) -> None:
        directory = Path(directory)
        meta_path = directory / METADATA_FILE
        if not meta_path.is_file():
            raise ExportError(f"{directory} is not a dualstpm export (no {METADATA_FILE}): "
                              "make one with `dualstpm export --run RUN --format onnx --out DIR`")
        self.directory = directory
        self.metadata = json.loads(meta_path.read_text())
        missing = [key for key in METADATA_KEYS if key not in self.metadata]
        if missing:
            raise ExportError(f"{meta_path} has no {', '.join(missing)}: an earlier dualstpm made this export; "
                              "export the run again with `dualstpm export`")
        self.backend = backend
        fmt = self.metadata["format"]
        if backend not in BACKENDS or fmt not in BACKEND_FORMATS[backend]:
            usable = [b for b, formats in BACKEND_FORMATS.items() if fmt in formats]
            raise ExportError(f"backend {backend!r} cannot run the {fmt} export in {directory}; "
                              f"use --backend {' or '.join(usable)}")
        lacking = [name for name in OUTPUT_NAMES if name not in self.metadata.get("outputs", {})]
        if lacking:
            raise ExportError(f"{meta_path}: the export has no output {', '.join(lacking)} (an earlier dualstpm made "
                              "it); export the run again with `dualstpm export`")
        self.image_size = _image_size(self.metadata["image_size"], meta_path)
        self.batch_size = int(self.metadata["batch_size"])
        self.threshold = float(self.metadata["threshold"])
        self.decision_view = self.metadata["decision"]
        self.regions = _region_spec(self.metadata.get("regions"), meta_path)
        self.score_spec, self.normalization = _scoring(self.metadata, meta_path)
        self.tiling = _tiling(self.metadata.get("tiling"), self.batch_size, meta_path)
        self.frame_size = self.image_size if self.tiling is None else tuple(self.metadata["tiling"]["frame_size"])
        self._run = self._load(directory / self.metadata["model_file"], threads)

    def _load(self, path: Path, threads: int | None):
        if self.backend == "onnxruntime":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            return lambda images: session.run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        if self.backend == "openvino":
            import openvino as ov

            # fp32 and int8 (its float ops) in f32; fp16 at the plugin's default precision
            config = {"INFERENCE_PRECISION_HINT": "f32"} if self.metadata["precision"] != "fp16" else {}
            if threads:
                config["INFERENCE_NUM_THREADS"] = threads
            compiled = ov.Core().compile_model(str(path), "CPU", config)
            request = compiled.create_infer_request()

            def run(images: np.ndarray) -> list[np.ndarray]:
                results = request.infer({INPUT_NAME: images})
                return [results[compiled.output(name)] for name in OUTPUT_NAMES]

            return run
        module = torch.jit.load(str(path), map_location="cpu").eval()

        def run_torch(images: np.ndarray) -> list[np.ndarray]:
            with torch.inference_mode():
                return [t.numpy() for t in module(torch.from_numpy(images))]

        return run_torch

    def typical_level(self) -> float:
        """The decision view's typical good level, recorded by the export (`Detector.typical_level`).
        Raises ExportError for an export whose metadata lacks it."""
        if "typical_level" not in self.metadata:
            raise ExportError(f"{self.directory / METADATA_FILE} does not record the typical good level its overlays "
                              "need (an older export): export the run again with `dualstpm export`")
        return float(self.metadata["typical_level"])

    def infer(self, images: torch.Tensor | np.ndarray) -> InferenceOutput:
        """(N, 3, S, S) float images in [0, 1] (or uint8) -> outputs as CPU tensors."""
        array = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / np.float32(255.0)
        outputs = self._run(np.ascontiguousarray(array, dtype=np.float32))
        return InferenceOutput(*(torch.from_numpy(np.asarray(o)) for o in outputs))


def _image_size(value: object, meta_path: Path) -> ImageSize:
    """metadata.json's `image_size`: a side (a square) or [height, width]; ExportError naming
    the file for anything else."""
    try:
        return check_size(from_json(value))
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{meta_path}: image_size {value!r} is not an input size ({exc}); export the run again "
                          "with `dualstpm export`") from None


def _scoring(metadata: dict, meta_path: Path) -> tuple[ScoreSpec, ScoreNormalization]:
    """The export's image-score reduction and normalisation (`score`, `normalization`), which a
    tiled frame's scores are computed with outside the graph. ExportError for a bad record."""
    try:
        score = read_score_spec({k: v for k, v in metadata["score"].items() if k != "function"})
        norm = metadata["normalization"]
        return score, ScoreNormalization(float(norm["threshold"]), float(norm["val_min"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{meta_path} has an unreadable `score` or `normalization` record ({type(exc).__name__}: "
                          f"{exc}): export the run again with `dualstpm export`") from None


def _tiling(record: dict | None, batch_size: int, meta_path: Path) -> Tiling | None:
    """The export's tiling (`metadata.json` → `tiling`: frame size, tile, overlap); None: untiled.
    ExportError for a bad record."""
    if record is None:
        return None
    try:
        tiling = Tiling(tuple(int(v) for v in record["tile"]), float(record["overlap"]), batch_size)
        tiling.grid(tuple(int(v) for v in record["frame_size"])).positions()  # validates the overlap and sizes
        return tiling
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{meta_path} has an unreadable `tiling` record ({type(exc).__name__}: {exc}): export the "
                          "run again with `dualstpm export`") from None


def _region_spec(record: dict | None, meta_path: Path) -> RegionSpec | None:
    """The export's regions (`metadata.json` → `regions`: the pixel threshold, scale and rule
    the deployment applies to its `anomaly_map` output); None when it records none (a model
    without a pixel threshold, or an export of an earlier dualstpm). Raises ExportError for a bad record."""
    if record is None:
        return None
    try:
        return RegionSpec.from_json(record)
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{meta_path} has an unreadable `regions` record ({type(exc).__name__}: {exc}): "
                          "export the run again with `dualstpm export`") from None


def run_export_dir(run_dir: Path, fmt: str, precision: str = "fp32") -> Path:
    """`RUN/exports/<format>-<precision>/`, exported now unless it is already there and newer
    than the model directory (a new fit or ablation makes it stale)."""
    from dualstpm.rundir import MODEL_SUBDIR

    target = Path(run_dir) / EXPORTS_DIR / f"{fmt}-{precision}"
    model_dir = Path(run_dir) / MODEL_SUBDIR
    newest = max((p.stat().st_mtime for p in model_dir.iterdir()), default=0.0)
    meta = target / METADATA_FILE
    if not meta.is_file() or meta.stat().st_mtime < newest or not (target / MODEL_FILES[fmt]).is_file():
        export_run(run_dir, fmt, precision, target)
    return target


def load_scorer(backend: str = "torch", run: Path | None = None, exported: Path | None = None, device: str = "auto"):
    """The scorer for `backend`: from an export folder when `exported` is given, else from the
    run directory (PyTorch directly, on `device`; other backends through `RUN/exports/`,
    exported on demand; they run on the CPU)."""
    if backend not in BACKENDS:
        raise ExportError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if exported is not None and run is not None:
        raise ExportError(f"give either --run {run} (the trained run) or --exported {exported} (an export folder), "
                          "not both: they may hold different models or precisions")
    if exported is not None:
        return ExportedModel(exported, backend)
    if run is None:
        raise ExportError("give --run RUN (a trained run) or --exported DIR (an export folder)")
    if backend == "torch":
        from dualstpm.detector import Detector

        return Detector.load(run, device=device)
    return ExportedModel(run_export_dir(run, DEFAULT_FORMAT[backend]), backend)
