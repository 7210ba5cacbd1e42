"""Training both branches on one category (METHOD.md §5), with checkpoints and resume.

The loop is plain PyTorch: two students, two SGD optimisers, frozen teachers. After every
epoch the validation images pick the best checkpoint per branch (lowest mean image score,
the original STPM rule) and a checkpoint is written atomically, so an interrupted fit
continues with `--resume` and ends where an uninterrupted one would have.
"""

from __future__ import annotations

import csv
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import Tensor

from dualstpm.compute import Compute
from dualstpm.config import Params
from dualstpm.data import decode_images, load_category, split_train_val
from dualstpm.detector import Calibration, save_detector, summarize
from dualstpm.errors import TrainingError
from dualstpm.feature_cache import TeacherFeatureCache
from dualstpm.fusion import BRANCHES, VIEWS, FusionSpec, MapStatsAccumulator, calibrate_threshold, fuse, image_scores
from dualstpm.models.torch_model import DualStpmModel
from dualstpm.progress import progress_bar, stderr_console
from dualstpm.rng import own_rng

CHECKPOINT_FILE = "checkpoint.pt"
HISTORY_FILE = "history.csv"
EpochCallback = Callable[[dict[str, float]], None]

console = stderr_console


@dataclass
class FitResult:
    run_dir: Path
    model_dir: Path
    history: list[dict[str, float]]
    selected_epochs: dict[str, int]
    thresholds: dict[str, float]


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
        return compute.module(DualStpmModel.build(params.model))


