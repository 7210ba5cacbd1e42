"""The model registry: a version per training, promotion to `champion` by evidence.

One registered model per dataset and category, `dualstpm-<dataset>-<category>`. Every
registered training becomes a new version with the alias `challenger`; its version tags
carry what promotion needs (the test metrics of the view the model decides with, the
hash of the evaluation data, the git commit, the run). `promote` moves `champion` only when the challenger beats the
champion on the same evaluation data by a margin, or, for the first champion, when it
reaches `tracking.promotion_floor`; every decision, either way, is written to the
challenger's tags (who, when, values, data hash, reason).

Failure rules: a version is created marked `dualstpm.registration=incomplete` and marked
`complete` only after its alias is set, so an interrupted registration leaves a version
that says so; `promote` refuses it and the next registration of the run deletes it (a
registration that fails with the store still answering deletes it at once). A promotion
moves the alias before it tags the decision. Promotions of one model are serialised by a
lock in the registry itself (creating a registered model is atomic in every MLflow store,
and so is taking over a stale lock), so two racing promotions end as if they had run one
after the other: the better model is champion. The dataset of a name is the data root
folder the model was tested on (`tracking.dataset_name`).
"""

from __future__ import annotations

import getpass
import importlib.metadata
import io
import json
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import dualstpm
from dualstpm.ablation import ABLATION_DIR, SUMMARY_FILE
from dualstpm.backends import run_export_dir
from dualstpm.config import Params
from dualstpm.data import list_images, read_image, resize_image
from dualstpm.detector import CHOSEN_VIEW, MODEL_SUBDIR, read_chosen_fusion, read_model_dir
from dualstpm.errors import ConfigError, RunError, TrackingError
from dualstpm.evaluation import METRICS_FILE
from dualstpm.figures import OVERLAY_GRID, PLOTS_DIR
from dualstpm.files import json_text
from dualstpm.lineage import MODEL_HASH_TAG, adopt_run, check_tested, model_run, run_store
from dualstpm.tracking import RUN_RECORD, STORE_ANSWERED, TAG, RunRecord, connect, dataset_name, tracking_errors

CHALLENGER = "challenger"
CHAMPION = "champion"
PROMOTION_METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
LOCK_SUFFIX = ".promotion-lock"
LOCK_WAIT_S = 120.0
LOCK_STALE_S = 600.0  # a lock older than this was left by a crashed promotion
REGISTRATION_TAG = "dualstpm.registration"  # `incomplete` from a version's creation until its alias is set
INCOMPLETE, COMPLETE = "incomplete", "complete"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
# What the logged model needs at inference, pinned to this environment (no 23 s inference).
RUNTIME_PACKAGES = ("mlflow", "torch", "torchvision", "timm", "safetensors", "numpy", "pillow", "pandas",
                    "pyyaml", "pydantic", "scipy", "scikit-learn", "matplotlib", "rich", "onnxruntime")


def model_name(data_root: Path | str, category: str) -> str:
    """`dualstpm-<dataset>-<category>`: the registered model of `category` in `data_root`
    (the dataset is the data root folder's own name, `tracking.dataset_name`)."""
    return f"dualstpm-{dataset_name(data_root)}-{category}"


def registered_name(client, category: str, data_root: Path | str | None = None) -> str:
    """The registered model of `category`: of the data in `data_root` when given, else the
    one `register` made for `category` (registered models carry `dualstpm.category`).

    Raises RunError when there is none, or when several datasets have one (naming them:
    `--data-root` chooses)."""
    if data_root is not None:
        return model_name(data_root, category)
    with tracking_errors(client.tracking_uri, f"looking up the registered models of {category}"):
        found = client.search_registered_models(filter_string=f"tags.`{TAG}category` = '{category}'")
    if len(found) == 1:
        return found[0].name
    if not found:
        raise RunError(f"no registered model of category {category!r} in {client.tracking_uri}: register one with "
                       f"`dualstpm register --run RUN`, or name its data with --data-root DIR")
    roots = ", ".join(f"{m.name} ({m.tags.get(f'{TAG}data_root', '?')})" for m in found)
    raise RunError(f"category {category!r} has registered models for several datasets: {roots}; "
                   "choose one with --data-root DIR (the data it was tested on)")


def _pinned_requirements() -> list[str]:
    pins = []
    for package in RUNTIME_PACKAGES:
        version = importlib.metadata.version(package).split("+")[0]  # drop local labels such as +cu128
        pins.append(f"{package}=={version}")
    return pins


def _signature(threshold: float):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema

    from dualstpm.mlflow_model import INPUT_COLUMN

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


