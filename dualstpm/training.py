"""Training both branches on one category (METHOD.md §5), with checkpoints and resume.

The loop is plain PyTorch: two students, two SGD optimisers, frozen teachers. After every
epoch the validation images pick the best checkpoint per branch (`fit.select`: lowest mean
image score, or lowest mean of the anomaly map as the released STPM code does) and a
checkpoint is written atomically, so an interrupted fit continues with `--resume` and ends
where an uninterrupted one would have.

The validation images are split in two disjoint, seeded parts (`validation_parts`,
`calibration.split`): the *selection* part picks the epoch, the *calibration* part then
measures the map statistics and sets the thresholds. A threshold set on the images that
also chose the epoch is biased low (the chosen epoch is the one that scores those very
images lowest), so its false-alarm rate on new good parts would exceed the target. A
split, not cross-fitting: one model is shipped, so there is one epoch choice, and the
thresholds must be measured on images that choice never saw.

Real defects (``validation/<defect_type>/``, `dualstpm.real_defects`): when the category has
them, each branch keeps the epoch with the best image AUROC (and, with masks, pixel AUROC)
of those defects against the selection part, instead of `fit.select`'s good-image
statistic; the AUROCs of every view are printed and recorded after calibration. They are
never trained on.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.markup import escape
from rich.progress import MofNCompleteColumn, Progress, TimeRemainingColumn
from torch import Tensor

from dualstpm.budget import FitPlan, epochs_text, plan_fit
from dualstpm.compute import Compute
from dualstpm.config import FitParams, Params
from dualstpm.data import (
    Category, ValidationParts, decode_images, image_shapes, load_category, split_train_val, validation_parts,
)
from dualstpm.data.input_stats import input_reference
from dualstpm.detector import Calibration, build_network, save_detector
from dualstpm.disc_training import DiscResult, train_discriminator
from dualstpm.errors import TrainingError
from dualstpm.feature_cache import TeacherFeatureCache
from dualstpm.files import atomic_file
from dualstpm.fit_check import FitCheck, FitEvidence, check_fit
from dualstpm.model import inference
from dualstpm.model.calibration import (MapStatsAccumulator, calibrate_pixel_threshold, calibrate_threshold,
                                        calibration_note, summarize)
from dualstpm.model.fusion import BRANCHES, MAX_SCORE, FusionSpec, ScoreSpec, fuse
from dualstpm.model.inference import MapViews, RawMaps
from dualstpm.model.memory import MEMORY_LEVELS, MemoryBank, MemoryStats, flatten_patches, patch_features
from dualstpm.model.tiling import Tiling
from dualstpm.model.torch_model import DualStpmModel
from dualstpm.progress import StatusColumn, progress_bar, say, stage
from dualstpm.project import params_for_data, recorded_data_root
from dualstpm.real_defects import GOOD_IMAGES_ONLY, RealDefects, describe_views, selection_value, view_evidence
from dualstpm.rng import own_rng
from dualstpm.rundir import CHECKPOINT_FILE, DISC_HISTORY_FILE, HISTORY_FILE
from dualstpm.sizes import describe, to_json

EpochCallback = Callable[[dict[str, float]], None]


@dataclass
class FitResult:
    run_dir: Path
    model_dir: Path
    history: list[dict[str, float]]
    selected_epochs: dict[str, int]
    thresholds: dict[str, float]
    disc_seconds: float | None = None  # wall time of the discriminative stage (None: not trained)
    validation_evidence: dict | None = None  # calibration.json's `validation_evidence` (`fit_evidence`)
    #: the fit check (`fit_check.FitCheck.to_json`, also in calibration.json); None: not run
    fit_check: dict | None = None


def seed_everything(seed: int) -> None:
    """Seed the process-wide RNGs (for scripts driving third-party code, e.g. anomalib).
    A fit never calls it: its randomness is its own (:func:`build_model`, :func:`epoch_order`)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(params: Params, compute: Compute) -> DualStpmModel:
    """The network of a new fit on `compute`: teachers with their weights, students
    initialised from `params.seed` alone. The draws come from the fit's own generators
    (:func:`dualstpm.rng.own_rng`), so threads building or training beside it change
    nothing, and the process's global RNG is left as it was."""
    with own_rng(params.seed):
        return compute.module(build_network(params.model))


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffle of one epoch depends only on (seed, epoch), so a resumed run replays it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


def learning_rate(fit: FitParams, epoch: int, batch: int, n_batches: int) -> float:
    """The learning rate of batch `batch` (0-based) of epoch `epoch` (1-based) under `fit.schedule`.

    `constant`: `fit.lr`. `cosine`: `fit.lr * (1 + cos(pi * t / T)) / 2` with `t` the steps
    taken before this one and `T = fit.epochs * n_batches` (SGDR without restarts, Loshchilov &
    Hutter, ICLR 2017): `fit.lr` on the first step, falling towards 0 on the last. A pure
    function of its arguments, so a resumed fit replays the same rates."""
    if fit.schedule == "constant":
        return fit.lr
    step, steps = (epoch - 1) * n_batches + batch, fit.epochs * n_batches
    return fit.lr * (1.0 + math.cos(math.pi * step / steps)) / 2.0


