"""The leak test of branch B's attention gates (METHOD.md §3 "Caution", issue 11).

Branch B's decoder sees only T1's stride-32 summary, so it can only rebuild what a normal
part looks like; but its attention gates (strides 16 and 8) see T2's features *of the
input image*, and through them the stride-8 and stride-4 outputs depend on the image
itself. A gate that passes anomaly cues lets the decoder copy the defect, which lowers
branch B's map exactly where the defect is.

The test: score each test image twice, once as in inference (the gates see T2's features
of the image itself, "own guides") and once with the gates fed T2's features of a normal
image instead ("normal guides"); everything else (T1's summary, the T2 features the
output is compared with) stays the image's own. If defect pixels score higher with normal
guides, the gates let B copy anomalies. The stride-16 output is taken before the first
gate, so it is the same both ways; with `model.attention=none` all three are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from dualstpm import metrics
from dualstpm.model.torch_model import PYRAMID_STRIDES, DualStpmModel, level_maps

GUIDES = ("own", "normal")


def recon_maps_with_guides(model: DualStpmModel, images: Tensor, guide_images: Tensor) -> Tensor:
    """Branch B's three maps (1 - cos, strides 4, 8, 16) of `images` while its attention gates
    see T2's features of `guide_images` instead of those of `images`.

    Args:
        model: the dual network, in eval mode (batch norm with its running statistics);
            raises ValueError in train mode rather than switching it behind the caller's back.
        images: (N, 3, H, W) float in [0, 1], on the model's device.
        guide_images: the same shape; `guide_images = images` gives the inference maps.
    Returns: (N, 3, H, W) float32 maps at input size, bilinearly upsampled as in inference.
    """
    if model.training:
        raise ValueError("recon_maps_with_guides needs the model in eval mode: call model.eval() first")
    if images.shape != guide_images.shape:
        raise ValueError(f"guide_images must have the shape of images, {tuple(images.shape)}, "
                         f"got {tuple(guide_images.shape)}")
    with torch.no_grad():
        own = model.teacher_features(images)
        guides = model.t2(guide_images)
        students = model.s2(own.t1_deep, guides)
        return level_maps(own.t2_levels, students, images.shape[-2:], chunked=True).float()


def _device(model: DualStpmModel) -> torch.device:
    return next(model.parameters()).device


def leak_test(model: DualStpmModel, test_images: Tensor, masks: Tensor | np.ndarray, normal_images: Tensor,
              batch_size: int = 8) -> dict[str, Any]:
    """Branch B's defect-pixel scores with its gates fed the image's own T2 features vs a
    normal image's.

    Args:
        model: the dual network in eval mode (see `recon_maps_with_guides`).
        test_images: (N, 3, H, W) float in [0, 1] (on any device; moved batch by batch).
        masks: (N, H, W) ground truth at image size, nonzero = defect; it needs defect and good pixels.
        normal_images: (M, 3, H, W) normal (good) images, e.g. validation good images; test
            image i is guided by normal image i mod M.
        batch_size: images per forward pass.
    Returns:
        {"guide": how the normal guides were chosen, "images", "defect_pixels",
         "levels": {"stride4" | "stride8" | "stride16": {
            "defect_mean_own", "defect_mean_normal": mean map value on defect pixels,
            "defect_mean_difference": normal - own,
            "good_mean_own", "good_mean_normal": mean map value on good pixels (those outside
                the masks, in the same images),
            "contrast_own", "contrast_normal": defect mean - good mean,
            "contrast_difference": normal - own (> 0: defects stand out more with a normal
                image's features at the gates, i.e. with their own the gates let B copy
                anomalies; a foreign guide can raise the whole map, which the defect mean
                alone would count as a leak),
            "pixel_auroc_own", "pixel_auroc_normal", "pixel_auroc_difference": normal - own}}}
    Raises ValueError for mismatched shapes, no normal image, or masks without both classes.
    """
    masks = torch.as_tensor(np.asarray(masks)).bool()
    n, _, height, width = test_images.shape
    if masks.shape != (n, height, width):
        raise ValueError(f"masks must be (N, H, W) = {(n, height, width)} for the test images, got {tuple(masks.shape)}")
    if len(normal_images) == 0 or normal_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(f"normal_images must be (M >= 1, {', '.join(map(str, test_images.shape[1:]))}), "
                         f"got {tuple(normal_images.shape)}")
    defect_pixels = int(masks.sum())
    if defect_pixels == 0 or defect_pixels == masks.numel():
        raise ValueError("the leak test needs masks with both defect and good pixels: pass defective test "
                         "images with their masks, and good ones (or good pixels around the defects)")
    device = _device(model)
    guides = normal_images[torch.arange(n) % len(normal_images)]
    maps: dict[str, list[Tensor]] = {g: [] for g in GUIDES}
    for start in range(0, n, batch_size):
        batch = test_images[start : start + batch_size].to(device)
        maps["own"].append(recon_maps_with_guides(model, batch, batch).cpu())
        maps["normal"].append(recon_maps_with_guides(model, batch, guides[start : start + batch_size].to(device)).cpu())
    stacked = {g: torch.cat(m) for g, m in maps.items()}  # (N, 3, H, W) each
    truth = masks.numpy()
    levels: dict[str, dict[str, float | None]] = {}
    for level, stride in enumerate(PYRAMID_STRIDES):
        mean = {g: float(m[:, level][masks].double().mean()) for g, m in stacked.items()}
        good = {g: float(m[:, level][~masks].double().mean()) for g, m in stacked.items()}
        contrast = {g: mean[g] - good[g] for g in GUIDES}
        auroc = {g: metrics.pixel_auroc(truth, m[:, level].numpy()) for g, m in stacked.items()}
        levels[f"stride{stride}"] = {
            **{f"defect_mean_{g}": mean[g] for g in GUIDES},
            "defect_mean_difference": mean["normal"] - mean["own"],
            **{f"good_mean_{g}": good[g] for g in GUIDES},
            **{f"contrast_{g}": contrast[g] for g in GUIDES},
            "contrast_difference": contrast["normal"] - contrast["own"],
            **{f"pixel_auroc_{g}": auroc[g] for g in GUIDES},
            "pixel_auroc_difference": auroc["normal"] - auroc["own"],  # type: ignore[operator]  # both classes checked above
        }
    return {"guide": f"normal_images[i mod {len(normal_images)}] for test image i", "images": n,
            "defect_pixels": defect_pixels, "levels": levels}
