"""Registration: a version per tested training, with the evidence promotion needs.

One registered model per dataset and category, `dualstpm-<dataset>-<category>`
(`dualstpm.mlops.names`). Every registered training becomes a new version with the
alias `challenger`; its version tags carry what promotion needs (the test metrics of the
view the model decides with, the hash of the evaluation data, the git commit, the run).
Promotion to `champion` is `dualstpm.mlops.promote`'s.

The model is logged as an MLflow pyfunc *from code* (`mlflow_model.py`) through the
client of the store alone (`_log_model`): no MLflow global tracking URI or active run is
set, so registrations in parallel threads (a Prefect flow's tasks) cannot mix stores.

Failure rules: a version is created marked `dualstpm.registration=incomplete` and marked
`complete` only after its alias is set, so an interrupted registration leaves a version
that says so; `promote` refuses it and the next registration of the run deletes it (a
registration that fails with the store still answering deletes it at once).
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

import dualstpm
from dualstpm.backends import run_export_dir
from dualstpm.config import Params
from dualstpm.data import list_images, read_image, resize_image
from dualstpm.detector import read_chosen_fusion, read_model_dir
from dualstpm.errors import RunError, TrackingError
from dualstpm.fit_check import fit_check_tags
from dualstpm.mlops.lineage import MODEL_HASH_TAG, adopt_run, check_tested, model_run, run_store
from dualstpm.mlops.lock import LOCK_STALE_S
from dualstpm.mlops.names import (
    CHALLENGER,
    CHAMPION,
    COMPLETE,
    INCOMPLETE,
    PROMOTION_METRICS,
    REGISTRATION_TAG,
    model_name,
)
from dualstpm.mlops.runs import RunRecord
from dualstpm.mlops.tracking import TAG, Store, connect, dataset_name, sqlite_path, tracking_errors
from dualstpm.rundir import ABLATION_DIR, METRICS_FILE, MODEL_SUBDIR, OVERLAY_GRID, PLOTS_DIR, RUN_RECORD, SUMMARY_FILE
from dualstpm.sizes import ImageSize, hw

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# What the logged model needs at inference, pinned to this environment (no 23 s inference).
RUNTIME_PACKAGES = ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "pillow", "pandas",
                    "pyyaml", "pydantic", "scipy", "scikit-learn", "matplotlib", "rich", "onnxruntime")


def _pinned_requirements() -> list[str]:
    pins = []
    for package in RUNTIME_PACKAGES:
        version = importlib.metadata.version(package).split("+")[0]  # drop local labels such as +cu128
        pins.append(f"{package}=={version}")
    return pins


def _signature(threshold: float):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    from dualstpm.mlops.mlflow_model import INPUT_COLUMN

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, INPUT_COLUMN)]),
        outputs=Schema([
            ColSpec(DataType.double, "score"),
            ColSpec(DataType.double, "normalized_score"),
            ColSpec(DataType.string, "label"),
            ColSpec(DataType.double, "threshold"),
            ColSpec(DataType.double, "stpm_score"),
            ColSpec(DataType.double, "recon_score"),
            ColSpec(DataType.double, "disc_score"),
        ]),
        params=ParamSchema([
            ParamSpec("return_map", DataType.boolean, False),
            ParamSpec("threshold", DataType.double, float(threshold)),
            ParamSpec("backend", DataType.string, "torch"),
            ParamSpec("return_regions", DataType.boolean, False),  # defect regions per image (docs/regions.md)
        ]),
    )


def _example_image(record: RunRecord, category: str, size: ImageSize, max_pixels: int) -> tuple[bytes, str]:
    """A test image of the evaluation data at the model's input size, PNG-encoded: a real
    input example that stays small. Without the data, a gray image (and the tag says so)."""
    from PIL import Image

    root = Path(record.eval_data_root or "") / category / "test"
    found = list_images(root, recursive=True)
    if found:
        pixels, origin = resize_image(read_image(found[0], max_pixels), size).permute(1, 2, 0).numpy(), str(found[0])
    else:
        pixels, origin = np.full((*hw(size), 3), 0.5, dtype=np.float32), f"gray image ({root} not found)"
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue(), origin


def _package_copy(into: Path) -> str:
    """The dualstpm package without caches, bundled so the model loads where it is not installed."""
    target = into / "dualstpm"
    shutil.copytree(Path(dualstpm.__file__).parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return str(target)


def _version_tags(record: RunRecord, fused: dict, n_images: int, category: str, run_dir: Path) -> dict[str, str]:
    tags = {
        f"{TAG}category": category,
        f"{TAG}dataset": dataset_name(record.eval_data_root),
        f"{TAG}data_hash": record.eval_data_hash or "",
        f"{TAG}run_dir": str(Path(run_dir).resolve()),
        f"{TAG}n_test_images": str(n_images),
    }
    for metric in PROMOTION_METRICS:
        tags[f"metric.{metric}"] = "null" if fused.get(metric) is None else repr(float(fused[metric]))
    return tags


def _link_step_metrics(client, model_id: str, run_id: str, step: int = 0) -> None:
    """Record the run's metrics of `step` for the logged model `model_id` too, as
    `mlflow.pyfunc.log_model` does for the model of an active run (its page shows them)."""
    from mlflow.entities import Metric

    linked = [Metric(key=m.key, value=m.value, timestamp=m.timestamp, step=m.step, dataset_name=m.dataset_name,
                     dataset_digest=m.dataset_digest, run_id=m.run_id, model_id=model_id)
              for key in client.get_run(run_id).data.metrics
              for m in client.get_metric_history(run_id, key) if m.step == step and m.model_id is None]
    client.log_batch(run_id=run_id, metrics=linked)


def _log_model(client, run, run_dir: Path, threshold: float, example: bytes):
    """Log the model of `run_dir` as the pyfunc `model` of the MLflow `run`, through `client`
    alone, as `mlflow.pyfunc.log_model` would into that run made active (a LoggedModel
    with the run's params and MLflow's context tags, an output of the run, the run's
    step-0 metrics) but without MLflow's global tracking URI or active run. The model is
    saved from code (`mlflow_model.py`; the model directory and its ONNX export as
    artifacts, a copy of the package, the signature, the input example `example`, pinned
    requirements) in a temporary folder, then uploaded. Returns the LoggedModel, READY;
    FAILED in the store when anything fails (raised)."""
    import mlflow
    import pandas as pd
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model
    from mlflow.tracking.context.registry import resolve_tags

    from dualstpm.mlops.mlflow_model import INPUT_COLUMN, ONNX_ARTIFACT

    run_id = run.info.run_id
    logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id,
                                        tags=resolve_tags(), params=dict(run.data.params))
    try:
        client.log_outputs(run_id, models=[LoggedModelOutput(logged.model_id, step=0)])
        _link_step_metrics(client, logged.model_id, run_id)
        with tempfile.TemporaryDirectory(prefix="dualstpm-model-") as folder:
            saved = Path(folder) / "model"
            mlflow.pyfunc.save_model(
                path=str(saved),
                python_model=str(MODEL_CODE),
                artifacts={MODEL_SUBDIR: str(run_dir / MODEL_SUBDIR), ONNX_ARTIFACT: str(run_export_dir(run_dir, "onnx"))},
                code_paths=[_package_copy(Path(folder) / "code")],
                signature=_signature(threshold),
                input_example=pd.DataFrame({INPUT_COLUMN: [example]}),
                pip_requirements=_pinned_requirements(),
                mlflow_model=Model(artifact_path=logged.artifact_location, model_uuid=logged.model_id, run_id=run_id,
                                   model_id=logged.model_id),
            )
            for cache in list(saved.rglob("__pycache__")):  # left by loading the model's code while saving it
                shutil.rmtree(cache, ignore_errors=True)
            client.log_model_artifacts(logged.model_id, str(saved))
    except Exception:
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)


def _new_version(client, name: str, logged, run_id: str, tags: dict[str, str]):
    """A new version of the registered model `name` (created if need be) holding the
    LoggedModel `logged`, with `tags`, and named in the LoggedModel's `mlflow.modelVersions`
    tag, as `mlflow.register_model` does. Its source is `models:/<model id>` on a server, as
    `mlflow.register_model` makes it; in an SQLite store the model's artifact location
    (where a `models:/` source leads anyway), since MLflow's SQL registry looks a
    `models:/` source up through the process's global tracking URI."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    source = logged.artifact_location if sqlite_path(client.tracking_uri) else f"models:/{logged.model_id}"
    version = client.create_model_version(name, source, run_id=run_id, tags=tags, model_id=logged.model_id)
    linked = json.loads(logged.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    client.set_logged_model_tags(logged.model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
        [*linked, {"name": version.name, "version": version.version}])})
    return version