@torch.no_grad()
def raw_maps(model: DualStpmModel, images: Tensor, compute: Compute, tiling: Tiling | None = None,
             memory: MemoryBank | None = None) -> RawMaps:
    """Eval-mode :class:`RawMaps` of one batch (`inference.raw_maps`, tiled with `tiling`: the
    images are then frames): six maps, and the memory map with `memory`; float32 on the CPU."""
    model.eval()
    with compute.autocast():
        raw = inference.raw_maps(model, compute.images(images), memory, tiling=tiling)
    return RawMaps(raw.six.cpu(), None if raw.memory is None else raw.memory.cpu())


def six_maps(model: DualStpmModel, images: Tensor, compute: Compute, tiling: Tiling | None = None) -> Tensor:
    """Eval-mode maps (B, 2, 3, H, W) of one batch (:func:`raw_maps` without a memory bank)."""
    return raw_maps(model, images, compute, tiling).six


@torch.no_grad()
def build_memory(model: DualStpmModel, train_images: Tensor, compute: Compute, *, ratio: float, sigma: float,
                 seed: int, batch_size: int) -> MemoryBank:
    """The memory bank (`dualstpm.model.memory`) of the good training images (N, 3, H, W): T1's
    patch features (strides 8 and 16) of every image, in the inference precision, `batch_size`
    at a time, and a greedy coreset of `ratio` of them (seeded by `seed`); its map is blurred
    by `sigma` px. No training: T1 is frozen. On `compute`'s device."""
    compute = compute.for_inference()
    model.eval()
    features = []
    with stage("building the memory bank", len(train_images)) as progress:
        for start in range(0, len(train_images), batch_size):
            batch = train_images[start : start + batch_size]
            with compute.autocast():
                levels = model.t1(compute.images(batch))
            features.append(flatten_patches(patch_features([levels[i].float() for i in MEMORY_LEVELS])).cpu())
            progress.advance(len(batch))
    patches = torch.cat(features)
    memory = MemoryBank.build(patches, ratio, seed=seed, sigma=sigma)
    say(f"memory bank: {len(memory.bank)} of {len(patches)} training patches ({ratio:g}), "
        f"{memory.bank.shape[1]} features each")
    return memory.to(compute.device)


#: `fit.select` -> the per-image statistic whose mean over validation images selects the epoch.
SELECTION_STATISTICS = {"score_mean": "score", "map_mean": "map_mean"}


