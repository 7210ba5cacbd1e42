"""The one scoring path: images, or stored six maps, in; view maps, image scores and the decision out.

:class:`DualStpmInference` is what `Detector`, `dualstpm predict`, the MLflow pyfunc and
every export run (the exports are traces of it); its :class:`MapViews` (everything after
the networks) is what epoch selection, calibration, the test, the ablation's re-scoring of
stored maps and the overlays use. So there is one copy of the scoring math. Both are built
from plain arguments (networks, fusion specs, statistics, threshold): no params object, no files.

Views (:data:`VIEWS` and the two optional ones): `fused` is always the params' fusion
(`params.fusion`, as trained), `chosen` the fusion `dualstpm ablate` applied (present only
then), `stpm` and `recon` each branch alone as trained, `disc` the discriminative stage
(present only on a model fitted with it), `memory` the memory view (PatchCore's
nearest-neighbour distance on T1's features, :mod:`dualstpm.model.memory`) and
`fused_memory` the standardised sum of `fused` and `memory` (both present only on a model
fitted with ``memory.enabled``). The module decides with one of them (`decision`).

Input: images at the model's `image_size`, shape (N, 3, H, W), either uint8 in [0, 255]
or float in [0, 1] (an export takes float32). Resizing stays outside: use
:func:`dualstpm.data.resize_image` (bilinear with antialiasing, no crop) on each decoded
image, as training did. Each teacher and student applies its own mean/std inside.

Outputs (:class:`InferenceOutput`, in this order, also the output names of an export):
`score` (N,) raw image score of the decision view (`fusion.view`, default `fused`; `chosen` in its
place once `dualstpm ablate` applied a fusion), its map
reduced by the `score` spec (max, top-k mean or smoothed max: :func:`dualstpm.model.fusion.image_score`),
`normalized_score` (N,) in [0, 1] with 0.5 at the threshold
(:class:`~dualstpm.model.calibration.ScoreNormalization`), `label` (N,) bool, True =
defective (score > threshold), `anomaly_map` (N, H, W) the decision view's map (raw units;
logits for `disc`), `stpm_score` and `recon_score` (N,) each branch alone, as trained, and
`disc_score` (N,) the discriminative stage's score (NaN when the model has none); every
score with the same reduction; `stpm_map` and `recon_map` (N, H, W) each branch's map (what a
tiled frame's branch scores are taken from: :func:`infer_frames`).

Tiling (`dualstpm.model.tiling`): the module scores tiles of its input size; a frame is cut,
its tiles scored, and the tiles' maps stitched outside the graph by :func:`infer_frames`, the
one function predict, serving and every backend run, so an export tiles as PyTorch does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from dualstpm.model.anomaly_map import MapFusion
from dualstpm.model.calibration import ScoreNormalization
from dualstpm.model.discriminator import Discriminator
from dualstpm.model.fusion import (DISC_VIEW, FUSED_MEMORY_VIEW, MEMORY_VIEW, MEMORY_VIEWS, VIEWS, FusionSpec, MapStats,
                                   ScoreSpec, StreamedScore, fuse, image_score)
from dualstpm.model.memory import MEMORY_LEVELS, MemoryBank, MemoryStats
from dualstpm.model.regions import RegionSpec
from dualstpm.model.tiling import Tiling, owned_windows, stitched
from dualstpm.model.torch_model import DualStpmModel

INPUT_NAME = "images"
#: the view of a fusion `dualstpm ablate` applied (a metrics.json row, a thresholds key)
CHOSEN_VIEW = "chosen"
#: what an export's metadata names as the tiling its deployment must run (:func:`infer_frames`)
TILING_FUNCTION = f"{__name__}.infer_frames"
#: six-map values a stored stack is upcast and scored at a time: 16 MB as float32, reused by malloc
STACK_CHUNK_ELEMENTS = 2**22
#: side of the constant maps the `disc` view's typical level is read from (beyond its receptive field)
TYPICAL_SIDE = 64


class InferenceOutput(NamedTuple):
    """What the detector says about a batch of N images (shapes in the module docstring)."""

    score: Tensor
    normalized_score: Tensor
    label: Tensor
    anomaly_map: Tensor
    stpm_score: Tensor
    recon_score: Tensor
    disc_score: Tensor
    stpm_map: Tensor
    recon_map: Tensor


OUTPUT_NAMES: tuple[str, ...] = InferenceOutput._fields


@dataclass(frozen=True)
class RawMaps:
    """What the networks say about N images: the six raw maps (N, 2, 3, H, W) and, for a model
    with a memory bank, the memory map (N, H, W) (else None); tensors, or stored float16
    arrays. Indexing (a slice or an index array) takes the same images from both."""

    six: Tensor | np.ndarray
    memory: Tensor | np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.six)

    def __getitem__(self, index: slice | np.ndarray) -> RawMaps:
        return RawMaps(self.six[index], None if self.memory is None else self.memory[index])


@dataclass
class ScoredBatch:
    """Per view: image scores (B,) and maps (B, H, W)."""

    scores: dict[str, Tensor]
    maps: dict[str, Tensor]


class Scorer(Protocol):
    """What scores images: a `Detector` (PyTorch) or a loaded export (`dualstpm.backends`)."""

    image_size: int | tuple[int, int]  # input size, px: a side (a square) or (height, width)
    frame_size: int | tuple[int, int]  # what images are resized to: image_size, or under tiling the frames'
    tiling: Tiling | None  # how frames are cut into tiles of image_size; None: untiled
    score_spec: ScoreSpec  # the reduction of a map to the image score (the threshold's units)
    normalization: ScoreNormalization  # the decision view's normalised score
    batch_size: int
    threshold: float  # stored decision threshold, raw score units
    decision_view: str  # the view it decides with: fused, chosen, disc, stpm or recon
    regions: RegionSpec | None  # how its anomaly map becomes defect regions (and a rule's verdict); None: none

    def typical_level(self) -> float:
        """The decision view's map value at a typical good pixel (the overlays' transparent end)."""

    def infer(self, images: torch.Tensor) -> InferenceOutput:
        """(N, 3, H, W) float images in [0, 1] at `image_size` -> the inference module's outputs."""