def register_run(run_dir: Path, params: Params, category: str, *, store: Store):
    """Log the tested model of `run_dir` as a pyfunc (from code) in its MLflow run, register
    it as a new version of `dualstpm-<dataset>-<category>` and point `challenger` at it.

    Needs `dualstpm fit` and `dualstpm test` done: the run that trained the model files
    (`lineage.model_run`: the one `RUN/mlflow_run.json` names, or, for a model DVC restored
    from its cache, the one `RUN/model/lineage.json` names, whose logged test must then be
    `RUN/metrics.json`: `lineage.check_tested`) with its test logged. The store is the
    run's own unless `store` was named by the user (`lineage.run_store`); a store that
    does not exist is refused, never created. The version carries `dualstpm.registration =
    incomplete` from its creation until its alias is set: an interrupted registration
    leaves it visibly marked, and the next registration of the same run deletes it.
    Returns the MLflow `ModelVersion`.
    """
    run_dir = Path(run_dir)
    model_dir, model_params, calibration = read_model_dir(run_dir)  # checks the model directory is complete
    client = connect(run_store(store, run_dir), create=False)
    record, adopted = model_run(client, run_dir, category)
    if record is None or not record.eval_data_hash:
        on_disk = RunRecord.read(run_dir)
        elsewhere = (f" (its runs are in {on_disk.tracking_uri}, {run_dir / RUN_RECORD}: leave MLFLOW_TRACKING_URI "
                     "and tracking.uri unset to register there)"
                     if on_disk is not None and on_disk.tracking_uri != client.tracking_uri else "")
        raise RunError(
            f"{run_dir} has no tested MLflow run in {client.tracking_uri}{elsewhere}: run "
            f"`dualstpm test --run {run_dir} --data-root DIR` with this store first "
            "(it logs the metrics and the evaluation data's hash that promotion compares)"
        )
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise RunError(f"{metrics_path} is missing: run `dualstpm test --run {run_dir} --data-root DIR` before registering")
    if adopted:  # a model DVC restored: metrics.json must be its own test's
        check_tested(client, record, run_dir)
    result = json.loads(metrics_path.read_text())
    if result.get("category") != category:
        raise RunError(f"{metrics_path} is a test on {result.get('category')!r}, not {category!r}: register it "
                       f"as --category {result.get('category')}, or test it on {category} first")
    chosen = read_chosen_fusion(model_dir)
    view = model_params.fusion.view  # the view the model decides with
    if view == "fused":
        threshold = chosen.threshold if chosen else calibration.thresholds["fused"]  # the decision view, as Detector uses it
        evidence, evidence_source = _decision_evidence(run_dir, result, threshold, chosen)
    else:
        threshold = calibration.thresholds[view]
        evidence, evidence_source = _view_evidence(run_dir, result, view, threshold)
    if adopted:  # every check passed: the record names the run that trained these files from now on
        adopt_run(record, run_dir)
    uri = client.tracking_uri
    with tracking_errors(uri, f"reading run {record.run_id}"):
        run = client.get_run(record.run_id)
    trained_by = run.data.tags
    name = model_name(record.eval_data_root, category)  # named after the data it was tested on
    example, example_origin = _example_image(record, category, model_params.frame_size, params.data.max_image_pixels)
    tags = {
        **_version_tags(record, evidence, result["n_test_images"], category, run_dir),
        f"{TAG}git_commit": trained_by.get(f"{TAG}git_commit", "unknown"),
        f"{TAG}metrics_source": evidence_source,
        f"{TAG}input_example": example_origin,
        MODEL_HASH_TAG: trained_by[MODEL_HASH_TAG],
        REGISTRATION_TAG: INCOMPLETE,
        **fit_check_tags(calibration.fit_check, TAG),  # a poor fit is never registered silently
    }
    with tracking_errors(uri, f"logging the model of {run_dir}"):
        logged = _log_model(client, run, run_dir, threshold, example)
    with tracking_errors(uri, f"registering {name}"):
        _drop_incomplete(client, name, record.run_id)
        version = _new_version(client, name, logged, record.run_id, tags)  # created with its tags, marked incomplete
    try:
        with tracking_errors(uri, f"describing {name} version {version.version}"):
            for key, value in {f"{TAG}category": category, f"{TAG}dataset": tags[f"{TAG}dataset"],
                               f"{TAG}data_root": record.eval_data_root}.items():
                client.set_registered_model_tag(name, key, value)  # how `registered_name` finds it
            client.update_registered_model(name, description=model_description(name, record.eval_data_root, category))
            client.update_model_version(name, version.version, description=version_description(
                name, version.version, evidence, result["n_test_images"], record, category, run_dir))
        with tracking_errors(uri, f"setting alias {CHALLENGER} of {name}"):
            client.set_registered_model_alias(name, CHALLENGER, version.version)
            client.set_model_version_tag(name, version.version, REGISTRATION_TAG, COMPLETE)  # last
    except TrackingError:
        _drop_version(client, name, version.version)
        raise
    return client.get_model_version(name, version.version)