def _example_image(record: RunRecord, category: str, size: int, max_pixels: int) -> tuple[bytes, str]:
    """A test image of the evaluation data at the model's input size, PNG-encoded: a real
    input example that stays small. Without the data, a gray image (and the tag says so)."""
    from PIL import Image

    root = Path(record.eval_data_root or "") / category / "test"
    found = list_images(root, recursive=True)
    if found:
        pixels, origin = resize_image(read_image(found[0], max_pixels), size).permute(1, 2, 0).numpy(), str(found[0])
    else:
        pixels, origin = np.full((size, size, 3), 0.5, dtype=np.float32), f"gray image ({root} not found)"
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


def register_run(run_dir: Path, params: Params, category: str):
    """Log the tested model of `run_dir` as a pyfunc (from code) in its MLflow run, register
    it as a new version of `dualstpm-<dataset>-<category>` and point `challenger` at it.

    Needs `dualstpm fit` and `dualstpm test` done: the run that trained the model files
    (`lineage.model_run`: the one `RUN/mlflow_run.json` names, or, for a model DVC restored
    from its cache, the one `RUN/model/lineage.json` names, whose logged test must then be
    `RUN/metrics.json`: `lineage.check_tested`) with its test logged. The store is the
    run's own unless one is named (`lineage.run_store`); a store that does not exist is refused,
    never created. The version carries `dualstpm.registration =
    incomplete` from its creation until its alias is set: an interrupted registration
    leaves it visibly marked, and the next registration of the same run deletes it.
    Returns the MLflow `ModelVersion`.
    """
    import mlflow

    run_dir = Path(run_dir)
    model_dir, model_params, calibration = read_model_dir(run_dir)  # checks the model directory is complete
    params = run_store(params, run_dir)
    client = connect(params, create=False)
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
        evidence, evidence_source = _view_evidence(run_dir, result, view, calibration.thresholds[view])
    if adopted:  # every check passed: the record names the run that trained these files from now on
        adopt_run(record, run_dir)
    uri = client.tracking_uri
    with tracking_errors(uri, f"reading run {record.run_id}"):
        trained_by = client.get_run(record.run_id).data.tags
    name = model_name(record.eval_data_root, category)  # named after the data it was tested on
    example, example_origin = _example_image(record, category, model_params.image_size, params.data.max_image_pixels)
    tags = {
        **_version_tags(record, evidence, result["n_test_images"], category, run_dir),
        f"{TAG}git_commit": trained_by.get(f"{TAG}git_commit", "unknown"),
        f"{TAG}metrics_source": evidence_source,
        f"{TAG}input_example": example_origin,
        MODEL_HASH_TAG: trained_by[MODEL_HASH_TAG],
        REGISTRATION_TAG: INCOMPLETE,
    }
    from dualstpm.mlflow_model import ONNX_ARTIFACT

    with tempfile.TemporaryDirectory(prefix="dualstpm-code-") as code_dir:
        with tracking_errors(uri, f"logging the model of {run_dir}"), mlflow.start_run(run_id=record.run_id):
            import pandas as pd

            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={MODEL_SUBDIR: str(run_dir / MODEL_SUBDIR), ONNX_ARTIFACT: str(run_export_dir(run_dir, "onnx"))},
                code_paths=[_package_copy(Path(code_dir))],
                signature=_signature(threshold),
                input_example=pd.DataFrame({"image": [example]}),
                pip_requirements=_pinned_requirements(),
            )
    with tracking_errors(uri, f"registering {name}"):
        _drop_incomplete(client, name, record.run_id)
        version = mlflow.register_model(info.model_uri, name, tags=tags)  # created with its tags, marked incomplete
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
    the applied chosen fusion, else `fused` = params.fusion), and where they come from.

    `metrics.json`'s row of that view when its test measured it at the model's current
    threshold (and, for `chosen`, the same configuration); a choice applied after the test,
    the chosen fusion's test figures from `ablation/summary.json` (re-scored from the
    test's stored maps). Anything else would promote a model on another model's evidence,
    so it is refused.
    """
    name = chosen.source.get("config") if chosen is not None else None
    view = CHOSEN_VIEW if chosen is not None else "fused"
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


# --------------------------------------------------------------------------- promotion


@dataclass
class PromotionDecision:
    """What `promote` decided, and why (the same facts are on the challenger's tags)."""

    promoted: bool
    reason: str
    model_name: str
    metric: str
    challenger_version: str
    challenger_value: float | None
    champion_version: str | None  # the champion after the decision
    previous_champion_version: str | None
    champion_value: float | None  # the previous champion's value on the metric
    data_hash: str
    decided_by: str
    decided_at: str

    def facts(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if k != "model_name"}


HISTORY_TAG = "promotion.history"
HISTORY_LENGTH = 20


def _record(client, challenger, decision: PromotionDecision) -> None:
    """Tag the decision on the challenger: `promotion.<fact>` for the latest one (unless it
    is a no-op on the current champion, which must keep the facts of its promotion) and
    every decision in `promotion.history` (JSON, newest last)."""
    name, version = decision.model_name, challenger.version
    history = json.loads(challenger.tags.get(HISTORY_TAG) or "[]")[-(HISTORY_LENGTH - 1) :]
    client.set_model_version_tag(name, version, HISTORY_TAG, json_text([*history, decision.facts()], indent=None))
    if decision.previous_champion_version == str(version):
        return
    for key, value in decision.facts().items():
        client.set_model_version_tag(name, version, f"promotion.{key}", "" if value is None else str(value))


def _metric_value(version, metric: str) -> float | None:
    raw = version.tags.get(f"metric.{metric}")
    return None if raw in (None, "", "null") else float(raw)


_MISSING = frozenset({"RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"})  # MLflow's "no such thing" error codes


def _unless_missing(call, *args, missing: frozenset[str] = _MISSING):
    """`call(*args)` against the registry, or None when the store answers with an error code
    in `missing` (it does not exist); any other error is raised."""
    from mlflow.exceptions import MlflowException

    try:
        return call(*args)
    except MlflowException as exc:
        if exc.error_code in missing:
            return None
        raise


def _alias(client, name: str, alias: str):
    """The version `alias` points at, or None (no such model or alias)."""
    return _unless_missing(client.get_model_version_by_alias, name, alias,
                           missing=_MISSING | {"INVALID_PARAMETER_VALUE"})


def _try_create(client, model: str, holder: str, token: str, description: str) -> bool:
    """Create the registered model `model` (atomic in every MLflow store): True if we did,
    False if it exists already."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model, tags={"holder": holder, "token": token}, description=description)
        return True
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False


def _get(client, model: str):
    """The registered model `model`, or None when it does not exist."""
    return _unless_missing(client.get_registered_model, model)


def _takeover(lock: str, token: str) -> str:
    """The registered model whose creation takes over the hold of `token` on `lock`."""
    return f"{lock}.takeover-{token}"


def _token(held) -> str:
    """The token of a lock or takeover model (a lock made before tokens: its creation time)."""
    return held.tags.get("token") or f"created-{held.creation_timestamp}"


def _current_holder(client, lock: str):
    """The registered model that holds `lock` now: the lock itself, or the last takeover of
    it (each takeover is named after the token of the holder it replaced); None when free."""
    held = _get(client, lock)
    while held is not None:
        taken = _get(client, _takeover(lock, _token(held)))
        if taken is None:
            return held
        held = taken
    return None


def _version(client, name: str, version: str | int, category: str):
    """Version `version` of `name`; RunError naming the versions there are when it does not exist."""
    found = _unless_missing(client.get_model_version, name, str(version), missing=STORE_ANSWERED)
    if found is not None:
        return found
    existing = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    if not existing:
        raise RunError(f"there is no registered model {name}, so no version {version}: register one with "
                       f"`dualstpm register --run RUN --category {category}`")
    raise RunError(f"{name} has no version {version}; its versions are {', '.join(map(str, existing))}. "
                   f"Pass one of them to --version, or leave --version out to judge @{CHALLENGER}.")


@contextmanager
def promotion_lock(client, name: str, holder: str) -> Iterator[None]:
    """Mutual exclusion across processes and machines: a registered model `<name>.promotion-lock`
    exists while a promotion of `name` runs (creation fails for everyone else).

    A holder older than LOCK_STALE_S crashed. Taking its lock over is a compare-and-set in
    the store: creating `<lock>.takeover-<its token>`, which only one contender can do; the
    winner holds the lock (the lock model stays) until it deletes the lock. Takeover models
    are never deleted (their names are unique), so a late contender cannot win one twice.
    """
    lock = name + LOCK_SUFFIX
    token = uuid.uuid4().hex
    note = f"held while {holder} promotes {name}; delete {lock} only if no promotion is running"
    deadline = time.monotonic() + LOCK_WAIT_S
    while not _try_create(client, lock, holder, token, note):
        held = _current_holder(client, lock)
        if held is None:
            continue  # released meanwhile: try again at once
        if time.time() - held.creation_timestamp / 1000 > LOCK_STALE_S:
            if _try_create(client, _takeover(lock, _token(held)), holder, token, note):
                break
            continue  # another contender won this takeover: look again
        if time.monotonic() > deadline:
            raise TrackingError(
                f"another promotion of {name} holds the lock {lock} ({held.tags.get('holder', '?')}); "
                f"if none is running, delete the registered model {lock} and try again"
            )
        time.sleep(0.1 + 0.2 * np.random.random())
    try:
        yield
    finally:
        _release(client, lock, token)


def _release(client, lock: str, token: str) -> None:
    """Delete `lock` unless our hold was taken over meanwhile (then the taker deletes it)."""
    from mlflow.exceptions import MlflowException

    try:
        if _get(client, _takeover(lock, token)) is None:
            client.delete_registered_model(lock)
    except MlflowException:
        pass  # becomes stale and is taken over after LOCK_STALE_S


def _decide(challenger, champion, metric: str, min_delta: float, floor: float) -> tuple[bool, str]:
    """The promotion rule, on the two versions' tags."""
    value = _metric_value(challenger, metric)
    if value is None:
        return False, f"the challenger has no {metric} (null for this data); choose another --metric"
    if champion is None:
        if value >= floor:
            return True, f"first champion: {metric} {value:.4f} >= floor {floor:.4f}"
        return False, f"{metric} {value:.4f} is below the floor {floor:.4f} (tracking.promotion_floor) for a first champion"
    if str(champion.version) == str(challenger.version):  # int from SQLite, str from a server
        return False, f"version {challenger.version} is already the champion"
    ours, theirs = challenger.tags.get(f"{TAG}data_hash"), champion.tags.get(f"{TAG}data_hash")
    if not ours or ours != theirs:
        return False, (
            f"not comparable: the challenger was evaluated on data {ours or '?'}, the champion "
            f"(version {champion.version}) on {theirs or '?'}; test both on the same data"
        )
    best = _metric_value(champion, metric)
    if best is None:
        return False, f"the champion (version {champion.version}) has no {metric}; choose another --metric"
    if value > best + min_delta:
        return True, f"{metric} {value:.4f} beats the champion's {best:.4f} (version {champion.version}) by more than {min_delta:g}"
    return False, f"{metric} {value:.4f} does not beat the champion's {best:.4f} (version {champion.version}) by more than {min_delta:g}"


def promote(category: str, params: Params, metric: str = "image_auroc", min_delta: float = 0.0,
            *, version: str | int | None = None, decided_by: str = "dualstpm.registry.promote",
            data_root: Path | str | None = None) -> PromotionDecision:
    """Move `champion` to the challenger (or `version`) only if it beats the champion on the
    same evaluation data by more than `min_delta` on `metric` of the view each version decides
    with (`fused`, or an applied `chosen` fusion: its version tags); the first champion
    must reach `tracking.promotion_floor`. The decision is tagged on the challenger either way.

    The registered model is that of `category` in `data_root`, or without it the one
    `register` made for `category` (`registered_name`). A version whose registration did
    not complete is refused (RunError). The alias moves before the decision is tagged, so
    a crash in between never leaves a version tagged promoted that is not champion."""
    if metric not in PROMOTION_METRICS:
        raise ConfigError(f"--metric {metric!r} is not a promotion metric; choose one of {', '.join(PROMOTION_METRICS)}")
    if min_delta < 0:
        raise ConfigError(f"--min-delta {min_delta} must be >= 0")
    client = connect(params, create=False)
    name = registered_name(client, category, data_root)
    who = f"{decided_by} ({getpass.getuser()}@{socket.gethostname()})"
    with tracking_errors(client.tracking_uri, f"promoting {name}"), promotion_lock(client, name, who):
        if version is None:
            challenger = _alias(client, name, CHALLENGER)
            if challenger is None:
                raise RunError(f"{name} has no '{CHALLENGER}' version: register one with `dualstpm register --run RUN --category {category}`")
        else:
            challenger = _version(client, name, version, category)
        if challenger.tags.get(REGISTRATION_TAG) == INCOMPLETE:
            raise RunError(
                f"{name} version {challenger.version} is marked {REGISTRATION_TAG}={INCOMPLETE}: its registration "
                f"was interrupted. Register the run again (`dualstpm register --run "
                f"{challenger.tags.get(f'{TAG}run_dir', 'RUN')}`), which deletes it, then promote"
            )
        champion = _alias(client, name, CHAMPION)
        promoted, reason = _decide(challenger, champion, metric, min_delta, params.tracking.promotion_floor)
        previous = None if champion is None else str(champion.version)
        decision = PromotionDecision(
            promoted=promoted,
            reason=reason,
            model_name=name,
            metric=metric,
            challenger_version=str(challenger.version),
            challenger_value=_metric_value(challenger, metric),
            champion_version=str(challenger.version) if promoted else previous,
            previous_champion_version=previous,
            champion_value=None if champion is None else _metric_value(champion, metric),
            data_hash=challenger.tags.get(f"{TAG}data_hash", ""),
            decided_by=who,
            decided_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        if promoted:  # the alias first: it is what serving reads, and a crash after it loses only tags
            client.set_registered_model_alias(name, CHAMPION, challenger.version)
        _record(client, challenger, decision)
        if promoted and previous is not None:
            client.set_model_version_tag(name, previous, "promotion.replaced_by", str(challenger.version))
    return decision
