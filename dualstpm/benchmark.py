"""Speed and memory, measured in one run on the same images (the benchmark issue).

Each phase runs in a fresh child process so that its peak resident memory is its own.
Figures are medians of repeated timings; compare ratios from one run, since absolute
times on shared machines drift.

- training: images/s over one epoch of the real training loop (`training.Trainer`, the
  run's `fit.*` params) after a warm-up epoch, per branch and for both, with and without
  the teacher-feature cache, plus the first-epoch losses of both ways;
- inference: the floor (T1, S1, T2, S2 forward only, nothing else, `inference_mode`),
  the inference module's throughput at batch 16 and latency at batch 1 (decoded image to
  every output: the path predict, the MLflow model and the exports run), and their ratio
  to the floor;
- backends (`--backend`, `--precision`): the whole inference module (all outputs) on
  PyTorch float32 and on each exported backend and precision, batch-16 throughput,
  batch-1 latency and peak memory, each in its own process; the exports are made first,
  from the same seeded model (int8 calibrated on the benchmark images, good parts).

Everything runs as training and inference do (`dualstpm.compute`: the device,
`fit.precision`, channels_last), the floor in the same precision as the fused model.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from dualstpm.compute import Compute
from dualstpm.config import Params
from dualstpm.data import decode_images, load_category
from dualstpm.detector import Detector
from dualstpm.feature_cache import TeacherFeatureCache
from dualstpm.files import write_json
from dualstpm.model.torch_model import DualStpmModel
from dualstpm.progress import progress_bar
from dualstpm.training import Trainer, build_model, calibrate
from dualstpm.sizes import to_json

INFER_BATCH = 16


def median_seconds(run: Callable[[], object], compute: Compute, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        compute.sync()
        start = time.perf_counter()
        run()
        compute.sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_rss_mib() -> float:
    """This process's peak resident memory, MiB. Linux: VmHWM, which starts afresh at exec;
    `ru_maxrss` survives exec, so a child spawned by a large parent would report the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # KiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def timed_epoch(trainer: Trainer, images: Tensor, cache: TeacherFeatureCache | None) -> tuple[float, dict[str, float]]:
    """One epoch of the real training loop (`Trainer.train_epoch`, the run's `fit.*` params,
    its branches only); (seconds, mean loss per branch). Without a cache only the teachers
    those branches need run (T1 for stpm, T1 and T2 for recon), so per-branch figures are
    what training that branch alone costs."""
    with progress_bar() as progress:
        trainer.compute.sync()
        start = time.perf_counter()
        losses = trainer.train_epoch(images, progress, cache)
        trainer.compute.sync()
        seconds = time.perf_counter() - start
    trainer.epochs_done += 1  # as `training.fit` counts: the next epoch draws its own order
    return seconds, {b: losses[f"loss_{b}"] for b in trainer.branches}


def training_phase(params: Params, images: Tensor, compute: Compute) -> dict:
    """Throughput per branch and for both, with and without the cache; first-epoch losses.
    A warm-up epoch, then a timed one, of a fresh `Trainer` per (cache, branches)."""
    batch_size = params.fit.batch_size
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="dualstpm-bench-train-") as work:
        for cached in (False, True):
            tag = "cache" if cached else "no_cache"
            for branches in (("stpm", "recon"), ("stpm",), ("recon",)):
                trainer = Trainer(params, Path(work), compute, {}, branches)
                cache = None
                if cached:
                    start = time.perf_counter()
                    cache = TeacherFeatureCache.build(trainer.model, images, batch_size, compute,
                                                      params.fit.cache_ram_gb * 2**30, Path(work))
                    out[f"{tag}_build_s"] = time.perf_counter() - start
                _, first_losses = timed_epoch(trainer, images, cache)  # warm-up epoch
                seconds, _ = timed_epoch(trainer, images, cache)
                name = "+".join(branches)
                out[f"{tag}_{name}_epoch_s"] = seconds
                out[f"{tag}_{name}_images_per_s"] = len(images) / seconds
                if len(branches) == 2:
                    out[f"{tag}_first_epoch_losses"] = first_losses
                if cache is not None:
                    cache.close()
    both = "stpm+recon"
    out["cache_epoch_ratio"] = out[f"cache_{both}_epoch_s"] / out[f"no_cache_{both}_epoch_s"]
    out["cache_loss_rel_diff"] = max(
        abs(out["cache_first_epoch_losses"][b] - out["no_cache_first_epoch_losses"][b]) / out["no_cache_first_epoch_losses"][b]
        for b in ("stpm", "recon")
    )
    out["train_peak_rss_mib"] = _peak_rss_mib()
    return out


def floor_forward(model: DualStpmModel, images: Tensor) -> None:
    """T1, S1, T2 and S2 forward and nothing else: what no inference can beat."""
    *_, t1_deep = model.t1(images)
    model.s1(images)
    t2_levels = model.t2(images)
    model.s2(t1_deep, t2_levels)


def inference_phase(params: Params, images: Tensor, compute: Compute, repeats: int) -> dict:
    model = build_model(params, compute).eval()
    calibration = calibrate(model, params, images[:INFER_BATCH], compute, {"stpm": 0, "recon": 0}, "bench")
    detector = Detector(model, params, calibration, compute)
    batch = images[:INFER_BATCH].to(compute.device)
    single = images[:1].to(compute.device)
    with torch.inference_mode(), compute.autocast():
        floor_s = median_seconds(lambda: floor_forward(detector.model, detector.prepare(batch)), compute, repeats)
    # the inference module, as predict, the MLflow model and the exports run it (`Detector.infer`)
    fused_s = median_seconds(lambda: detector.infer(batch), compute, repeats)
    latency_s = median_seconds(lambda: detector.infer(single), compute, repeats)
    return {
        "floor_images_per_s": len(batch) / floor_s,
        "fused_images_per_s": len(batch) / fused_s,
        "inference_over_floor": floor_s / fused_s,
        "latency_batch1_ms": latency_s * 1000,
        "infer_peak_rss_mib": _peak_rss_mib(),
    }