def model_description(name: str, data_root: Path | str, category: str) -> str:
    """The registered model's description (Markdown): what it detects, on which data, how to load it."""
    return (
        f"Finds defective **{category}** parts ({dataset_name(data_root)} data) and where the defect is: "
        "a dual student-teacher anomaly detector (dualstpm) trained on good parts only. Per image it "
        "answers `score`, `label` (`defective` above the calibrated `threshold`, else `good`), "
        "`threshold`, `stpm_score`, `recon_score`, `disc_score` (null without the discriminative stage), "
        "and with `params={\"return_map\": true}` the "
        "anomaly map at the image's size.\n\n"
        f"`@{CHAMPION}` is the version in use (moved only on evidence: each version's `promotion.*` tags), "
        f"`@{CHALLENGER}` the latest registered. Each version's description names its data, test "
        "figures and run.\n\n"
        "```python\nimport mlflow, pandas as pd\n"
        f"model = mlflow.pyfunc.load_model(\"models:/{name}@{CHAMPION}\")\n"
        "model.predict(pd.DataFrame({\"image\": [open(\"part.png\", \"rb\").read()]}))\n```\n\n"
        f"Serve: `mlflow models serve -m \"models:/{name}@{CHAMPION}\" --env-manager local -p 5001`, then "
        "POST `{\"dataframe_split\": {\"columns\": [\"image\"], \"data\": [[\"<base64 PNG or JPEG>\"]]}}` "
        "to `/invocations`."
    )


