"""Validation evidence for the memory-view lever (issue 22, item 3), on a fitted run.

Run from the project root, on any fitted run directory and the data it was fitted on::

    python -m studies.memory_evidence --run RUN --data-root ../shared/data --category kolektor \\
        --out studies/results/memory/kolektor.json

It rebuilds the run's split exactly as `fit` made it (`studies.compare_anomalib.load_split`),
builds the memory bank on the training images (`dualstpm.model.memory`, coreset
``--coreset-ratio``, default 1 %), and scores three views of the same model:

- ``fused``: the params' fusion, as fitted;
- ``memory``: the memory view alone;
- ``fused+memory``: both, each standardised by its mean and std over the good *selection*
  images' pixels, summed with equal weights (`studies.compare_anomalib.fused_memory_predictor`).

**Validation evidence** (what a default may be chosen on; no test image is read for it):

- *synthetic*: ``--per-image`` defective copies of each selection image
  (`dualstpm.ablation.defects.paste_defects`, the params' ``ablation.synthetic_kinds``,
  seeded by ``ablation.synthetic_seed``), against the clean selection images: image AUROC,
  pixel AUROC of the pasted masks;
- *real*, when the category has a ``validation/<defect>/`` folder: those defects against
  the selection images (`dualstpm.real_defects.RealDefects.auroc`).

**Test figures** are printed beside them, for the record only: image AUROC, pixel AUROC,
AUPRO, and recall at the threshold set on the calibration images (the comparison's rule).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from dualstpm import metrics  # noqa: E402
from dualstpm.ablation.defects import paste_defects  # noqa: E402
from dualstpm.compute import Compute  # noqa: E402
from dualstpm.config import load_params  # noqa: E402
from dualstpm.data import load_category  # noqa: E402
from dualstpm.detector import Detector  # noqa: E402
from dualstpm.errors import DualStpmError  # noqa: E402
from dualstpm.files import write_json  # noqa: E402
from dualstpm.real_defects import RealDefects  # noqa: E402
from dualstpm.model.fusion import image_score  # noqa: E402
from dualstpm.model.memory import MemoryStats  # noqa: E402
from studies.compare_anomalib import (build_memory, load_split, memory_predictor, pixel_stats,  # noqa: E402
                                      predict_split, quality, view_predictor)

VIEWS = ("fused", "memory", "fused+memory")


def evidence(run: Path, data_root: Path, category: str, ratio: float, per_image: int) -> dict:
    """The JSON-ready evidence of the three views (module docstring)."""
    params = load_params(run / "model" / "params.yaml", [])
    compute = Compute.resolve("cpu", "float32")
    detector = Detector.load(run, compute)
    split = load_split(params, data_root, category)
    batch = params.fit.batch_size
    start = time.perf_counter()
    memory = build_memory(detector, split.train, ratio, batch, params.seed)
    build_s = time.perf_counter() - start
    remember, fused = memory_predictor(detector, memory), view_predictor(detector, "fused")
    selection = predict_split(lambda x: {"memory": remember(x), "fused": fused(x)}, split.selection, batch)
    stats = {view: pixel_stats(maps) for view, (_, maps) in selection.items()}
    combine = MemoryStats(stats["fused"], stats["memory"]).combine

    def all_three(images):  # the sum as `fused_memory_predictor` makes it, from one pass of each view
        (_, f), (_, m) = fused(images), remember(images)
        return {"fused": fused_scores_maps(f), "memory": fused_scores_maps(m),
                "fused+memory": fused_scores_maps(combine(f, m))}

    def fused_scores_maps(maps):
        return image_score(maps, detector.score_spec), maps

    good = predict_split(all_three, split.selection, batch)
    kinds = list(params.ablation.synthetic_kinds)
    pasted, masks, _ = paste_defects(split.selection, kinds, per_image, params.ablation.synthetic_seed)
    bad = predict_split(all_three, pasted, batch)
    labels = np.concatenate([np.zeros(len(split.selection), np.int8), np.ones(len(pasted), np.int8)])
    truth = np.concatenate([np.zeros((len(split.selection), *masks.shape[1:]), bool), masks])
    synthetic = {view: {"image_auroc": metrics.image_auroc(labels, np.concatenate([good[view][0], bad[view][0]])),
                        "pixel_auroc": metrics.pixel_auroc(truth, np.concatenate([good[view][1], bad[view][1]]))}
                 for view in VIEWS}
    # per-image scores for the bootstrap of `studies.memory_choice`: copy k was pasted on selection image k // per_image
    scores = {"synthetic": {view: {"good": good[view][0].tolist(), "defect": bad[view][0].tolist(),
                                   "defect_base": [k // per_image for k in range(len(pasted))]} for view in VIEWS}}

    real_samples = load_category(data_root, category).validation_defects
    real = RealDefects.decode(real_samples, params.image_size, params.data.max_image_pixels)
    real_figures = None
    if real is not None:
        defects = predict_split(all_three, real.images, batch)
        real_figures = {view: real.auroc(good[view][0], good[view][1], defects[view][0], defects[view][1])
                        for view in VIEWS}
        scores["real"] = {view: {"good": good[view][0].tolist(), "defect": defects[view][0].tolist()} for view in VIEWS}

    tested, calibrated = predict_split(all_three, split.test, batch), predict_split(all_three, split.calibration, batch)
    test = {view: quality(split, *tested[view], calibrated[view][0]) for view in VIEWS}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "run": str(run), "category": category, "image_size": params.image_size,
        "coreset_ratio": ratio, "bank_entries": len(memory.bank), "bank_build_s": build_s,
        "selection_images": len(split.selection), "synthetic_copies": len(pasted), "synthetic_kinds": kinds,
        "real_defects": real.describe() if real is not None else None,
        "selection_stats": stats,
        "validation": {"synthetic": synthetic, "real": real_figures},
        "validation_scores": scores,
        "test": test,
    }


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def markdown(result: dict) -> str:
    """One table: per view, the validation evidence, then the test figures."""
    real = result["validation"]["real"]
    lines = [
        f"{result['category']}, {result['image_size']} px, memory bank {result['bank_entries']} entries "
        f"(coreset {result['coreset_ratio']:g}); validation: {result['synthetic_copies']} pasted copies of "
        f"{result['selection_images']} selection images ({', '.join(result['synthetic_kinds'])})"
        + (f"; {result['real_defects']['evidence']}" if real else ", no real validation defects") + ".",
        "",
        "| view | val synthetic image / pixel AUROC | val real image / pixel AUROC | test image / pixel AUROC / AUPRO "
        "| test recall @ FAR / test FAR |",
        "|---|---|---|---|---|",
    ]
    for view in VIEWS:
        syn, test = result["validation"]["synthetic"][view], result["test"][view]
        real_cell = "—" if not real else f"{_fmt(real[view]['image_auroc'])} / {_fmt(real[view].get('pixel_auroc'))}"
        lines.append(f"| {view} | {_fmt(syn['image_auroc'])} / {_fmt(syn['pixel_auroc'])} | {real_cell} | "
                     f"{_fmt(test['image_auroc'])} / {_fmt(test['pixel_auroc'])} / {_fmt(test['aupro'])} | "
                     f"{_fmt(test['recall'])} / {_fmt(test['test_false_alarm_rate'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a fitted run directory")
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--per-image", type=int, default=3, help="pasted defective copies per selection image")
    parser.add_argument("--out", type=Path, required=True, help="JSON; the markdown table goes next to it (.md)")
    args = parser.parse_args(argv)
    try:
        result = evidence(args.run, args.data_root, args.category, args.coreset_ratio, args.per_image)
    except DualStpmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["markdown"] = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    args.out.with_suffix(".md").write_text(result["markdown"] + "\n")
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