def branch_statistics(model: DualStpmModel, images: Tensor, spec: FusionSpec, batch_size: int,
                      compute: Compute, keep_maps: bool = False,
                      tiling: Tiling | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per branch, on raw maps of that branch alone (its view under `spec`), two (N,) arrays
    over the N images: `score`, the image score (max of the map), and `map_mean`, the mean
    of the map over its pixels. Their means over images are the model-selection signals
    (`fit.select`); all images have the same size, so the mean of `map_mean` is the mean
    over every validation pixel. With `keep_maps`, also `maps`: the (N, S, S) maps
    themselves (float32), for the pixel AUROC of real defects. With `tiling`, `images` are
    frames, scored tile by tile and stitched (`six_maps`)."""
    keys = ("score", "map_mean", "maps") if keep_maps else ("score", "map_mean")
    stats: dict[str, dict[str, list[Tensor]]] = {b: {k: [] for k in keys} for b in BRANCHES}
    views = MapViews(spec, None, score=MAX_SCORE)
    for start in range(0, len(images), batch_size):
        scored = views.score_maps(six_maps(model, images[start : start + batch_size], compute, tiling), BRANCHES)
        for branch in BRANCHES:
            stats[branch]["score"].append(scored.scores[branch].cpu())
            stats[branch]["map_mean"].append(scored.maps[branch].flatten(1).mean(dim=1).cpu())
            if keep_maps:
                stats[branch]["maps"].append(scored.maps[branch].float().cpu())
    return {b: {k: torch.cat(v).numpy() for k, v in s.items()} for b, s in stats.items()}


def _state_copy(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _atomic_save(obj: dict, path: Path) -> None:
    with atomic_file(path) as tmp:
        torch.save(obj, tmp)


#: fit keys that do not change what an epoch computes, so a resumed fit may change them
#: (epochs only upwards: see `check_resumable`).
RESUMABLE_FIT_KEYS = ("epochs", "device", "cache", "cache_ram_gb", "discriminator",  # the stage runs after the epochs
                      "recipe", "real", "min_val_auroc")  # the budget (its image size is image_size's) and the check


class FitInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM during a fit, with what is safe on disk: `epochs_done`
    epochs in `checkpoint` (0: nothing to resume). Still a KeyboardInterrupt, so everything
    that stops on one stops. `exit_code` is the shell's for that signal: 130 (SIGINT) or
    143 (SIGTERM)."""

    def __init__(self, epochs_done: int, epochs: int, checkpoint: Path,
                 signal_number: int = signal.SIGINT) -> None:
        self.epochs_done, self.epochs, self.checkpoint = epochs_done, epochs, checkpoint
        self.signal_number = signal.Signals(signal_number)
        if epochs_done:
            what = f"epoch {epochs_done} of {epochs} is checkpointed in {checkpoint}"
        else:
            what = "no epoch finished, nothing is checkpointed: run the same command again"
        super().__init__(what)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as a shell reports a process that signal ended."""
        return 128 + int(self.signal_number)

    @property
    def cause(self) -> str:
        """`interrupted` (Ctrl-C) or `stopped by SIGTERM`."""
        return "interrupted" if self.signal_number == signal.SIGINT else f"stopped by {self.signal_number.name}"


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived during a fit (:func:`stop_signals`): it stops like Ctrl-C."""


@dataclass
class StopRequest:
    """The stop signal that arrived inside :func:`stop_signals` (None: none yet).

    The handler raises at once (unless inside :meth:`deferred`); this record is the backstop
    for the rare case where that exception is lost: Python drops an exception raised inside
    a finalizer, and a library that catches BaseException (a database driver cleaning up,
    say) may not re-raise it. A fit would then train on as if Ctrl-C had never been pressed,
    so the epoch loop calls :meth:`check` after every epoch."""

    signal_number: int | None = None
    deferring: bool = False

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside, a stop signal is only recorded, and raised on leaving the block: for work
        that must not be cut mid-way, such as an epoch's tracking write (SQLAlchemy, under
        MLflow, logs and swallows an interrupt raised inside it)."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        self.check()

    def check(self) -> None:
        """Raise the stop again (Terminated for SIGTERM, KeyboardInterrupt for SIGINT) if one arrived."""
        if self.signal_number == signal.SIGTERM:
            raise Terminated(signal.SIGTERM.name)
        if self.signal_number is not None:
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Inside the block, Ctrl-C (SIGINT) raises KeyboardInterrupt and SIGTERM (a scheduler or
    `kill` stopping the job) raises :class:`Terminated` in the main thread, so a fit stops as
    on Ctrl-C and says what is checkpointed; each also sets the yielded :class:`StopRequest`.
    The handlers there before are restored on leaving the block.

    Nothing changes where Python cannot or should not handle a signal: outside the main
    thread (a fit in a thread pool, e.g. Prefect's task runner) and where the process already
    has a handler of its own for it (or ignores it): that choice is the caller's. Python's
    own Ctrl-C handler (`signal.default_int_handler`) and SIGTERM's default are replaced.
    """
    request = StopRequest()
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def stop(signum: int, frame: Any) -> None:
        request.signal_number = signum
        if not request.deferring:
            request.check()

    replaced = [number for number, default in defaults.items() if signal.getsignal(number) == default]
    for number in replaced:
        signal.signal(number, stop)
    try:
        yield request
    finally:
        for number in replaced:
            signal.signal(number, defaults[number])


def training_signature(params: Params) -> dict[str, Any]:
    """The params that shape the weights and history of every epoch: image size, seed, the
    model, the fit (but `RESUMABLE_FIT_KEYS`), the fusion mode model selection scores with,
    `calibration.split` (which validation images select) and, when enabled, the tiling. Data, tracking, ablation,
    Prefect, the final fusion and the false-alarm rate are not in it."""
    fit = {k: v for k, v in params.fit.model_dump(mode="json").items() if k not in RESUMABLE_FIT_KEYS}
    return {"image_size": to_json(params.image_size), "seed": params.seed, "model": params.model.model_dump(mode="json"),
            "fit": fit, "fusion": {"mode": params.fusion.mode}, "calibration": {"split": params.calibration.split},
            **({"tiling": params.tiling.model_dump(mode="json")} if params.tiling.enabled else {})}


def _files_digest(paths: Sequence[Path], root: Path) -> str:
    """md5 of the (relative path, size) list: the same files give the same digest wherever they lie."""
    listing = [(p.relative_to(root).as_posix(), p.stat().st_size) for p in paths]
    return hashlib.md5(json.dumps(listing).encode()).hexdigest()


def data_signature(dataset: Category, train_paths: Sequence[Path], val_paths: Sequence[Path]) -> dict[str, Any]:
    """What a fit was trained and selected on: the category, and its training and validation
    files (relative paths and sizes, so a moved copy of the same data is the same data);
    with real validation defects, their files and masks too (`validation_defects`)."""
    signature = {
        "category": dataset.name,
        "train": {"images": len(train_paths), "files_md5": _files_digest(train_paths, dataset.root)},
        "validation": {"images": len(val_paths), "files_md5": _files_digest(val_paths, dataset.root)},
    }
    if dataset.validation_defects:
        files = [p for s in dataset.validation_defects for p in (s.path, s.mask_path) if p is not None]
        signature["validation_defects"] = {"images": len(dataset.validation_defects),
                                           "files_md5": _files_digest(files, dataset.root)}
    return signature


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """`key: saved -> now` for every dotted key whose value differs."""
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            yield from _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            yield f"{prefix}{key}: {a!r} in the checkpoint, {b!r} now"


def check_resumable(checkpoint: Mapping[str, Any], params: Params, data: Mapping[str, Any], path: Path) -> None:
    """Raise TrainingError unless `checkpoint` continues into this fit: same data and split,
    same training-shaping params (`training_signature`), and no more epochs than fit.epochs."""
    if "signature" not in checkpoint or "data" not in checkpoint:
        raise TrainingError(f"cannot resume from {path}: it was written by an older dualstpm that did not record "
                            "its data and params. Start again with --overwrite.")
    differences = [*_differences({"data": checkpoint["data"]}, {"data": dict(data)}),
                   *_differences(checkpoint["signature"], training_signature(params))]
    if differences:
        raise TrainingError(
            f"cannot resume from {path}: it was trained differently:\n  " + "\n  ".join(differences) + "\n"
            "Resume with the data and params it was trained with, or start again with --overwrite "
            f"(only {', '.join('fit.' + k for k in RESUMABLE_FIT_KEYS)} may change; data.*, tracking.*, "
            "ablation.* and prefect.* do not matter)."
        )
    done = int(checkpoint["epoch"])
    planned = int(checkpoint["params"]["fit"]["epochs"])
    if params.fit.schedule == "cosine" and planned != params.fit.epochs:
        raise TrainingError(
            f"cannot resume from {path}: it was trained with fit.schedule=cosine over fit.epochs={planned}, "
            f"and the cosine rate of every step depends on that length, so fit.epochs={params.fit.epochs} would not "
            f"continue it. Resume with --set fit.epochs={planned}, or start again with --overwrite."
        )
    if done > params.fit.epochs:
        raise TrainingError(
            f"cannot resume from {path}: it holds {done} epochs but fit.epochs={params.fit.epochs}. "
            f"Continue it with fit.epochs >= {done} (e.g. --set fit.epochs={done}), "
            f"or start again with --overwrite to train {params.fit.epochs}."
        )


class Trainer:
    """Holds the state of one fit: model, optimisers, best checkpoints, history."""

    def __init__(self, params: Params, run_dir: Path, compute: Compute, data: Mapping[str, Any],
                 branches: tuple[str, ...] = BRANCHES, real: RealDefects | None = None) -> None:
        """`branches`: the students `train_epoch` trains (a fit trains both; `dualstpm bench`
        also times each alone with this same loop). `real`: the category's real validation
        defects, which then select the epochs (`select`)."""
        self.params = params
        self.real = real
        self.branches = branches
        self.data = dict(data)
        self.run_dir = run_dir
        self.compute = compute
        self.checkpoint_path = run_dir / CHECKPOINT_FILE
        self.model = build_model(params, compute)
        fit = params.fit
        self.optimizers = {
            name: torch.optim.SGD(student.parameters(), lr=fit.lr, momentum=fit.momentum, weight_decay=fit.weight_decay)
            for name, student in self.model.students().items() if name in branches
        }
        self.best: dict[str, dict] = {b: {"score": math.inf, "epoch": 0, "state": None} for b in BRANCHES}
        self.history: list[dict[str, float]] = []
        self.epochs_done = 0
        self.epochs_saved = 0  # the epoch the checkpoint on disk holds
        self.selection_spec = FusionSpec(mode=params.fusion.mode, weights=FusionSpec().weights)

    # --- checkpoints -----------------------------------------------------------
    def save_checkpoint(self) -> None:
        _atomic_save(
            {
                "epoch": self.epochs_done,
                "params": self.params.to_dict(),
                "signature": training_signature(self.params),
                "data": self.data,
                "students": {n: s.state_dict() for n, s in self.model.students().items()},
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "best": self.best,
                "history": self.history,
            },
            self.checkpoint_path,
        )
        self.epochs_saved = self.epochs_done

    def load_checkpoint(self, checkpoint: Mapping[str, Any]) -> None:
        """Continue from a checkpoint `check_resumable` accepted."""
        for name, student in self.model.students().items():
            student.load_state_dict(checkpoint["students"][name])
            self.optimizers[name].load_state_dict(checkpoint["optimizers"][name])
        self.best = checkpoint["best"]
        self.history = list(checkpoint["history"])
        self.epochs_done = self.epochs_saved = int(checkpoint["epoch"])

    # --- one epoch -----------------------------------------------------------------
    def train_epoch(self, images: Tensor, progress: Progress, cache: TeacherFeatureCache | None = None) -> dict[str, float]:
        epoch = self.epochs_done + 1
        fit = self.params.fit
        self.model.train()
        order = epoch_order(len(images), self.params.seed, epoch)
        n_batches = math.ceil(len(images) / fit.batch_size)
        task = progress.add_task(f"epoch {epoch}/{fit.epochs}", total=n_batches, status="")
        totals = {b: 0.0 for b in self.branches}
        for index in range(n_batches):
            indices = order[index * fit.batch_size : (index + 1) * fit.batch_size]
            rate = learning_rate(fit, epoch, index, n_batches)
            for optimizer in self.optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = rate
            batch = self.compute.images(images[indices])
            teachers = cache.batch(indices, self.compute) if cache is not None else None
            with self.compute.autocast():
                losses = self.model.losses(batch, teachers, self.branches, fit.loss_scale)
            for branch, loss in losses.items():
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the {branch} branch loss became {loss.item()} at epoch {epoch}, batch {index + 1}. "
                        f"Lower the learning rate (fit.lr={fit.lr}, e.g. --set fit.lr={fit.lr / 10:g}); "
                        f"the last completed epoch is kept in {self.checkpoint_path}."
                    )
            for optimizer in self.optimizers.values():
                optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()  # the branches share no parameters: one backward serves both
            for optimizer in self.optimizers.values():
                optimizer.step()
            for branch, loss in losses.items():
                totals[branch] += loss.item() * len(batch)
            progress.update(task, advance=1, status=" ".join(f"{b} {l.item():.4f}" for b, l in losses.items()))
        progress.remove_task(task)
        return {f"loss_{b}": totals[b] / len(images) for b in self.branches}

    def select(self, val_images: Tensor) -> dict[str, float]:
        """Keep each branch's checkpoint with the lowest mean over validation images of the
        `fit.select` statistic: `score_mean`, the image score (max of the branch's map), or
        `map_mean`, the mean of the branch's map (the released STPM code). Returns both
        means per branch (`val_score_<branch>`, `val_map_mean_<branch>`) for the history.

        With real defects (`self.real`) the branch keeps instead the epoch with the highest
        `real_defects.selection_value` of them against `val_images` (its image AUROC, with
        masks also its pixel AUROC), and the history gets `val_real_image_auroc_<branch>`
        (and `val_real_pixel_auroc_<branch>`) too. Ties keep the earlier epoch.
        Raises TrainingError naming the epoch and branch when a score is not finite."""
        real = self.real
        spec, batch_size = self.selection_spec, self.params.fit.batch_size
        tiling = self.params.tiling_spec()
        stats = branch_statistics(self.model, val_images, spec, batch_size, self.compute, keep_maps=real is not None,
                                  tiling=tiling)
        self._check_finite(stats, "validation images")
        record = {**{f"val_score_{b}": float(np.mean(s["score"])) for b, s in stats.items()},
                  **{f"val_map_mean_{b}": float(np.mean(s["map_mean"])) for b, s in stats.items()}}
        if real is None:
            key = SELECTION_STATISTICS[self.params.fit.select]
            losses = {b: float(np.mean(stats[b][key])) for b in BRANCHES}
        else:
            defects = branch_statistics(self.model, real.images, spec, batch_size, self.compute, keep_maps=True,
                                        tiling=tiling)
            self._check_finite(defects, "real validation defects")
            evidence = {b: real.auroc(stats[b]["score"], stats[b]["maps"], defects[b]["score"], defects[b]["maps"])
                        for b in BRANCHES}
            losses = {b: -selection_value(evidence[b]) for b in BRANCHES}  # lower is better, as the rule's means
            record.update({f"val_real_{metric}_{b}": float("nan") if value is None else value
                           for b, figures in evidence.items() for metric, value in figures.items()})
        for branch, student in self.model.students().items():
            if losses[branch] < self.best[branch]["score"]:  # "score": the selection value, whichever the rule
                self.best[branch] = {"score": losses[branch], "epoch": self.epochs_done, "state": _state_copy(student)}
        return record

    def _check_finite(self, stats: dict[str, dict[str, np.ndarray]], what: str) -> None:
        """TrainingError naming the branch and epoch when an image score of `what` is not finite."""
        for branch, values in ((b, s["score"]) for b, s in stats.items()):
            bad = int(np.count_nonzero(~np.isfinite(values)))
            if bad:
                fit = self.params.fit
                raise TrainingError(
                    f"the {branch} branch gave {bad} of {len(values)} {what} a non-finite score "
                    f"(NaN or inf) after epoch {self.epochs_done}, although its training loss was finite: its maps "
                    f"overflow. Lower the learning rate (fit.lr={fit.lr}, e.g. --set fit.lr={fit.lr / 10:g}) or run in "
                    f"float32 (--set fit.precision=float32); the last completed epoch is kept in {self.checkpoint_path}."
                )

    def restore_best(self) -> dict[str, int]:
        for branch, student in self.model.students().items():
            student.load_state_dict(self.best[branch]["state"])
        return {b: int(self.best[b]["epoch"]) for b in BRANCHES}


def calibrate(model: DualStpmModel, params: Params, val_images: Tensor, compute: Compute,
              selected_epochs: dict[str, int], category: str, parts: ValidationParts | None = None,
              disc: DiscResult | None = None, memory: MemoryBank | None = None) -> Calibration:
    """Per-map validation statistics, then per-view thresholds at the target false-alarm rate
    (the view `disc` too when `disc` is given), and per-view pixel thresholds of defect regions
    at `regions.pixel_fpr` on the same images' pixels (none when it is null).

    `val_images` are the calibration part of the validation images (`validation_parts`);
    `parts`, when given, is recorded in the calibration (sizes, disjointness, its note).
    Thresholds are in the units of the image score `params.score` reduces to (recorded too).

    The validation maps are computed in the inference precision (float32, on `compute`'s
    device), whatever precision training ran in: the stored statistics, thresholds and
    validation minimum are those of the scores PyTorch inference and the float32 exports give.
    With a `memory` bank, the memory views are calibrated too, and `memory_stats` (the fused
    and memory maps' pixel mean and std on these images) standardises `fused_memory`.
    """
    batch_size = params.fit.batch_size
    compute = compute.for_inference()
    tiling = params.tiling_spec()
    maps = [raw_maps(model, val_images[i : i + batch_size], compute, tiling, memory)
            for i in range(0, len(val_images), batch_size)]
    accumulator = MapStatsAccumulator()
    for batch in maps:
        accumulator.update(batch.six)
    stats = accumulator.result()
    trained = FusionSpec.from_params(params.fusion)
    memory_stats = None if memory is None else MemoryStats.of_maps(
        torch.cat([fuse(batch.six, trained, stats) for batch in maps]), torch.cat([batch.memory for batch in maps]))
    views = MapViews(trained, stats, score=ScoreSpec.from_params(params.score),
                     disc=disc.module if disc is not None else None, memory=memory_stats)
    with torch.no_grad():
        scored = [views.score_maps(m, views.views) for m in maps]
    scores = {v: torch.cat([s.scores[v] for s in scored]).numpy() for v in views.views}
    rate, pixel_fpr = params.calibration.false_alarm_rate, params.regions.pixel_fpr
    pixel_thresholds = {} if pixel_fpr is None else {
        v: calibrate_pixel_threshold(torch.cat([s.maps[v] for s in scored]).numpy(), pixel_fpr) for v in views.views}
    return Calibration(
        image_size=params.image_size,
        frame_size=params.tiling.frame_size if params.tiling.enabled else None,
        map_stats=stats,
        thresholds={v: calibrate_threshold(s, rate) for v, s in scores.items()},
        val_score_summary={v: summarize(s) for v, s in scores.items()},
        selected_epochs=selected_epochs,
        category=category,
        false_alarm_rate=rate,
        notes=[note for note in (parts.note if parts is not None else None, calibration_note(len(val_images), rate))
               if note],
        validation_split=parts.to_json() if parts is not None else {},
        score=views.score_spec,
        discriminator=disc.summary() if disc is not None else None,
        precision=compute.precision,
        pixel_fpr=pixel_fpr,
        pixel_thresholds=pixel_thresholds,
        memory_stats=memory_stats,
    )


def fit_evidence(model: DualStpmModel, params: Params, calibration: Calibration, selection_images: Tensor,
                 real: RealDefects | None, compute: Compute, disc: DiscResult | None = None,
                 memory: MemoryBank | None = None) -> dict[str, Any]:
    """What selected the epochs, for `calibration.json` (`validation_evidence`): without real
    defects ``{"evidence": "good images only", "epoch_selection": fit.select}``; with them,
    `RealDefects.describe` plus, per view of the calibrated model, the image AUROC (and
    pixel AUROC) of the real defects against `selection_images`, which are also printed."""
    if real is None:
        return {"evidence": GOOD_IMAGES_ONLY, "epoch_selection": f"fit.select={params.fit.select}"}
    inference_compute = compute.for_inference()
    views = MapViews(FusionSpec.from_params(params.fusion), calibration.map_stats, score=calibration.score,
                     disc=disc.module if disc is not None else None, memory=calibration.memory_stats)
    with torch.no_grad():
        evidence = view_evidence(views, lambda images: raw_maps(model, images, inference_compute, params.tiling_spec(),
                                                                memory),
                                 selection_images,
                                 real, params.fit.batch_size)
    say(f"validation AUROC on real defects ({real.label}, against {len(selection_images)} good selection images): "
        f"{describe_views(evidence)}")
    return {**real.describe(), "epoch_selection": f"real defects: the best {real.rule}", "views": evidence}


def fit_check(model: DualStpmModel, params: Params, calibration: Calibration, images: Tensor, compute: Compute,
              disc: DiscResult | None, plan: FitPlan, epochs_trained: int, memory: MemoryBank | None = None) -> FitCheck:
    """The fit check (`dualstpm.fit_check.check_fit`) of the calibrated model on `images` (the
    calibration part of the validation images), scored as the model will score: float32 maps,
    `calibration`'s statistics and reduction. Says the validation AUROC, and the warning
    when there is one."""
    inference_compute = compute.for_inference()
    views = MapViews(FusionSpec.from_params(params.fusion), calibration.map_stats, score=calibration.score,
                     disc=disc.module if disc is not None else None, memory=calibration.memory_stats)

    def score(batch: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            raw = raw_maps(model, batch, inference_compute, params.tiling_spec(), memory)
            return views.score_maps(raw, views.views).scores

    evidence = FitEvidence(recipe=plan.recipe, train_images=plan.train_images, image_size=params.image_size,
                           epochs=epochs_trained, steps=epochs_trained * plan.steps_per_epoch,
                           real_min_steps=params.fit.real.min_steps)
    check = check_fit(score, images, params.fusion.view, params.fit.min_val_auroc, params.seed,
                      params.fit.batch_size, evidence)
    say(check.summary())
    if check.warning is not None:
        say(f"[bold yellow]warning:[/] {check.warning}")
    return check


def fit_discriminator(model: DualStpmModel, params: Params, train_images: Tensor, val_images: Tensor,
                      compute: Compute) -> DiscResult:
    """Train the discriminative stage on the selected, frozen branches (`dualstpm.disc_training`):
    synthetic defects on the training images only, the validation images select its epoch."""
    say(f"training the discriminative stage: {params.disc.epochs} epochs, defects {params.disc.kinds}")
    result = train_discriminator(lambda images: six_maps(model, images, compute), train_images, val_images,
                                 params.disc, params.seed, params.fit.batch_size, compute.device, log=say)
    say(f"discriminative stage: epoch {result.selected_epoch} kept, trained in {result.seconds:.1f} s")
    return result


def write_history(history: list[dict[str, float]], path: Path) -> None:
    with atomic_file(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def data_trained_on(params: Params, data_root: Path, category: str, run_dir: Path) -> Params:
    """`params` whose data section records what a fit of `category` in `data_root` trained
    on, as `RUN/model/params.yaml` keeps it: `data.root` the data root as
    `project.recorded_data_root` writes it (from the run directory, inside the project;
    else absolute: valid from any working directory), `data.categories` [`category`], and
    `data.source` `folder` when that root is not `data.root` (a user's `--data-root`), as
    `project.params_for_data` logs it. Nothing the model computes depends on it."""
    described = params_for_data(params, data_root)
    data = described.data.model_copy(update={"root": recorded_data_root(data_root, run_dir), "categories": [category]})
    return described.model_copy(update={"data": data})


def check_start(run_dir: Path, *, resume: bool, overwrite: bool) -> Path:
    """The checkpoint path of `run_dir` when --resume/--overwrite fit what is there; else
    TrainingError (both flags, a checkpoint and neither flag, --resume and no checkpoint)."""
    checkpoint_path = Path(run_dir) / CHECKPOINT_FILE
    if resume and overwrite:
        raise TrainingError(
            "--resume and --overwrite contradict each other: --resume continues the checkpoint in "
            f"{run_dir}, --overwrite discards it and starts again. Pass one of them."
        )
    if checkpoint_path.exists() and not (resume or overwrite):
        raise TrainingError(
            f"{run_dir} already holds a training checkpoint: pass --resume to continue it, "
            "--overwrite to start again, or choose another --out"
        )
    if resume and not checkpoint_path.is_file():
        raise TrainingError(f"nothing to resume: {checkpoint_path} does not exist. Run without --resume.")
    return checkpoint_path


def best_epochs(trainer: Trainer) -> dict[str, int]:
    """Per branch, the epoch with the lowest validation selection value so far (0: none yet)."""
    return {branch: int(best["epoch"]) for branch, best in trainer.best.items()}


def epoch_line(record: Mapping[str, float | int], plan: FitPlan | None, seconds: float, epochs_timed: int) -> str:
    """The log line of one epoch: ``epoch 14 of 125 to 375 (2:05 so far, at most 41:38 left)``
    then each figure of `record`. `seconds`: the wall time of the `epochs_timed` epochs this
    call trained; the time left is their mean epoch time times the epochs up to the plan's
    ceiling (an upper bound under the real recipe, which may stop early). Without a plan,
    the bare epoch number."""
    epoch = int(record["epoch"])
    head = f"epoch {epoch}"
    if plan is not None:
        exact = plan.min_epochs == plan.max_epochs  # fixed: the time left is no bound but the estimate itself
        span, bound = (str(plan.max_epochs), "") if exact else (f"{plan.min_epochs} to {plan.max_epochs}", "at most ")
        left = seconds / max(epochs_timed, 1) * max(plan.max_epochs - epoch, 0)
        head += f" of {span} ({_clock(seconds)} so far, {bound}{_clock(left)} left)"
    figures = (f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items() if k != "epoch")
    return "  ".join([head, *figures])


def _clock(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour: 125.4 -> '2:05', 3725 -> '1:02:05'."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def train_epochs(trainer: Trainer, params: Params, train_images: Tensor, selection_images: Tensor, compute: Compute,
                 run_dir: Path, on_epoch: EpochCallback | None, plan: FitPlan | None = None,
                 stop_request: StopRequest | None = None) -> str:
    """Train until `plan` says stop (`FitPlan.stop_reason`; None: when `trainer` holds
    `fit.epochs` epochs), each epoch checkpointed, selected on `selection_images` and
    reported to `on_epoch`; the teacher-feature cache (`fit.cache`) lives for these epochs
    only. A stop signal during `on_epoch` is raised once it returns, and after each epoch one
    whose exception was lost is raised again (`stop_request`, :class:`StopRequest`; None: a
    request no signal sets). Returns why training ended."""
    stop_request = stop_request if stop_request is not None else StopRequest()

    def stop() -> str | None:
        if plan is None:
            return epochs_text(params.fit.epochs) if trainer.epochs_done >= params.fit.epochs else None
        return plan.stop_reason(trainer.epochs_done, best_epochs(trainer))

    columns = (MofNCompleteColumn(), TimeRemainingColumn(), StatusColumn())
    cache = None
    try:
        if params.fit.cache and stop() is None:
            cache = TeacherFeatureCache.build(
                trainer.model, train_images, params.fit.batch_size, compute, params.fit.cache_ram_gb * 2**30, run_dir
            )
        started, first_epoch = time.monotonic(), trainer.epochs_done  # a resumed fit times its own epochs
        with progress_bar(*columns) as progress:
            while stop() is None:
                losses = trainer.train_epoch(train_images, progress, cache)
                trainer.epochs_done += 1
                record = {"epoch": trainer.epochs_done, **losses, **trainer.select(selection_images)}
                trainer.history.append(record)
                trainer.save_checkpoint()
                say(epoch_line(record, plan, time.monotonic() - started, trainer.epochs_done - first_epoch))
                if on_epoch is not None:
                    with stop_request.deferred():  # a tracking write is never cut mid-way
                        on_epoch(record)
                stop_request.check()
    finally:
        if cache is not None:
            cache.close()
    return str(stop())


def fit(
    params: Params,
    data_root: Path,
    category: str,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch: EpochCallback | None = None,
    plan: FitPlan | None = None,
) -> FitResult:
    """Train both branches on `category`, select, calibrate and write `run_dir/model`.

    Only `train/good` (and `validation/good`) are trained and calibrated on: a category
    without `test/` trains. Real defects in `validation/<defect_type>/` select the epochs
    (`Trainer.select`); their AUROCs are printed and recorded in `calibration.json`
    (`validation_evidence`), which says "good images only" without them.
    How long, and at which image size, is `fit.recipe`'s plan (`dualstpm.budget.plan_fit`);
    `plan`: that plan when the caller has already made it for these arguments
    (`budget.plan_category(params, data_root, category)`, so the image headers are read
    once; ValueError when its training-image count is not this split's). The model records
    the params it ran with. After calibration the fit check
    (`dualstpm.fit_check`) scores synthetic defects on the calibration images and warns
    below `fit.min_val_auroc`.
    Ctrl-C, or SIGTERM in the main thread (:func:`stop_signals`), after the images
    are decoded raises :class:`FitInterrupted`, which names the checkpoint `--resume`
    continues from."""
    run_dir = Path(run_dir)
    checkpoint_path = check_start(run_dir, resume=resume, overwrite=overwrite)
    compute = Compute.resolve(params.fit.device, params.fit.precision)
    dataset = load_category(Path(data_root), category, require_test=False)  # training never reads test/
    train_paths, val_paths = split_train_val(dataset, params.fit.val_fraction, params.seed)  # real defects: in neither
    if plan is None:
        plan = plan_fit(params, data_root, len(train_paths), image_shapes(train_paths, "reading train image sizes"))
    elif plan.train_images != len(train_paths):
        raise ValueError(f"the plan given to fit counts {plan.train_images} training images, but {category} has "
                         f"{len(train_paths)}: make it with budget.plan_category for the same params and data")
    params = plan.params  # the recipe's image size and epochs from here on
    data = data_signature(dataset, train_paths, val_paths)
    checkpoint = None
    if resume:  # checked before the images are decoded: a refusal costs nothing
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        check_resumable(checkpoint, params, data, checkpoint_path)
    elif overwrite:
        checkpoint_path.unlink(missing_ok=True)  # an interrupted new fit must never look like the old one
    limit = params.data.max_image_pixels
    frame = params.frame_size  # the input size, or under tiling the frames' size (cut into tiles of the input size)
    train_images = decode_images(train_paths, frame, "decoding train images", limit)
    val_images = decode_images(val_paths, frame, "decoding validation images", limit)
    real = RealDefects.decode(dataset.validation_defects, frame, limit)  # None without any
    inputs = input_reference([*train_paths, *val_paths], limit)  # the input drift test's reference (monitor)

    parts = validation_parts(len(val_images), params.calibration.split, params.seed)
    selection_images, calibration_images = val_images[parts.selection], val_images[parts.calibration]

    trainer = Trainer(params, run_dir, compute, data, real=real)
    run_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        trainer.load_checkpoint(checkpoint)
        say(f"resuming {run_dir} after epoch {trainer.epochs_done}")
    say(
        f"fitting [bold]{category}[/]: {len(train_paths)} train / {len(val_paths)} validation images "
        f"({len(parts.selection)} select the epoch, {len(parts.calibration)} calibrate), "
        f"{describe(params.image_size)}, T1 {params.model.t1.name}, T2 {params.model.t2.name}, on {compute.label}"
    )
    say(plan.describe())
    if plan.epochs_note is not None:
        say(f"[bold yellow]warning:[/] {escape(plan.epochs_note)}")
    if parts.note and params.calibration.split > 0:
        say(f"[bold yellow]warning:[/] {parts.note}")
    if (note := calibration_note(len(parts.calibration), params.calibration.false_alarm_rate)) is not None:
        say(f"[bold yellow]warning:[/] {note}")  # before training: the fix costs nothing yet
    if (note := plan.tiling_note()) is not None:
        say(escape(note))
    if (note := plan.aspect_note()) is not None:
        say(f"[bold yellow]warning:[/] {escape(note)}")  # the note's [height, width] is not markup
    if real is not None:
        say(f"epochs are selected on real validation defects ({real.label}, {int(real.has_mask.sum())} with masks) "
            f"against the {len(parts.selection)} selection images: the best {real.rule} "
            f"(fit.select={params.fit.select} is not used)")
    # From here on, Ctrl-C or SIGTERM says what is checkpointed (FitInterrupted); after the last
    # epoch the checkpoint holds them all, and --resume goes straight to selection and calibration.
    try:
        with stop_signals() as stop_request:
            tiling = params.tiling_spec()  # under tiling the students train on every tile of the training frames
            train_set = train_images if tiling is None else tiling.cut_all(train_images)
            ended = train_epochs(trainer, params, train_set, selection_images, compute, run_dir, on_epoch, plan,
                                 stop_request)
            say(f"training ended: {ended}")
            selected = trainer.restore_best()
            # the stage selects its epoch on the selection part too: the calibration part stays unseen until calibration
            disc = (fit_discriminator(trainer.model, params, train_images, selection_images, compute)
                    if params.fit.discriminator else None)
            memory = (build_memory(trainer.model, train_images, compute, ratio=params.memory.coreset_ratio,
                                   sigma=params.memory.sigma, seed=params.seed, batch_size=params.fit.batch_size)
                      if params.memory.enabled else None)
            calibration = calibrate(trainer.model, params, calibration_images, compute, selected, category, parts, disc,
                                    memory)
            calibration = replace(calibration, validation_evidence=fit_evidence(
                trainer.model, params, calibration, selection_images, real, compute, disc, memory))
            check = fit_check(trainer.model, params, calibration, calibration_images, compute, disc, plan,
                              len(trainer.history), memory)
            calibration = replace(calibration, fit_check=check.to_json(), input_reference=inputs)
            trained_on = data_trained_on(params, data_root, category, run_dir)
            model_dir = save_detector(run_dir, trainer.model, trained_on, calibration,
                                      disc.module if disc is not None else None,
                                      memory.cpu() if memory is not None else None)
            write_history(trainer.history, run_dir / HISTORY_FILE)
            if disc is not None:
                write_history(disc.history, run_dir / DISC_HISTORY_FILE)
    except KeyboardInterrupt as stop:
        how = signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT
        raise FitInterrupted(trainer.epochs_saved, params.fit.epochs, checkpoint_path, how) from None
    thresholds = calibration.thresholds
    view = params.fusion.view  # the view the model decides with (until an ablation applies a fusion to `fused`)
    say(f"model written to {model_dir} (selected epochs: {selected}; decides with `{view}`, "
                  f"threshold {thresholds[view]:.5g})")
    return FitResult(run_dir, model_dir, trainer.history, selected, thresholds, disc.seconds if disc is not None else None,
                     calibration.validation_evidence, check.to_json())
