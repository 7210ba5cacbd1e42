"""A trained detector on disk and in memory: the model directory and inference.

A model directory holds three files, none of them pickled:
`weights.safetensors` (all four networks), `params.yaml` (the resolved params) and
`calibration.json` (validation statistics, thresholds, selected epochs, and the image-score
reduction the thresholds are in: see `Calibration.score`), plus `discriminator.safetensors`
when the model has the discriminative stage (`fit.discriminator`), and `memory.safetensors`
when it has a memory bank (`memory.enabled`: the views `memory` and `fused_memory`). It is written
to a hidden sibling and swapped into place, so a crash never leaves half a model.
A fourth, `fusion.json`, is written by `dualstpm ablate`: when its choice (made on
validation data, adopted only on a bootstrap margin) is applied, the detector *decides*
with it (`decision_view`: predict, exports, overlays, promotion), at its recalibrated
threshold: a fusion of the six maps becomes the `chosen` view; a memory view (`memory` or
`fused_memory`, on a model with a memory bank) is decided with under its own name. The `fused` view is always `params.fusion` with
its trained threshold, so a test's `fused` figures never depend on whether `ablate` ran;
the branch views stay as trained. A new fit replaces the directory, so a stale choice
never survives.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dualstpm.compute import INFERENCE_PRECISION, Compute
from dualstpm.config import FusionParams, ModelParams, Params, ScoreParams, load_params, params_yaml
from dualstpm.errors import RunError
from dualstpm.files import write_json
from dualstpm.model.calibration import ScoreNormalization, false_alarm_bound, pixel_false_positive_bound
from dualstpm.model.discriminator import Discriminator
from dualstpm.model.fusion import MEMORY_VIEWS, VIEWS, FusionSpec, MapStats, ScoreSpec
from dualstpm.model.inference import (CHOSEN_VIEW, DualStpmInference, InferenceOutput, MapViews, RawMaps, ScoredBatch,
                                      raw_maps)
from dualstpm.model.memory import MemoryBank, MemoryStats
from dualstpm.model.regions import RegionSpec
from dualstpm.model.tiling import Tiling
from dualstpm.model.torch_model import DualStpmModel
from dualstpm.rundir import (
    CALIBRATION_FILE,
    DISC_WEIGHTS_FILE,
    FUSION_FILE,
    MEMORY_FILE,
    PARAMS_FILE,
    WEIGHTS_FILE,
    RunDir,
    read_json,
    read_optional_json,
    read_weights,
    trained_model_dir,
    weights_bytes,
    write_model_dir,
)
from dualstpm.sizes import ImageSize, from_json, pixel_count

FORMAT_VERSION = 2  # 2: branch B decoder with bottleneck widths


@dataclass
class Calibration:
    """What the validation split taught us, saved next to the weights.

    `score` is the image-score reduction the thresholds and score summaries are in: the
    detector scores with it, not with whatever `score.*` a later params file says, so a
    threshold is never compared with a score of other units.
    """

    image_size: ImageSize  # the input size the model was calibrated at: a side, or (height, width)
    map_stats: MapStats
    thresholds: dict[str, float]
    val_score_summary: dict[str, dict[str, float]]
    selected_epochs: dict[str, int]
    category: str
    false_alarm_rate: float
    score: ScoreSpec
    #: the precision the validation maps (statistics, thresholds, minimum) were computed in:
    #: `compute.INFERENCE_PRECISION`
    precision: str
    format_version: int = FORMAT_VERSION
    notes: list[str] = field(default_factory=list)
    # sizes of the validation parts that selected the epoch and calibrated (data.validation_parts)
    validation_split: dict = field(default_factory=dict)
    #: the discriminative stage's selection and cost (`DiscResult.summary`); None without it
    discriminator: dict | None = None
    #: what selected the epochs (`training.fit_evidence`): good images only, or real validation
    #: defects with their AUROC per view; None in files of an earlier dualstpm
    validation_evidence: dict | None = None
    #: how well the fitted model separates synthetic defects on the calibration images, and the
    #: warning when below `fit.min_val_auroc` (`fit_check.FitCheck.to_json`); None: fitted before the check
    fit_check: dict | None = None
    #: the good-pixel false-positive rate the pixel thresholds are set at (`regions.pixel_fpr`);
    #: None: no pixel thresholds (the params said null, or an earlier dualstpm wrote the file)
    pixel_fpr: float | None = None
    #: per view, the pixel threshold of defect regions (raw map units; `calibrate_pixel_threshold`)
    pixel_thresholds: dict[str, float] = field(default_factory=dict)
    #: the input statistics of the good images trained and calibrated on, the input drift test's
    #: reference (`dualstpm.data.input_stats.input_reference`); None: fitted before dualstpm kept it
    input_reference: dict | None = None
    #: under tiling, the (height, width) of the frames the maps and pixel thresholds are at; None: `image_size`
    frame_size: ImageSize | None = None
    #: what standardises `fused` and the memory map for the view `fused_memory`; None: no memory bank
    memory_stats: MemoryStats | None = None

    @property
    def false_alarm_bound(self) -> float | None:
        """`calibration.false_alarm_bound` of these thresholds: the probability that a new good part
        scores above them; None for files that do not record the calibration count."""
        n_images = self.validation_split.get("calibration_images")
        return None if n_images is None else false_alarm_bound(int(n_images), self.false_alarm_rate)

    @property
    def pixel_false_positive_bound(self) -> float | None:
        """`calibration.pixel_false_positive_bound` of the pixel thresholds (a new good image's
        expected share of pixels above them, at most); None without pixel thresholds or counts."""
        n_images = self.validation_split.get("calibration_images")
        if self.pixel_fpr is None or n_images is None:
            return None
        return pixel_false_positive_bound(int(n_images), pixel_count(self.frame_size or self.image_size), self.pixel_fpr)

    def to_json(self) -> dict:
        data = asdict(self)
        data["map_stats"] = self.map_stats.to_json()
        data["score"] = self.score.to_json()
        data["memory_stats"] = self.memory_stats.to_json() if self.memory_stats is not None else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> Calibration:
        """Raises KeyError or TypeError for a missing or unknown key (see `read_model_dir`)."""
        data = dict(data)
        data["map_stats"] = MapStats.from_json(data["map_stats"])
        data["score"] = read_score_spec(data["score"])
        data["image_size"] = from_json(data["image_size"])  # JSON keeps (height, width) as a list
        if data.get("frame_size") is not None:
            data["frame_size"] = from_json(data["frame_size"])
        if data.get("memory_stats") is not None:
            data["memory_stats"] = MemoryStats.from_json(data["memory_stats"])
        return cls(**data)


def read_score_spec(data: dict) -> ScoreSpec:
    """A stored `ScoreSpec.to_json` record, validated like `params.score` (pydantic's
    ValidationError, a ValueError, on bad values)."""
    return ScoreSpec.from_params(ScoreParams(**data))


def build_network(model: ModelParams, pretrained: bool = True) -> DualStpmModel:
    """The four networks `params.model` describes (`DualStpmModel.build`): teachers with their
    configured weights when `pretrained`, else bare for saved weights to fill in."""
    return DualStpmModel.build((model.t1.name, model.t1.weights), (model.t2.name, model.t2.weights),
                               attention=model.attention == "spatial", decoder_width=model.decoder_width,
                               gate_form=model.gate_form, pretrained=pretrained)


@dataclass(frozen=True)
class ChosenFusion:
    """What `dualstpm ablate` chose after training, with the threshold recalibrated for it on
    validation images: a fusion of the six maps (`spec`; the view `chosen`), or one of the
    model's memory views (`spec` None, `view` its name: `memory` or `fused_memory`)."""

    spec: FusionSpec | None
    threshold: float
    source: dict  # provenance: which configuration, on what evidence
    val_min: float  # lowest validation image score of the choice (the normalised score's 0)
    #: its pixel threshold of defect regions, recalibrated like `threshold`; None when the model has none
    pixel_threshold: float | None = None
    #: the view the choice is: `chosen` (the fusion `spec`), or a memory view
    view: str = CHOSEN_VIEW

    def __post_init__(self) -> None:
        if (self.view == CHOSEN_VIEW) != (self.spec is not None) or self.view not in (CHOSEN_VIEW, *MEMORY_VIEWS):
            raise ValueError(f"a chosen fusion is the view {CHOSEN_VIEW!r} with a fusion, or one of "
                             f"{', '.join(MEMORY_VIEWS)} without one; got view {self.view!r} with fusion {self.spec}")

    def to_json(self) -> dict:
        return {"applied": True, "view": self.view, "fusion": None if self.spec is None else asdict(self.spec),
                "threshold": self.threshold, "source": self.source, "val_min": self.val_min,
                "pixel_threshold": self.pixel_threshold}

    @classmethod
    def from_json(cls, data: dict) -> ChosenFusion:
        view = data.get("view", CHOSEN_VIEW)  # absent from the files of an earlier dualstpm: a fusion
        spec = None if data["fusion"] is None else FusionSpec.from_params(FusionParams(**data["fusion"]))  # validated
        pixel = data.get("pixel_threshold")  # absent from the files of an earlier dualstpm: no regions
        return cls(spec, float(data["threshold"]), dict(data["source"]), float(data["val_min"]),
                   None if pixel is None else float(pixel), view)