def version_description(name: str, version: str, fused: dict, n_images: int, record: RunRecord, category: str,
                        run_dir: Path) -> str:
    """A version's description (Markdown): its test figures, the data they were measured on,
    where its figures are, and how to load this very version."""
    shown = ", ".join(f"{m} {fused[m]:.4f}" for m in PROMOTION_METRICS if fused.get(m) is not None)
    overlays = f"{ABLATION_DIR}/{OVERLAY_GRID}" if (Path(run_dir) / ABLATION_DIR / OVERLAY_GRID).is_file() \
        else f"{PLOTS_DIR}/{OVERLAY_GRID}"
    curves = [f"`{PLOTS_DIR}/{n}`" for n in ("roc.png", "pro.png") if (Path(run_dir) / PLOTS_DIR / n).is_file()]
    return (
        f"{category}: {shown} on {n_images} test images of `{record.eval_data_root}` "
        f"(data hash `{record.eval_data_hash}`).\n\n"
        f"Figures in run `{record.run_id}`: {', '.join([*curves, ''])}the overlays in the "
        f"model's decision view, `{overlays}`.\n\n"
        f"Load this version: `mlflow.pyfunc.load_model(\"models:/{name}/{version}\")`."
    )


def _decision_evidence(run_dir: Path, result: dict, threshold: float, chosen) -> tuple[dict, str]:
    """The test metrics of the view the registered model decides with (`Detector.decision_view`:
    the applied choice, a fusion or a memory view, else `fused` = params.fusion), and where they come from.

    `metrics.json`'s row of that view when its test measured it at the model's current
    threshold (and, for `chosen`, the same configuration); a choice applied after the test,
    the chosen fusion's test figures from `ablation/summary.json` (re-scored from the
    test's stored maps). Anything else would promote a model on another model's evidence,
    so it is refused.
    """
    name = chosen.source.get("config") if chosen is not None else None
    view = chosen.view if chosen is not None else "fused"  # `chosen` for a fusion, or the memory view chosen
    measured = result.get(view) or {}
    if measured.get("threshold") == threshold and (chosen is None or result.get("chosen_fusion") == name):
        return measured, METRICS_FILE if chosen is None else f"{METRICS_FILE}: chosen fusion {name}"
    summary_path = run_dir / ABLATION_DIR / SUMMARY_FILE
    if chosen is not None and summary_path.is_file():
        picked = json.loads(summary_path.read_text()).get("fused_chosen") or {}
        if picked.get("config") == name:
            return picked, f"{ABLATION_DIR}/{SUMMARY_FILE}: chosen fusion {picked['config']}"
    raise RunError(
        f"{run_dir / METRICS_FILE} was measured with another {view} view than the model now decides with "
        f"(threshold {measured.get('threshold')} vs {threshold}): run "
        f"`dualstpm test --run {run_dir} --data-root DIR` again before registering"
    )


