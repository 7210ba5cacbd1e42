"""Time and peak memory of `dualstpm predict` on one large frame, tiled and squashed (`dualstpm bench-frame`).

A gray test frame of the asked size (a smooth ramp, mild noise and a few thin dark
scratches, PNG) is scored by the whole predict path (decode, resize or tile, score, stitch,
regions, overlay, table) of a seeded, untrained model, in a fresh process per phase so that
each peak resident memory (VmHWM) is its own:

- ``floor``: predict on a frame of one tile (`image_size`, untiled): what any phase costs
  whatever the frame (the model, predict's overlay, table and imports);
- ``tiled``: `tiling.enabled`, the frame at its own size (`tiling.frame_size` = the frame),
  tiles of `image_size`;
- ``squashed``: no tiling, the frame resized to `image_size` (what an untiled model does).

Figures are from one run on a shared machine: compare the phases with each other. Memory
above the floor is what the frame costs; it is printed per frame pixel.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dualstpm.benchmark import _peak_rss_mib
from dualstpm.compute import Compute
from dualstpm.config import Params, validate
from dualstpm.progress import say

#: rows of the test frame generated at a time (its uint8 array is the only frame-sized buffer)
ROW_BLOCK = 1024


def write_test_frame(path: Path, height: int, width: int, seed: int = 0) -> Path:
    """A gray uint8 PNG of `height` x `width` px: a horizontal ramp (60..180), noise of
    standard deviation 4 and three 3 px wide dark scratches, written with fast compression."""
    rng = np.random.default_rng(seed)
    frame = np.empty((height, width), dtype=np.uint8)
    ramp = np.linspace(60.0, 180.0, width, dtype=np.float32)
    for start in range(0, height, ROW_BLOCK):
        rows = min(ROW_BLOCK, height - start)
        block = ramp[None, :] + rng.normal(0.0, 4.0, (rows, width)).astype(np.float32)
        frame[start : start + rows] = np.clip(block, 0, 255).astype(np.uint8)
    for k in range(3):  # thin scratches, each along a tenth of the frame's width
        y = (k + 1) * height // 4
        x0 = (k + 1) * width // 5
        frame[y : y + 3, x0 : x0 + max(1, width // 10)] = 20
    Image.fromarray(frame, mode="L").save(path, compress_level=1)
    return path


def _phase(phase: str, run_dir: str, frame: str, out_dir: str, queue: multiprocessing.Queue) -> None:
    from dualstpm.detector import Detector
    from dualstpm.predict import predict

    detector = Detector.load(Path(run_dir), Compute.resolve("cpu", "float32"))
    start = time.perf_counter()
    table = predict(detector, [Path(frame)], Path(out_dir))
    if (table["error"] != "").any():
        raise RuntimeError(f"the frame was not scored: {table['error'].iloc[0]}")
    queue.put({"seconds": time.perf_counter() - start, "peak_rss_mib": _peak_rss_mib()})


def _run(phase: str, run_dir: Path, frame: Path, out_dir: Path) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_phase, args=(phase, str(run_dir), str(frame), str(out_dir), queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"the {phase} phase of the frame benchmark failed (exit code {process.exitcode}); "
                           "its error is printed above")
    return queue.get()


def _variant(params: Params, tiled: bool, frame: tuple[int, int]) -> Params:
    raw = params.to_dict()
    raw["tiling"] = {"enabled": tiled, "frame_size": list(frame) if tiled else None,
                     "overlap": params.tiling.overlap}
    raw["fit"]["discriminator"] = False
    raw["fusion"]["sigma"] = 0
    return validate(raw, "the frame benchmark's params")


def frame_benchmark(params: Params, height: int, width: int) -> dict:
    """The three phases (module docstring) on a `height` x `width` test frame, with `params`'
    image size, overlap and batch size; untrained seeded networks, calibrated on the test frame
    squashed (so that scores and regions exist; their values mean nothing here)."""
    import torch

    from dualstpm.data import read_image, resize_image
    from dualstpm.detector import save_detector
    from dualstpm.training import build_model, calibrate

    frame_hw = (int(height), int(width))
    tiled, squashed = _variant(params, True, frame_hw), _variant(params, False, frame_hw)
    cpu = Compute.resolve("cpu", "float32")
    results: dict = {"setup": {"frame": list(frame_hw), "frame_pixels": height * width,
                               "image_size": tiled.to_dict()["image_size"], "overlap": tiled.tiling.overlap,
                               "tiles": tiled.tiling_spec().grid(frame_hw).count, "batch_size": tiled.fit.batch_size,
                               "t1": tiled.model.t1.name, "t2": tiled.model.t2.name}}
    with tempfile.TemporaryDirectory(prefix="dualstpm-bench-frame-") as work:
        work = Path(work)
        say(f"writing a {height} x {width} test frame")
        frame = write_test_frame(work / "frame.png", height, width)
        one_tile = write_test_frame(work / "one_tile.png", *tiled.size)
        torch.manual_seed(params.seed)
        model = build_model(squashed, cpu).eval()
        small = resize_image(read_image(frame, params.data.max_image_pixels), squashed.size)[None]
        calibration = calibrate(model, squashed, torch.cat([small, small.flip(-1)]), cpu, {"stpm": 0, "recon": 0},
                                "bench-frame")
        for name, variant in (("tiled", tiled), ("squashed", squashed)):
            save_detector(work / name, model, variant, calibration)
        for phase, run, image in (("floor", "squashed", one_tile), ("tiled", "tiled", frame),
                                  ("squashed", "squashed", frame)):
            say(f"phase {phase}")
            results[phase] = _run(phase, work / run, image, work / f"out-{phase}")
    floor = results["floor"]["peak_rss_mib"]
    for phase in ("tiled", "squashed"):
        figures = results[phase]
        figures["above_floor_mib"] = figures["peak_rss_mib"] - floor
        figures["bytes_per_frame_pixel"] = figures["above_floor_mib"] * 2**20 / (height * width)
    results["tiled"]["tiles_per_s"] = results["setup"]["tiles"] / results["tiled"]["seconds"]
    return results