def read_chosen_fusion(model_dir: Path) -> ChosenFusion | None:
    """The applied choice in `fusion.json`; None without the file or when it was not applied."""
    path = Path(model_dir) / FUSION_FILE
    data = read_optional_json(path, "delete it or re-run `dualstpm ablate`")
    if data is None:
        return None
    try:
        return ChosenFusion.from_json(data) if data["applied"] else None
    except (ValueError, KeyError, TypeError) as exc:
        raise RunError(f"{path} is not a valid chosen fusion ({exc}): delete it or re-run `dualstpm ablate`") from None


def write_chosen_fusion(run_dir: Path, chosen: ChosenFusion | None, source: dict | None = None) -> Path:
    """Write `RUN/model/fusion.json` atomically (temp file, then rename). `chosen` None
    records a choice that was not applied: the model keeps fusing with `params.fusion`."""
    data = chosen.to_json() if chosen is not None else {"applied": False, "source": source or {}}
    return write_json(RunDir(run_dir).fusion, data)


def fusion_label(detector: Detector) -> str:
    """Which fusion the decision view uses: the applied chosen configuration, or `params.fusion`."""
    return detector.chosen.source.get("config", "chosen") if detector.chosen else "params.fusion"


def decision_view(view: str, chosen: str | None) -> str:
    """The view a model decides with: `fusion.view`, except that an applied choice of `ablate`
    (with `ablation.apply`; `chosen` is its view: `chosen` for a fusion, or a memory view; None
    when none is applied) replaces `fused`, and only `fused`: a model deciding with `stpm`,
    `recon`, `disc` or a memory view keeps it, and carries a chosen fusion as a view only."""
    return chosen if chosen is not None and view == "fused" else view