def backend_phase(images: Tensor, backend: str, export_dir: Path | None, run_dir: Path, repeats: int) -> dict:
    """The whole inference module on one backend: batch-16 throughput, batch-1 latency, peak RSS.
    `export_dir` None: PyTorch float32 on the saved run (the reference of the exports)."""
    from dualstpm.backends import ExportedModel

    cpu = Compute.resolve("cpu", "float32")
    scorer = Detector.load(run_dir, cpu) if export_dir is None else ExportedModel(export_dir, backend)
    batch, single = images[:INFER_BATCH], images[:1]
    batch_s = median_seconds(lambda: scorer.infer(batch), cpu, repeats)
    single_s = median_seconds(lambda: scorer.infer(single), cpu, repeats)
    return {"images_per_s": len(batch) / batch_s, "latency_batch1_ms": single_s * 1000, "peak_rss_mib": _peak_rss_mib()}


def _child(phase: str, params_dict: dict, paths: list[str], repeats: int, queue: multiprocessing.Queue,
           backend: dict | None = None) -> None:
    params = Params.model_validate(params_dict)
    compute = Compute.resolve(params.fit.device, params.fit.precision)
    images = decode_images([Path(p) for p in paths], params.image_size, "decoding benchmark images",
                           params.data.max_image_pixels)
    if phase == "train":
        queue.put(training_phase(params, images, compute))
    elif phase == "backend":
        queue.put(backend_phase(images, **backend, repeats=repeats))
    else:
        queue.put(inference_phase(params, images, compute, repeats))


def run_phase(phase: str, params: Params, paths: list[Path], repeats: int, backend: dict | None = None) -> dict:
    """Run one phase in a fresh process (its own peak memory) and return its figures."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(phase, params.to_dict(), [str(p) for p in paths], repeats, queue,
                                                   backend))
    process.start()
    result = queue.get()
    process.join()
    return result


def backend_phases(params: Params, paths: list[Path], repeats: int, backends: tuple[str, ...],
                   precisions: tuple[str, ...]) -> dict:
    """Export the seeded model in every supported (backend, precision) asked for, then time
    PyTorch float32 and each export, each in its own process; {"backend/precision": figures}."""
    from dualstpm.backends import BACKENDS, DEFAULT_FORMAT
    from dualstpm.detector import save_detector
    from dualstpm.errors import ExportError
    from dualstpm.export import PRECISIONS, SUPPORTED, export_run

    unknown = [b for b in backends if b not in BACKENDS] + [p for p in precisions if p not in PRECISIONS]
    if unknown:
        raise ExportError(f"unknown backend or precision {unknown}: backends {', '.join(BACKENDS)}; "
                          f"precisions {', '.join(PRECISIONS)}")
    cpu = Compute.resolve("cpu", "float32")
    images = decode_images(paths, params.image_size, "decoding benchmark images")
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="dualstpm-bench-") as work:
        run_dir = Path(work) / "run"
        model = build_model(params, cpu).eval()
        save_detector(run_dir, model, params, calibrate(model, params, images, cpu, {"stpm": 0, "recon": 0}, "bench"))
        out["torch/fp32"] = run_phase("backend", params, paths, repeats, {"backend": "torch", "export_dir": None,
                                                                          "run_dir": run_dir})
        for backend in backends:
            for precision in precisions:
                fmt = DEFAULT_FORMAT[backend]
                if backend == "torch" or (fmt, precision) not in SUPPORTED:
                    continue
                target = export_run(run_dir, fmt, precision, Path(work) / f"{fmt}-{precision}",
                                    calibration_images=images.numpy())
                out[f"{backend}/{precision}"] = run_phase("backend", params, paths, repeats, {
                    "backend": backend, "export_dir": target, "run_dir": run_dir})
    torch_rate = out["torch/fp32"]["images_per_s"]
    for figures in out.values():
        figures["speedup_vs_torch_fp32"] = figures["images_per_s"] / torch_rate
    return out


def benchmark(params: Params, data_root: Path, category: str, n_images: int, repeats: int = 5,
              backends: tuple[str, ...] = (), precisions: tuple[str, ...] = ("fp32",), train: bool = True) -> dict:
    """The phases on the first `n_images` train images of `category` (training unless
    `train` is False; the exported backends when `backends` names any). The phases time
    untrained two-branch models: without the discriminative stage (`fit.discriminator`)."""
    params = params.model_copy(update={"fit": params.fit.model_copy(update={"discriminator": False}),
                                       "fusion": params.fusion.model_copy(update={"view": "fused"})})
    paths = list(load_category(Path(data_root), category, require_test=False).train[:n_images])
    compute = Compute.resolve(params.fit.device, params.fit.precision)
    device = compute.device
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "precision": compute.precision,
        },
        "setup": {
            "category": category,
            "images": len(paths),
            "image_size": to_json(params.image_size),
            "t1": params.model.t1.name,
            "t2": params.model.t2.name,
            "train_batch": params.fit.batch_size,
            "infer_batch": INFER_BATCH,
            "repeats": repeats,
        },
        **({"train": run_phase("train", params, paths, repeats)} if train else {}),
        "inference": run_phase("infer", params, paths, repeats),
        **({"backends": backend_phases(params, paths, repeats, backends, precisions)} if backends else {}),
        "date": time.strftime("%Y-%m-%d"),
        "load_average": list(os.getloadavg()),
    }


def write_results(results: dict, path: Path) -> None:
    write_json(path, results)