def _view_evidence(run_dir: Path, result: dict, view: str, threshold: float) -> tuple[dict, str]:
    """The test metrics of a model deciding with another view than `fused` (`fusion.view`):
    its row of `metrics.json`, when that test named it `default` at the same threshold."""
    row = result.get(view) or {}
    if result.get("default") == view and row.get("threshold") == threshold:
        return row, f"{METRICS_FILE} ({view} view)"
    raise RunError(
        f"{run_dir / METRICS_FILE} was not measured with the model's decision view {view!r} at its threshold "
        f"{threshold}: run `dualstpm test --run {run_dir} --data-root DIR` again before registering"
    )


def _drop_incomplete(client, name: str, run_id: str) -> None:
    """Delete the versions of `name` an interrupted registration left marked incomplete: those
    of the same MLflow run (an earlier attempt of this registration) and any older than
    LOCK_STALE_S (nothing registers for that long). Other versions are never touched."""
    now_ms = time.time() * 1000
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.tags.get(REGISTRATION_TAG) != INCOMPLETE:
            continue
        if version.run_id == run_id or now_ms - version.creation_timestamp > LOCK_STALE_S * 1000:
            client.delete_model_version(name, str(version.version))


def _drop_version(client, name: str, version: str) -> None:
    """Best effort: a version whose registration failed half way must not linger (no alias was set)."""
    try:
        client.delete_model_version(name, version)
    except Exception:  # the store is what failed; the missing alias keeps the version out of use
        pass