def region_spec(params: Params, pixel_fpr: float | None, pixel_threshold: float | None,
                view: str) -> RegionSpec | None:
    """The regions of a model deciding with `view`: its pixel threshold (from calibration.json, or
    fusion.json for `chosen`), the pixel scale `data.mm_per_px` and the rule `decision.*` of
    its params; None without a pixel threshold. Raises RunError for a rule without one (a
    model calibrated by an earlier dualstpm, or a chosen fusion an earlier `ablate` wrote)."""
    rule = params.decision
    if pixel_threshold is None:
        if rule.min_defect_area_px is None and rule.min_defect_area_mm2 is None:
            return None
        fix = ("re-run `dualstpm ablate` to recalibrate the chosen fusion" if view == CHOSEN_VIEW
               else "refit the model with this dualstpm (regions.pixel_fpr set)")
        raise RunError(f"the model's params set a region rule (decision.*) but it has no pixel threshold for its "
                       f"decision view {view!r}, so no regions to apply it to: {fix}")
    return RegionSpec(pixel_threshold, pixel_fpr, params.data.mm_per_px, rule.min_defect_area_px,
                      rule.min_defect_area_mm2)


class Detector:
    """A trained dual STPM with its fusion and calibration: images in, scores and maps out.

    All scoring is the inference module's (`self.inference`, :mod:`dualstpm.model.inference`):
    this class loads it, puts it on `compute` and names the thresholds of its views."""

    def __init__(self, model: DualStpmModel, params: Params, calibration: Calibration, compute: Compute,
                 chosen: ChosenFusion | None = None, disc: Discriminator | None = None,
                 memory: MemoryBank | None = None) -> None:
        self.compute = compute
        self.params = params
        self.calibration = calibration
        self.chosen = chosen
        self.trained_spec = FusionSpec.from_params(params.fusion)
        chosen_spec = chosen.spec if chosen else None  # a chosen fusion of the six maps (None: none, or a memory view)
        self.spec = chosen_spec or self.trained_spec  # the decision fusion (an export's metadata)
        self.thresholds = {**calibration.thresholds, **({chosen.view: chosen.threshold} if chosen else {})}  # per view
        self.score_spec = calibration.score  # the units of the thresholds (not params.score: see Calibration)
        if (memory is None) != (calibration.memory_stats is None):
            raise RunError("the model's memory bank and its calibration's memory statistics must come together: "
                           "the model directory is incomplete; retrain it")
        views = MapViews(self.trained_spec, calibration.map_stats, score=self.score_spec,
                         chosen=chosen_spec, disc=disc, memory=calibration.memory_stats)
        self.views: tuple[str, ...] = views.views  # the views a test evaluates
        # the view the model decides with: `fusion.view`, where an applied choice replaces `fused`
        self.decision_view = decision_view(params.fusion.view, chosen.view if chosen else None)
        if self.decision_view not in self.views or self.decision_view not in self.thresholds:
            raise RunError(f"the model decides with the view {self.decision_view!r} (fusion.view={params.fusion.view!r}"
                           f"{', model/fusion.json' if chosen else ''}) but has no calibrated {self.decision_view!r} "
                           f"view (views: {', '.join(self.views)}): refit it with fit.discriminator=true for `disc`, "
                           "memory.enabled=true for `memory` and `fused_memory`")
        decides_with_choice = chosen is not None and self.decision_view == chosen.view
        val_min = chosen.val_min if decides_with_choice else calibration.val_score_summary[self.decision_view]["min"]
        # the one scoring module (networks, view maps, scores, normalisation, decision)
        self.inference = compute.module(DualStpmInference(model, views, self.threshold, val_min,
                                                          decision=self.decision_view, memory=memory)).eval()
        self.model = self.inference.network
        self.disc = self.inference.disc
        self._typical_level: float | None = None
        pixel = chosen.pixel_threshold if decides_with_choice else calibration.pixel_thresholds.get(self.decision_view)
        #: how the decision view's map becomes defect regions and, with a rule, the verdict; None: no regions
        self.regions = region_spec(params, calibration.pixel_fpr, pixel, self.decision_view)

    @property
    def normalization(self) -> ScoreNormalization:
        """The decision view's normalised score (its threshold and validation minimum)."""
        return self.inference.normalization

    @property
    def threshold(self) -> float:
        """The decision view's threshold (raw image-score units)."""
        return self.thresholds[self.decision_view]

    def typical_level(self) -> float:
        """The decision view's map value at a typical good pixel (`MapViews.typical_level`),
        computed once."""
        if self._typical_level is None:
            self._typical_level = self.inference.views.typical_level(self.decision_view)
        return self._typical_level

    @property
    def image_size(self) -> ImageSize:
        """The input size, px: a side (a square) or (height, width); resize with
        `dualstpm.data.resize_image`."""
        return self.params.image_size

    @property
    def frame_size(self) -> ImageSize:
        """The size each image is resized to before scoring (a side or (height, width)): the
        input size, or under tiling the frame size it is cut into tiles from (`Params.frame_size`)."""
        return self.params.frame_size

    @property
    def tiling(self) -> Tiling | None:
        """How frames are cut into tiles of `image_size` (`dualstpm.model.tiling`); None: untiled."""
        return self.params.tiling_spec()

    @property
    def batch_size(self) -> int:
        return self.params.fit.batch_size

    @property
    def map_stats(self) -> MapStats:
        """Per-map validation mean/std, (2, 3) each (from `calibration.json`)."""
        return self.calibration.map_stats

    def view_spec(self, view: str) -> FusionSpec:
        """`fused`: `params.fusion`; `chosen`: the applied chosen fusion; a branch: that branch
        alone, as trained. Raises RunError for `chosen` when none is applied."""
        if view == CHOSEN_VIEW and (self.chosen is None or self.chosen.spec is None):
            raise RunError("this model has no applied chosen fusion (no `dualstpm ablate` adopted one): "
                           f"its views are {', '.join(self.views)}")
        return self.inference.views.spec(view)

    def prepare(self, images: Tensor) -> Tensor:
        """Images on the model's device in its memory format."""
        return self.compute.images(images)

    @torch.inference_mode()
    def raw_maps(self, images: Tensor, with_memory: bool = True) -> RawMaps:
        """(B, 3, H, W) images in [0, 1] at `frame_size` -> float32 :class:`RawMaps`: six maps
        (B, 2, 3, H, W) and, with a memory bank (unless `with_memory` is False), the memory map
        (B, H, W) (networks in `compute`'s precision; under tiling scored tile by tile and stitched)."""
        memory = self.inference.memory if with_memory else None
        with self.compute.autocast():
            return raw_maps(self.model, self.prepare(images), memory, self.inference.chunked, self.tiling)

    def six_maps(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) images in [0, 1] at `frame_size` -> (B, 2, 3, H, W) raw float32 maps (no memory map)."""
        return self.raw_maps(images, with_memory=False).six

    @torch.inference_mode()
    def score_maps(self, maps: Tensor | RawMaps, views: tuple[str, ...] = VIEWS) -> ScoredBatch:
        """Six maps (B, 2, 3, H, W), or :class:`RawMaps` (the memory views need them) -> each
        requested view's map (B, H, W) and image score (`MapViews.score_maps`): `fused` is
        always `params.fusion` and `chosen` the applied chosen fusion. Raises RunError for a
        view this model does not have."""
        device = self.compute.device
        raw = maps if isinstance(maps, RawMaps) else RawMaps(maps)
        raw = RawMaps(raw.six.to(device), None if raw.memory is None else raw.memory.to(device))
        try:
            return self.inference.views.score_maps(raw, views)
        except ValueError as exc:
            raise RunError(str(exc)) from None

    @torch.inference_mode()
    def infer(self, images: Tensor) -> InferenceOutput:
        """(N, 3, S, S) images at `image_size` (uint8, or float in [0, 1]) -> the inference
        module's outputs (scores, normalised score, label at the stored threshold, decision map):
        what predict, the MLflow model and the exports compute."""
        with self.compute.autocast():
            return self.inference(self.prepare(images))

    def score(self, images: Tensor, views: tuple[str, ...] = VIEWS) -> ScoredBatch:
        return self.score_maps(self.raw_maps(images), views)

    def batches(self, images: Tensor, batch_size: int,
                views: tuple[str, ...] = VIEWS) -> Iterator[tuple[slice, ScoredBatch]]:
        """`score` a few images at a time: (the slice of `images`, its ScoredBatch) per batch."""
        for start in range(0, len(images), batch_size):
            part = slice(start, start + batch_size)
            yield part, self.score(images[part], views)

    # --- persistence -------------------------------------------------------------
    def save(self, run_dir: Path) -> Path:
        model_dir = save_detector(run_dir, self.model, self.params, self.calibration, self.disc, self.inference.memory)
        if self.chosen is not None:
            write_chosen_fusion(run_dir, self.chosen)
        return model_dir

    @classmethod
    def load(cls, run_dir: Path, compute: Compute | None = None, device: str = "auto") -> Detector:
        """The detector of a trained run, on `compute`, else on `device` (`auto`: the GPU when
        there is one) in float32 (`compute.INFERENCE_PRECISION`, the precision it was calibrated
        in, whatever `fit.precision` trained it in). Where it was trained does not matter:
        weights load on the CPU first. Raises RunError for an unusable run directory."""
        model_dir, params, calibration = read_model_dir(run_dir)
        model = build_network(params.model, pretrained=False)
        try:
            model.load_state_dict(read_weights(model_dir / WEIGHTS_FILE), strict=True)
        except RuntimeError as exc:
            raise RunError(
                f"{model_dir / WEIGHTS_FILE} does not fit the network its params.yaml describes "
                f"({str(exc).splitlines()[0]}): the file is damaged or from another dualstpm version; retrain it"
            ) from None
        compute = compute or Compute.resolve(device, INFERENCE_PRECISION)
        return cls(model, params, calibration, compute, read_chosen_fusion(model_dir), _load_disc(model_dir, params),
                   _load_memory(model_dir, params))


def _optional_tensors(model_dir: Path, name: str, fitted_with: str) -> dict[str, Tensor]:
    """The tensors of `model_dir/name`, a file a model fitted with `fitted_with` (e.g.
    ``memory.enabled=true``) must have; RunError naming the fix when it is missing."""
    path = model_dir / name
    if not path.is_file():
        raise RunError(f"{model_dir} was fitted with {fitted_with} but {name} is missing: "
                       "the model directory is incomplete; retrain it")
    return read_weights(path)


def _load_memory(model_dir: Path, params: Params) -> MemoryBank | None:
    """The memory bank of a model fitted with memory.enabled (else None)."""
    if not params.memory.enabled:
        return None
    tensors = _optional_tensors(model_dir, MEMORY_FILE, "memory.enabled=true")
    if set(tensors) != {"bank"} or tensors["bank"].ndim != 2 or len(tensors["bank"]) == 0:
        raise RunError(f"{model_dir / MEMORY_FILE} is not a memory bank (one non-empty 2-D tensor named 'bank'): "
                       "the file is damaged; retrain the model")
    return MemoryBank(tensors["bank"], params.memory.sigma)


def _load_disc(model_dir: Path, params: Params) -> Discriminator | None:
    """The discriminative stage of a model fitted with fit.discriminator (else None), strictly loaded."""
    if not params.fit.discriminator:
        return None
    state = _optional_tensors(model_dir, DISC_WEIGHTS_FILE, "fit.discriminator=true")
    path = model_dir / DISC_WEIGHTS_FILE
    disc = Discriminator(params.disc.width)
    try:
        disc.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise RunError(f"{path} does not fit disc.width={params.disc.width} ({str(exc).splitlines()[0]}): "
                       "the file is damaged or from another dualstpm version; retrain it") from None
    return disc.eval()


def read_model_dir(run_dir: Path) -> tuple[Path, Params, Calibration]:
    """(model dir, params, calibration) of a trained run, checked; the weights stay on disk.
    Raises RunError for a model of another format, or a calibration.json this dualstpm does
    not read (a key missing or unknown: written by an earlier dualstpm), naming the fix."""
    model_dir = trained_model_dir(run_dir)
    params = load_params(model_dir / PARAMS_FILE)
    path = model_dir / CALIBRATION_FILE
    data = read_json(path, "retrain the model with this version")
    if data.get("format_version") != FORMAT_VERSION:
        raise RunError(
            f"{model_dir} has model format {data.get('format_version')}, this dualstpm reads "
            f"{FORMAT_VERSION}: retrain it with this version"
        )
    try:
        calibration = Calibration.from_json(data)
    except (KeyError, TypeError) as exc:
        raise RunError(f"{path} is not a calibration this dualstpm reads ({type(exc).__name__}: {exc}): it was "
                       "written by an earlier dualstpm; retrain the model with this version") from None
    return model_dir, params, calibration


def save_detector(run_dir: Path, model: DualStpmModel, params: Params, calibration: Calibration,
                  disc: Discriminator | None = None, memory: MemoryBank | None = None) -> Path:
    """Write the model directory atomically (`rundir.write_model_dir`), readable per the umask
    like any file the user writes. `disc` is required exactly when `params.fit.discriminator`
    is true, `memory` exactly when `params.memory.enabled` (else ValueError)."""
    if (disc is not None) != params.fit.discriminator:
        raise ValueError(f"fit.discriminator={params.fit.discriminator} but a discriminator was "
                         f"{'given' if disc is not None else 'not given'}")
    if (memory is not None) != params.memory.enabled:
        raise ValueError(f"memory.enabled={params.memory.enabled} but a memory bank was "
                         f"{'given' if memory is not None else 'not given'}")
    return write_model_dir(run_dir, weights_bytes(model.state_dict()), params_yaml(params), calibration.to_json(),
                           weights_bytes(disc.state_dict()) if disc is not None else None,
                           weights_bytes({"bank": memory.bank}) if memory is not None else None)
