"""The whole detector as one pure module: an image batch in, the decision out.

:class:`DualStpmInference` is what `Detector`, `dualstpm predict`, the MLflow pyfunc and
every export run (the exports are traces of it), so there is one copy of the scoring
math. It is built from plain arguments (networks, fusion specs, statistics, threshold):
no params object, no files.

Input: images at the model's `image_size`, shape (N, 3, H, W), either uint8 in [0, 255]
or float in [0, 1] (an export takes float32). Resizing stays outside: use
:func:`dualstpm.data.resize_image` (bilinear with antialiasing, no crop) on each decoded
image, as training did. Each teacher and student applies its own mean/std inside.

Outputs (:class:`InferenceOutput`, in this order, also the output names of an export):
`score` (N,) raw image score of the decision view (`fusion.view`, default `fused`), its map
reduced by the `score` spec (max, top-k mean or smoothed max: :func:`dualstpm.fusion.image_score`),
`normalized_score` (N,) in [0, 1] with 0.5 at the threshold
(:class:`~dualstpm.models.anomaly_map.ScoreNormalization`), `label` (N,) bool, True =
defective (score > threshold), `anomaly_map` (N, H, W) the decision view's map (raw units;
logits for `disc`), `stpm_score` and `recon_score` (N,) each branch alone, as trained, and
`disc_score` (N,) the discriminative stage's score (NaN when the model has none); every
score with the same reduction.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn

from dualstpm.fusion import DISC_VIEW, VIEWS, FusionSpec, MapStats, ScoreSpec, image_score
from dualstpm.models.anomaly_map import MapFusion, ScoreNormalization
from dualstpm.models.discriminator import Discriminator
from dualstpm.models.torch_model import DualStpmModel

INPUT_NAME = "images"


class InferenceOutput(NamedTuple):
    """What the detector says about a batch of N images (shapes in the module docstring)."""

    score: Tensor
    normalized_score: Tensor
    label: Tensor
    anomaly_map: Tensor
    stpm_score: Tensor
    recon_score: Tensor
    disc_score: Tensor


OUTPUT_NAMES: tuple[str, ...] = InferenceOutput._fields


def scale_images(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float images are taken as already in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


class DualStpmInference(nn.Module):
    """T1, S1, T2, S2 -> six maps -> fusion per view -> scores -> normalised score and decision.

    Args:
        network: the trained four networks (put in eval mode here).
        fused: the fused view's fusion (`params.fusion`, or the applied chosen one).
        trained: the trained fusion, whose branch views give the per-branch scores.
        map_mean, map_std: (2, 3) per-map validation statistics.
        threshold: the decision view's threshold (raw score units).
        val_min: the decision view's lowest validation image score (for the normalised score).
        score: how every view's map becomes an image score (the calibration's reduction:
            the threshold and val_min are in its units).
        chunked: compute distances a few images at a time (eager speed); set False before
            tracing or exporting, so that one graph serves any batch size.
        disc: the discriminative stage (view `disc`), or None.
        decision: the view whose score, label and map are the outputs (`fusion.view`).
    Raises ValueError for a decision view the module cannot compute.
    """

    def __init__(self, network: DualStpmModel, fused: FusionSpec, trained: FusionSpec, map_mean: Tensor,
                 map_std: Tensor, threshold: float, val_min: float, chunked: bool = True, *,
                 score: ScoreSpec, disc: Discriminator | None = None, decision: str = "fused") -> None:
        super().__init__()
        self.network = network.eval()
        specs = {"fused": fused, **{view: trained.view(view) for view in VIEWS if view != "fused"}}
        self.fusions = nn.ModuleDict({view: MapFusion(spec, map_mean, map_std) for view, spec in specs.items()})
        self.disc = disc.eval() if disc is not None else None
        self.views: tuple[str, ...] = VIEWS + ((DISC_VIEW,) if disc is not None else ())
        if decision not in self.views:
            raise ValueError(f"decision view {decision!r} is not one of this model's views {self.views}")
        self.decision = decision
        self.normalization = ScoreNormalization(threshold, val_min)
        self.score_spec = score
        self.chunked = chunked

    @property
    def threshold(self) -> float:
        return self.normalization.threshold

    def six_maps(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) uint8 or float images -> (N, 2, 3, H, W) float32 raw maps."""
        images = scale_images(images)
        return self.network.pyramids(images).maps(images.shape[-2:], self.chunked).float()

    def view_maps(self, maps: Tensor, views: tuple[str, ...] = VIEWS) -> dict[str, Tensor]:
        """Six raw maps -> {view: (N, H, W) map} for `fused`, `stpm`, `recon` and `disc`.
        Raises ValueError for `disc` on a model without the discriminative stage."""
        out = {}
        for view in views:
            if view == DISC_VIEW:
                if self.disc is None:
                    raise ValueError("this model has no discriminative stage (view 'disc'): fit it with "
                                     "fit.discriminator=true")
                out[view] = self.disc(maps)
            else:
                out[view] = self.fusions[view](maps)
        return out

    def forward(self, images: Tensor) -> InferenceOutput:
        fused = self.view_maps(self.six_maps(images), self.views)
        scores = {view: image_score(m, self.score_spec) for view, m in fused.items()}
        decision = scores[self.decision]
        return InferenceOutput(
            score=decision,
            normalized_score=self.normalization(decision),
            label=decision > self.threshold,
            anomaly_map=fused[self.decision],
            stpm_score=scores["stpm"],
            recon_score=scores["recon"],
            disc_score=scores[DISC_VIEW] if DISC_VIEW in scores else torch.full_like(decision, float("nan")),
        )


class Scorer(Protocol):
    """What scores images: a `Detector` (PyTorch) or a loaded export (`dualstpm.backends`)."""

    image_size: int  # side of the square input, px
    batch_size: int
    threshold: float  # stored decision threshold, raw score units
    spec: FusionSpec  # the fusion of the decision view (for the overlays' colour scale)
    map_stats: MapStats  # validation statistics of the six maps
    decision_view: str  # the view it decides with: fused, chosen, disc, stpm or recon

    def typical_level(self) -> float:
        """The decision view's map value at a typical good pixel (the overlays' transparent end)."""

    def infer(self, images: Tensor) -> InferenceOutput:
        """(N, 3, S, S) float images in [0, 1] -> the inference module's outputs."""