def score_frames(scorer: Scorer, frames: Tensor, on_tiles: Callable[[int], None] | None = None) -> InferenceOutput:
    """(N, 3, H, W) images at `scorer.frame_size` -> their outputs, whatever the backend:
    `scorer.infer` itself without tiling, else tile by tile and stitched (:func:`infer_frames`;
    `on_tiles(n)` after each batch of n tiles)."""
    if scorer.tiling is None:
        return scorer.infer(frames)
    with torch.inference_mode():
        return infer_frames(scorer.infer, frames, scorer.tiling, scorer.score_spec, scorer.normalization, on_tiles)


def scale_images(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float images are taken as already in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def six_maps(network: DualStpmModel, images: Tensor, chunked: bool = True, tiling: Tiling | None = None) -> Tensor:
    """(N, 3, H, W) uint8 or float images -> (N, 2, 3, H, W) float32 raw maps (`network` as it
    is: in eval mode for inference). `chunked`: see `PyramidPairs.maps`. With `tiling`, the
    images are frames: cut into tiles of the model's input size, their maps stitched back at
    H x W (:func:`dualstpm.model.tiling.stitched`)."""
    if tiling is not None:  # each batch of tiles is scaled on its own (uint8 frames stay bytes)
        return stitched(images, tiling, lambda tiles: six_maps(network, tiles, chunked))
    images = scale_images(images)
    return network.pyramids(images).maps(images.shape[-2:], chunked).float()


def raw_maps(network: DualStpmModel, images: Tensor, memory: MemoryBank | None = None, chunked: bool = True,
             tiling: Tiling | None = None) -> RawMaps:
    """(N, 3, H, W) uint8 or float images -> their :class:`RawMaps` (float32): the six maps of
    :func:`six_maps` and, with `memory`, the memory map from the same forward pass of T1 (its
    levels at strides 8 and 16). Raises ValueError for a memory bank under `tiling` (its blur
    and neighbourhoods look across tile borders: `Params` refuses the pair)."""
    if memory is None:
        return RawMaps(six_maps(network, images, chunked, tiling))
    if tiling is not None:
        raise ValueError("a memory view cannot be tiled: set memory.enabled=false or tiling.enabled=false")
    images = scale_images(images)
    pairs = network.pyramids(images)
    size = tuple(images.shape[-2:])
    remembered = memory([pairs.teacher_a[i] for i in MEMORY_LEVELS], size, chunked)
    return RawMaps(pairs.maps(size, chunked).float(), remembered.float())


def map_stack(maps: RawMaps, to_map: Callable[[RawMaps], Tensor]) -> np.ndarray:
    """Apply a per-image `to_map` (float32 :class:`RawMaps` of n images -> (n, S, S)) to stored
    RawMaps (six maps (N, 2, 3, S, S), float16 on disk, and the memory maps when stored),
    giving (N, S, S) float32.

    A chunk of about STACK_CHUNK_ELEMENTS six-map values is upcast at a time; `to_map` works
    per image, so the result does not depend on the chunking.
    """
    out = np.empty((len(maps), *maps.six.shape[-2:]), dtype=np.float32)
    step = max(1, STACK_CHUNK_ELEMENTS // max(1, int(np.prod(maps.six.shape[1:]))))
    for start in range(0, len(maps), step):
        part = maps[start : start + step]
        chunk = RawMaps(torch.from_numpy(part.six).float(),
                        None if part.memory is None else torch.from_numpy(part.memory).float())
        out[start : start + step] = to_map(chunk).float().cpu().numpy()
    return out


def stack_scores(maps: np.ndarray, score: ScoreSpec) -> np.ndarray:
    """(N, S, S) float32 view maps -> (N,) float64 image scores (`fusion.image_score`)."""
    return image_score(torch.from_numpy(maps), score).numpy().astype(np.float64)


class MapViews(nn.Module):
    """Six raw maps -> named view maps -> image scores: everything after the networks.

    Args:
        trained: the params' fusion (`params.fusion`): the view `fused`, and through its
            branch views `stpm` and `recon`.
        stats: per-map validation statistics, (2, 3) mean and std; None before calibration
            (only fusions with ``normalize: none`` can then be computed).
        score: how every view's map becomes an image score (the calibration's reduction).
        chosen: the fusion `dualstpm ablate` applied (the view `chosen`), or None.
        disc: the discriminative stage (the view `disc`), or None.
        memory: the statistics that standardise `fused` and the memory map (the views
            `memory` and `fused_memory`, which read the memory map of :class:`RawMaps`), or None.
    """

    def __init__(self, trained: FusionSpec, stats: MapStats | None, *, score: ScoreSpec,
                 chosen: FusionSpec | None = None, disc: Discriminator | None = None,
                 memory: MemoryStats | None = None) -> None:
        super().__init__()
        specs = {view: trained.view(view) for view in VIEWS} | ({CHOSEN_VIEW: chosen} if chosen is not None else {})
        self.fusions = nn.ModuleDict({view: MapFusion(spec, stats) for view, spec in specs.items()})
        self.disc = disc.eval() if disc is not None else None
        self.memory_stats = memory
        self.views: tuple[str, ...] = (VIEWS + ((DISC_VIEW,) if disc is not None else ())
                                       + ((CHOSEN_VIEW,) if chosen is not None else ())
                                       + (MEMORY_VIEWS if memory is not None else ()))
        self.stats = stats
        self.score_spec = score

    def spec(self, view: str) -> FusionSpec:
        """The fusion of a view (`fused`, `chosen`, `stpm`, `recon`); KeyError for `disc` or a view it lacks."""
        return self.fusions[view].spec

    def view_maps(self, maps: Tensor | RawMaps, views: tuple[str, ...] = VIEWS) -> dict[str, Tensor]:
        """Six raw maps (N, 2, 3, H, W), or :class:`RawMaps` (needed by the memory views) ->
        {view: (N, H, W) map}. Fusions run where `maps` are; the discriminative stage on its
        own device. Raises ValueError for a view it lacks, or a memory view without a memory map."""
        raw = maps if isinstance(maps, RawMaps) else RawMaps(maps)
        missing = [v for v in views if v not in self.views]
        if missing:
            raise ValueError(f"this model has no view {', '.join(map(repr, missing))}: its views are "
                             f"{', '.join(self.views)} (`chosen` only after `dualstpm ablate` applied a fusion, "
                             "`disc` only with fit.discriminator=true, `memory` and `fused_memory` only with "
                             "memory.enabled=true)")
        if raw.memory is None and any(v in MEMORY_VIEWS for v in views):
            raise ValueError("the views memory and fused_memory need the memory map: score RawMaps with it")
        out = {}
        for view in views:
            if view == DISC_VIEW:
                device = next(self.disc.parameters()).device
                out[view] = self.disc(raw.six if raw.six.device == device else raw.six.to(device))
            elif view == MEMORY_VIEW:
                out[view] = raw.memory
            elif view == FUSED_MEMORY_VIEW:
                fused = out["fused"] if "fused" in out else self.fusions["fused"](raw.six)
                out[view] = self.memory_stats.combine(fused, raw.memory)
            else:
                out[view] = self.fusions[view](raw.six)
        return out

    def score_maps(self, maps: Tensor | RawMaps, views: tuple[str, ...] = VIEWS) -> ScoredBatch:
        """Six raw maps (N, 2, 3, H, W) or :class:`RawMaps` -> each view's map (N, H, W) and image score (N,)."""
        fused = self.view_maps(maps, views)
        return ScoredBatch({v: image_score(m, self.score_spec) for v, m in fused.items()}, fused)

    @torch.inference_mode()
    def stack_maps(self, maps: np.ndarray | RawMaps, view: str | FusionSpec) -> np.ndarray:
        """A stored (N, 2, 3, S, S) stack (float16 on disk), or stored :class:`RawMaps` (the
        memory views need them) -> view maps (N, S, S) float32. `view` names one of `views`,
        or is any fusion (the ablation's grid), fused with these statistics; chunked by
        :func:`map_stack`."""
        raw = maps if isinstance(maps, RawMaps) else RawMaps(maps)
        if isinstance(view, FusionSpec):
            return map_stack(raw, lambda chunk: fuse(chunk.six, view, self.stats))
        return map_stack(raw, lambda chunk: self.view_maps(chunk, (view,))[view])

    def stack(self, maps: np.ndarray | RawMaps, view: str | FusionSpec) -> tuple[np.ndarray, np.ndarray]:
        """A stored stack -> (view maps (N, S, S) float32 as :meth:`stack_maps`, image scores
        (N,) float64 by this model's reduction)."""
        out = self.stack_maps(maps, view)
        return out, stack_scores(out, self.score_spec)

    @torch.inference_mode()
    def typical_level(self, view: str) -> float:
        """A view's map value at a typical good pixel (the overlays' transparent end): its map
        of six constant maps, each at its validation mean. A fusion keeps a constant map
        constant (its smoothing too, so it is left out); the discriminative stage is read at
        the centre of TYPICAL_SIDE px maps (beyond its receptive field from the border)."""
        if self.stats is None:
            raise ValueError("no validation statistics: the typical level needs a calibrated model")
        if view == MEMORY_VIEW:
            return self.memory_stats.memory[0]  # its mean over the good calibration pixels
        if view == FUSED_MEMORY_VIEW:  # each part at its typical level: 0 after standardising
            mean, std = self.memory_stats.fused
            return (self.typical_level("fused") - mean) / std
        typical = self.stats.mean.to(torch.float32)[None, :, :, None, None]  # (1, 2, 3, 1, 1)
        if view != DISC_VIEW:
            return float(fuse(typical, replace(self.spec(view), sigma=0.0), self.stats)[0, 0, 0])
        side = TYPICAL_SIDE
        level = self.view_maps(typical.expand(1, 2, 3, side, side), (DISC_VIEW,))[DISC_VIEW]
        return float(level[0, side // 2, side // 2])


class DualStpmInference(nn.Module):
    """T1, S1, T2, S2 -> six maps -> view maps -> scores -> normalised score and decision.

    Args:
        network: the trained four networks (put in eval mode here).
        views: what comes after the networks (:class:`MapViews`).
        threshold: the decision view's threshold (raw score units).
        val_min: the decision view's lowest validation image score (for the normalised score).
        decision: the view whose score, label and map are the outputs.
        chunked: compute distances a few images at a time (eager speed); set False before
            tracing or exporting, so that one graph serves any batch size.
        memory: the memory bank of a model fitted with ``memory.enabled`` (its views need
            `views` built with the memory statistics), or None.
    Raises ValueError for a decision view the module cannot compute, or a memory bank and
    views that do not go together.
    """

    def __init__(self, network: DualStpmModel, views: MapViews, threshold: float, val_min: float, *,
                 decision: str = "fused", chunked: bool = True, memory: MemoryBank | None = None) -> None:
        super().__init__()
        self.network = network.eval()
        self.views = views
        if (memory is None) != (views.memory_stats is None):
            raise ValueError("a memory bank needs views with memory statistics, and those need the bank")
        self.memory = memory
        if decision not in views.views:
            raise ValueError(f"decision view {decision!r} is not one of this model's views {views.views}")
        self.decision = decision
        self.normalization = ScoreNormalization(threshold, val_min)
        self.chunked = chunked

    @property
    def threshold(self) -> float:
        return self.normalization.threshold

    @property
    def disc(self) -> Discriminator | None:
        return self.views.disc

    def raw_maps(self, images: Tensor) -> RawMaps:
        """(N, 3, H, W) uint8 or float images -> float32 :class:`RawMaps` (the memory map with a bank)."""
        return raw_maps(self.network, images, self.memory, self.chunked)

    def forward(self, images: Tensor) -> InferenceOutput:
        outputs = (self.decision, "stpm", "recon", *((DISC_VIEW,) if DISC_VIEW in self.views.views else ()))
        # the nearest-neighbour search only when the decision needs it (a bank kept for the ablation costs nothing)
        memory = self.memory if self.decision in MEMORY_VIEWS else None
        raw = raw_maps(self.network, images, memory, self.chunked)
        scored = self.views.score_maps(raw, tuple(dict.fromkeys(outputs)))
        decision = scored.scores[self.decision]
        return InferenceOutput(
            score=decision,
            normalized_score=self.normalization(decision),
            label=decision > self.threshold,
            anomaly_map=scored.maps[self.decision],
            stpm_score=scored.scores["stpm"],
            recon_score=scored.scores["recon"],
            disc_score=scored.scores[DISC_VIEW] if DISC_VIEW in scored.scores else torch.full_like(decision, float("nan")),
            stpm_map=scored.maps["stpm"],
            recon_map=scored.maps["recon"],
        )


def infer_frames(infer: Callable[[Tensor], InferenceOutput], frames: Tensor, tiling: Tiling, score: ScoreSpec,
                 normalization: ScoreNormalization, on_tiles: Callable[[int], None] | None = None) -> InferenceOutput:
    """Frames (N, 3, H, W), float in [0, 1] or uint8, -> the inference outputs of the whole
    frames, scored tile by tile.

    `infer` scores tiles of the model's input size (a `DualStpmInference`, or an export run by a
    backend; both take uint8 tiles too); the tiles' decision maps are stitched at H x W
    (:func:`dualstpm.model.tiling.owned_windows`), and each frame's score is the `score`
    reduction of that stitched map, normalised by `normalization`, labelled at its threshold:
    what the test computes from the stitched six maps (stitching commutes with the pixel-wise
    fusion). Every score (the decision view's and each branch's) is reduced window by window
    as the tiles come (:class:`~dualstpm.model.fusion.StreamedScore`: the same value as
    `image_score` of the whole map, up to the summation order of a top-k mean), so no
    reduction works on a frame-sized copy; the branch maps are never assembled, and
    `stpm_map` and `recon_map` are (N, 0, 0). Memory: the frames, their decision maps (4
    bytes per pixel) and one batch of tiles.
    `disc_score` is NaN: tiling refuses the discriminative stage (`Params`). `on_tiles(n)` is
    called after each batch of n tiles.
    """
    shape = tuple(frames.shape[-2:])
    decision_map: Tensor | None = None
    streamed = [[StreamedScore(score, shape) for _ in range(len(frames))] for _ in ("decision", "stpm", "recon")]

    def views(tiles: Tensor) -> Tensor:  # (B, 3, h, w): the decision map, then each branch's
        out = infer(tiles)
        return torch.stack([out.anomaly_map.float(), out.stpm_map.float(), out.recon_map.float()], 1)

    for n, rows, cols, window in owned_windows(frames, tiling, views, on_tiles):
        if decision_map is None:
            decision_map = window.new_empty((len(frames), *shape))
        decision_map[n, rows, cols] = window[0]
        for k, view in enumerate(streamed):
            view[n].add(rows, cols, window[k])
    if decision_map is None:
        raise ValueError("no frames to tile")
    decision, stpm_score, recon_score = (torch.stack([s.result() for s in view]) for view in streamed)
    empty = decision_map.new_empty((len(frames), 0, 0))  # a large frame's branch maps are not kept
    return InferenceOutput(
        score=decision,
        normalized_score=normalization(decision),
        label=decision > normalization.threshold,
        anomaly_map=decision_map,
        stpm_score=stpm_score,
        recon_score=recon_score,
        disc_score=torch.full_like(decision, float("nan")),
        stpm_map=empty,
        recon_map=empty,
    )