def epoch_order(n: int, seed: int, epoch: int) -> Tensor:
    """The shuffle of one epoch depends only on (seed, epoch), so a resumed run replays it."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


@torch.no_grad()
def six_maps(model: DualStpmModel, images: Tensor, compute: Compute) -> Tensor:
    """Eval-mode maps (B, 2, 3, H, W) of one batch, float32 on the CPU."""
    model.eval()
    with compute.autocast():
        return model(compute.images(images)).float().cpu()


def branch_scores(model: DualStpmModel, images: Tensor, spec: FusionSpec, batch_size: int, compute: Compute) -> dict[str, np.ndarray]:
    """Image scores of each branch alone on raw maps: the model-selection signal."""
    scores: dict[str, list[Tensor]] = {b: [] for b in BRANCHES}
    for start in range(0, len(images), batch_size):
        maps = six_maps(model, images[start : start + batch_size], compute)
        for branch in BRANCHES:
            scores[branch].append(image_scores(fuse(maps, spec.view(branch))).cpu())
    return {b: torch.cat(s).numpy() for b, s in scores.items()}


def _state_copy(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _check_resumable(checkpoint: dict, params: Params, path: Path) -> None:
    saved, now = dict(checkpoint["params"]), params.to_dict()
    saved["fit"] = {k: v for k, v in saved["fit"].items() if k != "epochs"}
    now["fit"] = {k: v for k, v in now["fit"].items() if k != "epochs"}
    for tree in (saved, now):
        tree.pop("tracking", None)  # where runs are logged does not change what is trained
    if saved != now:
        diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise TrainingError(
            f"cannot resume from {path}: its params differ in {', '.join(diff)} (only fit.epochs may change). "
            "Resume with the same params, or start again with --overwrite."
        )


class Trainer:
    """Holds the state of one fit: model, optimisers, best checkpoints, history."""

    def __init__(self, params: Params, run_dir: Path, compute: Compute) -> None:
        self.params = params
        self.run_dir = run_dir
        self.compute = compute
        self.checkpoint_path = run_dir / CHECKPOINT_FILE
        self.model = build_model(params, compute)
        fit = params.fit
        self.optimizers = {
            name: torch.optim.SGD(student.parameters(), lr=fit.lr, momentum=fit.momentum, weight_decay=fit.weight_decay)
            for name, student in self.model.students().items()
        }
        self.best: dict[str, dict] = {b: {"score": math.inf, "epoch": 0, "state": None} for b in BRANCHES}
        self.history: list[dict[str, float]] = []
        self.epochs_done = 0
        self.selection_spec = FusionSpec(mode=params.fusion.mode, weights=FusionSpec().weights)

    # --- checkpoints -----------------------------------------------------------
    def save_checkpoint(self) -> None:
        _atomic_save(
            {
                "epoch": self.epochs_done,
                "params": self.params.to_dict(),
                "students": {n: s.state_dict() for n, s in self.model.students().items()},
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "best": self.best,
                "history": self.history,
            },
            self.checkpoint_path,
        )

    def load_checkpoint(self) -> None:
        if not self.checkpoint_path.is_file():
            raise TrainingError(f"nothing to resume: {self.checkpoint_path} does not exist. Run without --resume.")
        checkpoint = torch.load(self.checkpoint_path, map_location="cpu", weights_only=True)
        _check_resumable(checkpoint, self.params, self.checkpoint_path)
        for name, student in self.model.students().items():
            student.load_state_dict(checkpoint["students"][name])
            self.optimizers[name].load_state_dict(checkpoint["optimizers"][name])
        self.best = checkpoint["best"]
        self.history = list(checkpoint["history"])
        self.epochs_done = int(checkpoint["epoch"])

    # --- one epoch -----------------------------------------------------------------
    def train_epoch(self, images: Tensor, progress: Progress, cache: TeacherFeatureCache | None = None) -> dict[str, float]:
        epoch = self.epochs_done + 1
        fit = self.params.fit
        self.model.train()
        order = epoch_order(len(images), self.params.seed, epoch)
        n_batches = math.ceil(len(images) / fit.batch_size)
        task = progress.add_task(f"epoch {epoch}/{fit.epochs}", total=n_batches, status="")
        totals = {b: 0.0 for b in BRANCHES}
        for index in range(n_batches):
            indices = order[index * fit.batch_size : (index + 1) * fit.batch_size]
            batch = self.compute.images(images[indices])
            teachers = cache.batch(indices, self.compute) if cache is not None else None
            with self.compute.autocast():
                losses = dict(zip(BRANCHES, self.model.pyramids(batch, teachers).losses(), strict=True))
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
        return {f"loss_{b}": totals[b] / len(images) for b in BRANCHES}

    def select(self, val_images: Tensor) -> dict[str, float]:
        """Keep each branch's checkpoint with the lowest mean validation image score.
        Raises TrainingError naming the epoch and branch when a score is not finite."""
        scores = branch_scores(self.model, val_images, self.selection_spec, self.params.fit.batch_size, self.compute)
        for branch, values in scores.items():
            bad = int(np.count_nonzero(~np.isfinite(values)))
            if bad:
                fit = self.params.fit
                raise TrainingError(
                    f"the {branch} branch gave {bad} of {len(values)} validation images a non-finite score "
                    f"(NaN or inf) after epoch {self.epochs_done}, although its training loss was finite: its maps "
                    f"overflow. Lower the learning rate (fit.lr={fit.lr}, e.g. --set fit.lr={fit.lr / 10:g}) or run in "
                    f"float32 (--set fit.precision=float32); the last completed epoch is kept in {self.checkpoint_path}."
                )
        means = {b: float(np.mean(s)) for b, s in scores.items()}
        for branch, student in self.model.students().items():
            if means[branch] < self.best[branch]["score"]:
                self.best[branch] = {"score": means[branch], "epoch": self.epochs_done, "state": _state_copy(student)}
        return {f"val_score_{b}": m for b, m in means.items()}

    def restore_best(self) -> dict[str, int]:
        for branch, student in self.model.students().items():
            student.load_state_dict(self.best[branch]["state"])
        return {b: int(self.best[b]["epoch"]) for b in BRANCHES}


def calibrate(model: DualStpmModel, params: Params, val_images: Tensor, compute: Compute,
              selected_epochs: dict[str, int], category: str) -> Calibration:
    """Per-map validation statistics, then per-view thresholds at the target false-alarm rate."""
    batch_size = params.fit.batch_size
    maps = [six_maps(model, val_images[i : i + batch_size], compute) for i in range(0, len(val_images), batch_size)]
    accumulator = MapStatsAccumulator()
    for batch in maps:
        accumulator.update(batch)
    stats = accumulator.result()
    spec = FusionSpec.from_params(params.fusion)
    scores = {v: torch.cat([image_scores(fuse(m, spec.view(v), stats)) for m in maps]).numpy() for v in VIEWS}
    rate = params.calibration.false_alarm_rate
    return Calibration(
        image_size=params.image_size,
        map_stats=stats,
        thresholds={v: calibrate_threshold(s, rate) for v, s in scores.items()},
        val_score_summary={v: summarize(s) for v, s in scores.items()},
        selected_epochs=selected_epochs,
        category=category,
        false_alarm_rate=rate,
    )


def write_history(history: list[dict[str, float]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def fit(
    params: Params,
    data_root: Path,
    category: str,
    run_dir: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train both branches on `category`, select, calibrate and write `run_dir/model`."""
    run_dir = Path(run_dir)
    checkpoint_path = run_dir / CHECKPOINT_FILE
    if checkpoint_path.exists() and not (resume or overwrite):
        raise TrainingError(
            f"{run_dir} already holds a training checkpoint: pass --resume to continue it, "
            "--overwrite to start again, or choose another --out"
        )
    compute = Compute.resolve(params.fit.device, params.fit.precision)
    dataset = load_category(Path(data_root), category)
    train_paths, val_paths = split_train_val(dataset, params.fit.val_fraction, params.seed)
    train_images = decode_images(train_paths, params.image_size, f"decoding {len(train_paths)} train images")
    val_images = decode_images(val_paths, params.image_size, f"decoding {len(val_paths)} validation images")

    trainer = Trainer(params, run_dir, compute)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        trainer.load_checkpoint()
        console.print(f"resuming {run_dir} after epoch {trainer.epochs_done}")
    console.print(
        f"fitting [bold]{category}[/]: {len(train_paths)} train / {len(val_paths)} validation images, "
        f"{params.image_size} px, T1 {params.model.t1.name}, T2 {params.model.t2.name}, on {compute.label}"
    )
    columns = (MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    cache = None
    if params.fit.cache and trainer.epochs_done < params.fit.epochs:
        cache = TeacherFeatureCache.build(
            trainer.model, train_images, params.fit.batch_size, compute, params.fit.cache_ram_gb * 2**30, run_dir
        )
    try:
        with progress_bar(*columns) as progress:
            while trainer.epochs_done < params.fit.epochs:
                losses = trainer.train_epoch(train_images, progress, cache)
                trainer.epochs_done += 1
                record = {"epoch": trainer.epochs_done, **losses, **trainer.select(val_images)}
                trainer.history.append(record)
                trainer.save_checkpoint()
                console.print("  ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
                if on_epoch is not None:
                    on_epoch(record)
    finally:
        if cache is not None:
            cache.close()

    selected = trainer.restore_best()
    calibration = calibrate(trainer.model, params, val_images, compute, selected, category)
    thresholds = calibration.thresholds
    model_dir = save_detector(run_dir, trainer.model, params, calibration)
    write_history(trainer.history, run_dir / HISTORY_FILE)
    console.print(f"model written to {model_dir} (selected epochs: {selected}, threshold {thresholds['fused']:.5g})")
    return FitResult(run_dir, model_dir, trainer.history, selected, thresholds)
