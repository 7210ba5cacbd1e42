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
`score` (N,) raw fused image score (the fused map reduced by the `score` spec: its max,
top-k mean or smoothed max, :func:`dualstpm.fusion.image_score`), `normalized_score` (N,) in
[0, 1] with 0.5 at the threshold (:class:`~dualstpm.models.anomaly_map.ScoreNormalization`),
`label` (N,) bool, True = defective (score > threshold), `anomaly_map` (N, H, W) fused map
(raw units), `stpm_score` and `recon_score` (N,) each branch alone, as trained (same reduction).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from dualstpm.fusion import VIEWS, FusionSpec, ScoreSpec, image_score
from dualstpm.models.anomaly_map import MapFusion, ScoreNormalization
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
        threshold: the fused view's decision threshold (raw score units).
        val_min: the fused view's lowest validation image score (for the normalised score).
        score: how every view's map becomes an image score (the calibration's reduction:
            the threshold and val_min are in its units).
        chunked: compute distances a few images at a time (eager speed); set False before
            tracing or exporting, so that one graph serves any batch size.
    """

    def __init__(self, network: DualStpmModel, fused: FusionSpec, trained: FusionSpec, map_mean: Tensor,
                 map_std: Tensor, threshold: float, val_min: float, chunked: bool = True, *,
                 score: ScoreSpec) -> None:
        super().__init__()
        self.network = network.eval()
        specs = {"fused": fused, **{view: trained.view(view) for view in VIEWS if view != "fused"}}
        self.fusions = nn.ModuleDict({view: MapFusion(spec, map_mean, map_std) for view, spec in specs.items()})
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
        """Six raw maps -> {view: (N, H, W) fused map} for `fused`, `stpm`, `recon`."""
        return {view: self.fusions[view](maps) for view in views}

    def forward(self, images: Tensor) -> InferenceOutput:
        fused = self.view_maps(self.six_maps(images))
        scores = {view: image_score(m, self.score_spec) for view, m in fused.items()}
        return InferenceOutput(
            score=scores["fused"],
            normalized_score=self.normalization(scores["fused"]),
            label=scores["fused"] > self.threshold,
            anomaly_map=fused["fused"],
            stpm_score=scores["stpm"],
            recon_score=scores["recon"],
        )
