"""The detector as an MLflow pyfunc, logged *from code*: MLflow stores this file, the
model directory (`weights.safetensors`, `params.yaml`, `calibration.json`) and its ONNX
export (`dualstpm export --format onnx`, artifact `onnx`) as artifacts and a copy of the
`dualstpm` package; loading runs `load_context`, which calls `Detector.load`. Nothing is
pickled.

Input: a DataFrame with one column `image` holding encoded image files (PNG, JPEG, ...
bytes; base64 strings in a JSON request to `mlflow models serve`). Output: a DataFrame
with, per image, `score` (of the view the model decides with), `normalized_score` (in
[0, 1], 0.5 = the stored threshold), `label` (`defective` / `good` at the threshold),
`threshold`, `stpm_score`, `recon_score`, `disc_score` (None without the discriminative
stage: ``null`` in the served JSON), and with `params={"return_map": True}` the decision
view's anomaly map at the image's own size (`anomaly_map`, a list of rows). With
`params={"return_regions": True}`, `regions`: the image's defect regions, a list of objects
with `regions.jsonl`'s keys less `image` (docs/regions.md; null when the model has no pixel
threshold); a model with a region rule (`decision.*`) also answers `n_regions` and `verdict`
in every row, as `predictions.csv` has them. A number that
has no value is None, never NaN (`dualstpm.files.json_ready_table`): MLflow's scoring
server writes a NaN as ``NaN``, which strict JSON parsers refuse. Bytes that are not an
image are answered with HTTP 400 naming the column and row (and the request's index label
when it is not the row number) and what to send. `params={"threshold": t}` overrides the stored
threshold; `params={"backend": "onnxruntime"}` answers with the ONNX export on ONNX
Runtime instead of PyTorch (default `torch`). Images above the model's `data.max_image_pixels`
(the value it was trained with) are refused. The PyTorch model runs on the device of
`model_config={"device": ...}` at load (`auto`, the default: the GPU when there is one,
whatever device it was trained on; `cpu`; `cuda`). Scoring goes through
`dualstpm.predict.score_images`, the path of `dualstpm predict`, so the numbers agree.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

INPUT_COLUMN = "image"
MAP_COLUMN = "anomaly_map"
REGIONS_COLUMN = "regions"
ONNX_ARTIFACT = "onnx"
PYFUNC_BACKENDS = ("torch", "onnxruntime")


class DualStpmPyfunc(PythonModel):
    """Loads the model directory logged under the artifact key `model`, on the device of
    `model_config["device"]` (default `auto`); the ONNX export runs only when a request asks
    for `backend: onnxruntime` (its session is opened then, once)."""

    onnx_dir: str | None = None  # the version's ONNX export (artifact `onnx`), if it carries one
    exported = None  # its ONNX Runtime session, once opened (a dualstpm.backends.ExportedModel)

    def load_context(self, context) -> None:
        from dualstpm.detector import Detector
        from dualstpm.rundir import MODEL_SUBDIR

        model_dir = Path(context.artifacts[MODEL_SUBDIR])
        if model_dir.name != MODEL_SUBDIR:  # Detector.load reads <run>/model/
            raise RuntimeError(f"logged model directory must be named {MODEL_SUBDIR!r}, got {model_dir}")
        self.detector = Detector.load(model_dir.parent, device=(context.model_config or {}).get("device", "auto"))
        self.onnx_dir = context.artifacts.get(ONNX_ARTIFACT)

    def scorer(self, backend: str):
        """The scorer of `backend`; the ONNX Runtime session is opened on first use."""
        from dualstpm.backends import ExportedModel
        from dualstpm.errors import ExportError

        if backend not in PYFUNC_BACKENDS:
            raise ExportError(f"backend {backend!r} is not served; choose one of {', '.join(PYFUNC_BACKENDS)}")
        if backend == "torch":
            return self.detector
        if self.exported is None:
            if self.onnx_dir is None:
                raise ExportError("this model version carries no ONNX export: register it again to add one")
            self.exported = ExportedModel(Path(self.onnx_dir), backend)
        return self.exported

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        from dualstpm.errors import DataError
        from dualstpm.files import json_ready, json_ready_table
        from dualstpm.predict import region_records, score_images

        params = params or {}
        try:
            originals = _decode_images(model_input, self.detector.params.data.max_image_pixels)
        except DataError as exc:  # the caller's input: HTTP 400 with this message, not a stack trace
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        scorer = self.scorer(params.get("backend") or "torch")
        results = score_images(scorer, originals, params.get("threshold"))
        table = json_ready_table(pd.DataFrame([r.row() for r in results]))
        if params.get("return_map"):
            table[MAP_COLUMN] = [json_ready(r.anomaly_map) for r in results]
        if params.get("return_regions"):
            spec = scorer.regions
            table[REGIONS_COLUMN] = [None if r.regions is None else json_ready(region_records(r.regions, spec))
                                     for r in results]
        return table


SEND_IMAGES = (f"Send in column {INPUT_COLUMN!r} one encoded image file per row (the bytes of a PNG, JPEG, BMP "
               "or TIFF file; in a JSON request to `mlflow models serve`, the base64 text of those bytes, e.g. "
               "`base64 -w0 part.png`).")


def _cell_name(row: int, label: object) -> str:
    """`column 'image', row R` (0-based), with the request's index label when it is not R."""
    return f"column {INPUT_COLUMN!r}, row {row}" + ("" if label == row else f" (index {label!r})")


def _decode_images(model_input: pd.DataFrame, max_pixels: int) -> list:
    """The images of column `image` as (H, W, 3) float arrays. Raises DataError naming the
    column, or the row (0-based; and its index label) that is not an encoded image file or
    holds more than `max_pixels`, and saying what to send (`SEND_IMAGES`)."""
    from dualstpm.data.images import read_image_bytes
    from dualstpm.errors import DataError

    if INPUT_COLUMN not in model_input.columns:
        raise DataError(f"expected a column {INPUT_COLUMN!r} of encoded images, got columns "
                        f"{list(model_input.columns)}. {SEND_IMAGES}")
    originals = []
    for row, (label, data) in enumerate(model_input[INPUT_COLUMN].items()):
        if not isinstance(data, bytes | bytearray):
            raise DataError(f"{_cell_name(row, label)}: expected an encoded image file's bytes, got "
                            f"{type(data).__name__}. {SEND_IMAGES}")
        originals.append(read_image_bytes(bytes(data), f"in {_cell_name(row, label)}", max_pixels, SEND_IMAGES))
    return originals


mlflow.models.set_model(DualStpmPyfunc())
