"""Training the discriminative stage (METHOD.md §5b) on synthetic defects of TRAINING images.

After both branches are trained and selected, the frozen two-branch model computes the six
maps of (a) the clean training images and (b) `disc.copies` defective copies of each, made
by `dualstpm.ablation.defects.paste_defects` (cut-paste, scratches, smooth textures; exact
masks). Those maps are computed once and cached at stride 4 (``pooled_log``: the networks'
forward pass is the cost), then `Discriminator` is trained for `disc.epochs` epochs on the
cache with focal loss (gamma 2) + soft dice against the masks' per-cell defect fraction,
as DeSTSeg trains its segmentation network (focal + a region term).

Selection: after each epoch the clean validation images (label 0) and `disc.val_copies`
synthetic defective copies of them (label 1) are scored (image score of the view's map);
the epoch with the highest image AUROC is kept, ties going to the lower validation loss.
Validation images are good training-folder images held out by the seeded split: no real
defect, no validation defect and no test image is ever seen. `train_discriminator`
receives only image tensors, never paths; the fit passes it its train and validation split.

Randomness is the stage's own: initial weights under `rng.own_rng(seed)`, the shuffle and
the defects from generators seeded with `seed`; the global RNGs are left as they were.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dualstpm import metrics
from dualstpm.ablation.defects import paste_defects
from dualstpm.config import DiscParams
from dualstpm.model.discriminator import STRIDE, Discriminator, pooled_log
from dualstpm.model.fusion import MAX_SCORE, image_score
from dualstpm.rng import own_rng

DEFECT_CHUNK = 64  # images made defective at a time (cut-paste draws its patches within a chunk)
FOCAL_GAMMA = 2.0

#: (B, 3, S, S) images in [0, 1] -> (B, 2, 3, S, S) float32 raw maps of the frozen model, on the CPU
MapsOf = Callable[[Tensor], Tensor]


@dataclass
class DiscResult:
    """A trained discriminator with how it was chosen and what it cost."""

    module: Discriminator
    selected_epoch: int
    seconds: float  # wall time of the whole stage: defects, maps, training, selection
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        """What calibration.json records about the stage."""
        best = self.history[self.selected_epoch - 1]
        return {"selected_epoch": self.selected_epoch, "train_seconds": self.seconds,
                "val_image_auroc": best["val_image_auroc"], "val_loss": best["val_loss"]}


@dataclass
class _CachedSet:
    """Pooled log maps (N, 6, h, w), defect fractions (N, h, w) and image labels (N,) of a set."""

    inputs: Tensor
    targets: Tensor
    labels: np.ndarray


def _with_defects(images: Tensor, kinds: list[str], copies: int, seed: int) -> tuple[Tensor, Tensor]:
    """`copies` defective copies of each image (chunked): images (N*copies, 3, H, W), masks (N*copies, H, W)."""
    out_images, out_masks = [], []
    for start in range(0, len(images), DEFECT_CHUNK):
        defective, masks, _ = paste_defects(images[start : start + DEFECT_CHUNK], kinds, copies,
                                            seed * 1_000_003 + start)
        out_images.append(defective)
        out_masks.append(torch.from_numpy(masks))
    return torch.cat(out_images), torch.cat(out_masks)


def _cache(maps_of: MapsOf, images: Tensor, masks: Tensor | None, batch_size: int,
           scale: torch.Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Pooled log maps (N, 6, h, w) of `images`, their masks' defect fraction per cell (N, h, w)
    (zeros without masks) and, when `scale` is a (2, 3) float64 zero tensor, the per-map
    sums of the raw maps added into it (for the mean s)."""
    inputs = []
    for start in range(0, len(images), batch_size):
        maps = maps_of(images[start : start + batch_size]).float()
        if scale is not None:
            scale += maps.double().sum(dim=(0, 3, 4))
        inputs.append(pooled_log(maps))
    height, width = images.shape[-2:]
    if masks is None:
        targets = torch.zeros(len(images), height // STRIDE, width // STRIDE)
    else:
        targets = F.avg_pool2d(masks.float()[:, None], STRIDE)[:, 0]
    return torch.cat(inputs), targets


def _loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Focal loss (gamma 2, Lin et al. 2017, with soft targets t) + soft dice (1 - 2|P T| / (|P| + |T|)).

    logits, targets: (B, h, w); targets in [0, 1]. The dice term is over the whole batch, so
    a batch of clean images only (|T| = 0) pushes P towards 0.
    """
    probability = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = probability * targets + (1 - probability) * (1 - targets)
    focal = ((1 - p_true) ** FOCAL_GAMMA * bce).mean()
    dice = 1 - (2 * (probability * targets).sum() + 1) / (probability.sum() + targets.sum() + 1)
    return focal + dice


def build_sets(maps_of: MapsOf, train_images: Tensor, val_images: Tensor, params: DiscParams, seed: int,
               batch_size: int) -> tuple[_CachedSet, _CachedSet, Tensor]:
    """The cached training set (clean + defective training images), the cached validation set
    (clean + defective validation images) and the scale s (2, 3): the per-map mean of the raw
    maps of the clean training images."""
    sums = torch.zeros(2, 3, dtype=torch.float64)
    clean, clean_t = _cache(maps_of, train_images, None, batch_size, sums)
    scale = (sums / (len(train_images) * train_images.shape[-1] * train_images.shape[-2])).float().clamp_min(1e-12)
    defective_images, masks = _with_defects(train_images, list(params.kinds), params.copies, seed)
    defective, defective_t = _cache(maps_of, defective_images, masks, batch_size)
    del defective_images
    train = _CachedSet(torch.cat([clean, defective]), torch.cat([clean_t, defective_t]),
                       np.r_[np.zeros(len(clean), np.int8), np.ones(len(defective), np.int8)])
    val_defective_images, val_masks = _with_defects(val_images, list(params.kinds), params.val_copies, seed + 1)
    val_clean, val_clean_t = _cache(maps_of, val_images, None, batch_size)
    val_defective, val_defective_t = _cache(maps_of, val_defective_images, val_masks, batch_size)
    val = _CachedSet(torch.cat([val_clean, val_defective]), torch.cat([val_clean_t, val_defective_t]),
                     np.r_[np.zeros(len(val_clean), np.int8), np.ones(len(val_defective), np.int8)])
    return train, val, scale


@torch.no_grad()
def _validate(disc: Discriminator, val: _CachedSet, batch_size: int, size: tuple[int, int],
              device: torch.device) -> dict[str, float]:
    """Validation loss (mean over batches) and image AUROC of clean vs synthetic-defective validation images."""
    disc.eval()
    losses, scores = [], []
    for start in range(0, len(val.inputs), batch_size):
        logits = disc.head(disc.shift(val.inputs[start : start + batch_size].to(device)))
        losses.append(_loss(logits, val.targets[start : start + batch_size].to(device)).item())
        full = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        scores.append(image_score(full, MAX_SCORE).cpu())  # selection on the max, as the branches'
    auroc = metrics.image_auroc(val.labels, torch.cat(scores).numpy().astype(np.float64))
    return {"val_loss": float(np.mean(losses)), "val_image_auroc": float("nan") if auroc is None else float(auroc)}


def train_discriminator(maps_of: MapsOf, train_images: Tensor, val_images: Tensor, params: DiscParams, seed: int,
                        batch_size: int, device: torch.device | str = "cpu",
                        log: Callable[[str], None] | None = None) -> DiscResult:
    """Train and select the discriminator (module docstring).

    Args:
        maps_of: the frozen model's six maps of an image batch (see :data:`MapsOf`).
        train_images: (N, 3, S, S) good training images in [0, 1]: the only images defects are pasted on
            for training.
        val_images: (M, 3, S, S) good validation images in [0, 1]: selection only.
        params: the `disc.*` params; seed: `params.seed` of the fit; batch_size: images per forward pass
            of the frozen model (`fit.batch_size`).
    Returns a :class:`DiscResult` holding the selected epoch's weights, in eval mode on the CPU.
    """
    started = time.perf_counter()
    device = torch.device(device)
    size = tuple(train_images.shape[-2:])  # (H, W) of the images, at which maps are scored
    train, val, scale = build_sets(maps_of, train_images, val_images, params, seed, batch_size)
    with own_rng(seed):
        disc = Discriminator(params.width, scale).to(device)
    optimizer = torch.optim.Adam(disc.parameters(), lr=params.lr)
    best: tuple[float, float] = (-math.inf, -math.inf)
    best_state, best_epoch, history = None, 0, []
    for epoch in range(1, params.epochs + 1):
        disc.train()
        order = torch.randperm(len(train.inputs), generator=torch.Generator().manual_seed(seed * 1_000_003 + 7919 + epoch))
        total = 0.0
        for start in range(0, len(order), params.batch_size):
            index = order[start : start + params.batch_size]
            if len(index) < 2:  # BatchNorm needs two samples: a lone last one sits this epoch out
                continue
            loss = _loss(disc.head(disc.shift(train.inputs[index].to(device))), train.targets[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        record = {"epoch": epoch, "loss": total / len(order), **_validate(disc, val, params.batch_size, size, device)}
        history.append(record)
        if log is not None:
            log("  ".join(f"disc {k} {v:.5g}" if isinstance(v, float) else f"disc {k} {v}" for k, v in record.items()))
        key = (np.nan_to_num(record["val_image_auroc"], nan=-1.0), -record["val_loss"])
        if key > best:
            best, best_epoch, best_state = key, epoch, copy.deepcopy(disc.state_dict())
    disc.load_state_dict(best_state)
    disc = disc.cpu().eval()
    return DiscResult(disc, best_epoch, time.perf_counter() - started, history)

