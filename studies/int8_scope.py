"""Which convolutions int8 quantises, chosen on validation images of every dataset (issue 12).

Run from the project root::

    python -m studies.int8_scope --data-root ../shared/data --image-size 128 --epochs 5 --out studies/results

For each category of ``--data-root``: the default model is fitted (``studies.study``'s
``fitted``: a finished fit with identical params in ``OUT/runs/<category>/baseline`` (shared with ``studies.study``) is
reused), exported once in fp32 ONNX and, per scope of :data:`dualstpm.export.INT8_SCOPES`,
in int8 for ONNX Runtime and OpenVINO (``export_run``: calibrated on the run's validation
good images, as ``dualstpm export`` does). Every export and PyTorch float32 (the reference)
score the **validation set**: the run's validation images plus synthetic defective copies
(the study's ``ValidationSet``, ``ablation.synthetic_*``). Per (scope, backend, dataset):
labels agreeing with PyTorch, image and pixel AUROC minus PyTorch's, the largest relative
score difference, and batch-16 throughput (median of ``--repeats``) beside its fp32 export.

**The rule** (what ``INT8_SCOPE`` is set from): a scope qualifies when, on every backend,
its labels agree with PyTorch on >= 99 % of the validation images pooled over all datasets
and no dataset's image or pixel AUROC moves by more than 0.005 (the issue's bounds); among
qualifying scopes the one with the highest mean OpenVINO int8/fp32 throughput ratio wins;
if none qualifies, int8 keeps nothing worth shipping and the script says so. ``--test``
adds the same figures on the test split: printed beside, never an input to the rule.

The calibration images (validation normals) are among the images the scopes are judged
on; the synthetic defective copies are not. Throughput is of a shared CPU: read ratios,
and only from one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
os.environ.setdefault("DO_NOT_TRACK", "true")

import numpy as np
import torch

from dualstpm import metrics
from dualstpm.backends import DEFAULT_FORMAT, ExportedModel
from dualstpm.benchmark import INFER_BATCH, median_seconds
from dualstpm.compute import Compute
from dualstpm.config import load_params
from dualstpm.data import decode_images, decode_masks, load_category
from dualstpm.detector import Detector
from dualstpm.export import INT8_SCOPE, INT8_SCOPES, PARITY_AUROC_GAP, PARITY_LABEL_AGREEMENT, export_run
from dualstpm.files import write_json, write_text
from dualstpm.model.inference import InferenceOutput
from studies.study import Decoded, find_categories, fitted

BACKENDS = {backend: DEFAULT_FORMAT[backend] for backend in ("onnxruntime", "openvino")}  # backend -> export format


def infer_all(scorer, images: torch.Tensor) -> InferenceOutput:
    """`scorer.infer` over `images` in batches of 16, outputs concatenated."""
    parts = [scorer.infer(images[i : i + INFER_BATCH]) for i in range(0, len(images), INFER_BATCH)]
    return InferenceOutput(*(torch.cat(list(column)) for column in zip(*parts)))


def aurocs(out: InferenceOutput, labels: np.ndarray, truth: metrics.PixelTruth) -> tuple[float, float]:
    """(image AUROC, pixel AUROC) of one backend's outputs."""
    return (metrics.image_auroc(labels, out.score.double().numpy()),
            metrics.pixel_metrics(truth, out.anomaly_map.float().numpy())[0])


def compare(got: InferenceOutput, reference: InferenceOutput, reference_aurocs: tuple[float, float],
            labels: np.ndarray, truth: metrics.PixelTruth) -> dict:
    """Labels agreement, AUROC deltas (image, pixel) and max relative score difference of `got`
    vs `reference` (whose `aurocs` are `reference_aurocs`, computed once per split)."""
    (image_ref, pixel_ref), (image_got, pixel_got) = reference_aurocs, aurocs(got, labels, truth)
    ref = reference.score.double()
    return {
        "images": len(labels),
        "labels_agree": int((got.label.bool() == reference.label.bool()).sum()),
        "image_auroc_delta": image_got - image_ref,
        "pixel_auroc_delta": pixel_got - pixel_ref,
        "max_rel_score_diff": float(((got.score.double() - ref).abs() / ref.abs().clamp_min(1e-12)).max()),
    }


def throughput(scorer, images: torch.Tensor, repeats: int) -> float:
    """Images per second, batch 16 (the first 16 images), median of `repeats`."""
    batch = images[:INFER_BATCH]
    return len(batch) / median_seconds(lambda: scorer.infer(batch), Compute.resolve("cpu", "float32"), repeats)


def measure_category(args: argparse.Namespace, category: str) -> dict:
    """Every scope and backend on one category's validation set (and test split with --test)."""
    params = load_params(args.params, [f"image_size={args.image_size}", f"fit.epochs={args.epochs}", "fit.recipe=fixed",
                                          *args.set])
    record = fitted(params, args.data_root, category, args.out / "runs" / category / "baseline", args.refit)
    run_dir = record.run_dir
    vset = Decoded(args.data_root, category).validation_set(params)
    sets = {"validation": (vset.images, vset.labels, metrics.PixelTruth(vset.masks))}
    if args.test:
        test = load_category(args.data_root, category).test
        sets["test"] = (decode_images([s.path for s in test], params.image_size), np.array([s.label for s in test]),
                        metrics.PixelTruth(decode_masks(test, params.image_size)[0].numpy()))
    reference = Detector.load(run_dir, Compute.resolve("cpu", "float32"))
    torch_out = {name: infer_all(reference, images) for name, (images, _, _) in sets.items()}
    torch_aurocs = {name: aurocs(torch_out[name], labels, truth) for name, (_, labels, truth) in sets.items()}
    exports = args.out / "exports" / category
    result: dict = {"run_dir": str(run_dir), "fit_s": record.fit_s, "scopes": {}, "fp32_images_per_s": {}}
    for backend, fmt in BACKENDS.items():
        fp32 = ExportedModel(export_run(run_dir, fmt, "fp32", exports / f"{fmt}-fp32"), backend)
        result["fp32_images_per_s"][backend] = throughput(fp32, vset.images, args.repeats)
    for scope in args.scopes:
        for backend, fmt in BACKENDS.items():
            target = export_run(run_dir, fmt, "int8", exports / f"{fmt}-int8-{scope}", data_root=args.data_root,
                                scope=scope)
            scorer = ExportedModel(target, backend)
            quantized = json.loads((target / "metadata.json").read_text())["quantization"]
            row = {name: compare(infer_all(scorer, images), torch_out[name], torch_aurocs[name], labels, truth)
                   for name, (images, labels, truth) in sets.items()}
            row["images_per_s"] = throughput(scorer, vset.images, args.repeats)
            row["speedup_vs_fp32"] = row["images_per_s"] / result["fp32_images_per_s"][backend]
            row["quantized_convolutions"] = quantized["quantized_convolutions"]
            row["convolutions"] = quantized["convolutions"]
            result["scopes"].setdefault(scope, {})[backend] = row
            print(f"{category} {scope} {backend}: {_row_text(row)}", file=sys.stderr, flush=True)
        shutil.rmtree(exports / f"onnx-int8-{scope}", ignore_errors=True)  # ~ model size each: keep the disk small
        shutil.rmtree(exports / f"openvino-int8-{scope}", ignore_errors=True)
    return result


def _row_text(row: Mapping) -> str:
    v = row["validation"]
    return (f"validation labels {v['labels_agree']}/{v['images']}, image AUROC {v['image_auroc_delta']:+.4f}, "
            f"pixel AUROC {v['pixel_auroc_delta']:+.4f}, {row['images_per_s']:.1f} img/s "
            f"({row['speedup_vs_fp32']:.2f}x fp32)")


def choose_scope(per_dataset: Mapping[str, Mapping], scopes: Sequence[str],
                 agreement: float = PARITY_LABEL_AGREEMENT, gap: float = PARITY_AUROC_GAP) -> tuple[str | None, dict[str, dict]]:
    """The rule of the module docstring on VALIDATION figures only.

    per_dataset[category]["scopes"][scope][backend]["validation"] holds `labels_agree`,
    `images`, `image_auroc_delta`, `pixel_auroc_delta`; [backend]["speedup_vs_fp32"] the
    throughput ratio. Returns (the chosen scope or None, scope -> {qualifies, pooled
    agreement per backend, worst |AUROC delta|, mean OpenVINO speedup}). A NaN delta (a
    validation set without defects) does not qualify.
    """
    summary: dict[str, dict] = {}
    for scope in scopes:
        rows = [d["scopes"][scope] for d in per_dataset.values()]
        pooled = {b: sum(r[b]["validation"]["labels_agree"] for r in rows) / sum(r[b]["validation"]["images"] for r in rows)
                  for b in BACKENDS}
        deltas = [abs(r[b]["validation"][k]) for r in rows for b in BACKENDS
                  for k in ("image_auroc_delta", "pixel_auroc_delta")]
        worst = math.inf if any(math.isnan(x) for x in deltas) else max(deltas)
        speedup = float(np.mean([r["openvino"]["speedup_vs_fp32"] for r in rows]))
        summary[scope] = {"qualifies": all(a >= agreement for a in pooled.values()) and worst <= gap,
                          "labels_agree": pooled, "worst_auroc_delta": worst, "openvino_speedup": speedup}
    qualifying = [s for s in scopes if summary[s]["qualifies"]]
    chosen = max(qualifying, key=lambda s: summary[s]["openvino_speedup"]) if qualifying else None
    return chosen, summary


def markdown(per_dataset: Mapping[str, Mapping], chosen: str | None, summary: Mapping[str, dict],
             splits: Sequence[str]) -> str:
    lines = []
    for category, result in per_dataset.items():
        lines += [f"### {category}", "",
                  "| scope (int8 convs) | backend | " + " | ".join(
                      f"{s} labels agree | {s} image AUROC Δ | {s} pixel AUROC Δ" for s in splits)
                  + " | max rel. score diff (val) | img/s | × its fp32 |",
                  "|---|---|" + "---|" * (3 * len(splits) + 3)]
        for scope, backends in result["scopes"].items():
            for backend, row in backends.items():
                cells = []
                for split in splits:
                    f = row[split]
                    cells += [f"{f['labels_agree']}/{f['images']}", f"{f['image_auroc_delta']:+.4f}",
                              f"{f['pixel_auroc_delta']:+.4f}"]
                lines.append(f"| {scope} ({row['quantized_convolutions']}/{row['convolutions']}) | {backend} | "
                             + " | ".join(cells) + f" | {row['validation']['max_rel_score_diff']:.3f} | "
                             f"{row['images_per_s']:.1f} | {row['speedup_vs_fp32']:.2f} |")
        lines.append("")
    lines += ["### The choice (validation only, pooled over " + ", ".join(per_dataset) + ")", "",
              ("| scope | labels agree (onnxruntime) | labels agree (openvino) | worst abs AUROC Δ | "
               "mean OpenVINO int8/fp32 | qualifies |"), "|---|---|---|---|---|---|"]
    for scope, s in summary.items():
        lines.append(f"| {scope} | {s['labels_agree']['onnxruntime']:.2%} | {s['labels_agree']['openvino']:.2%} | "
                     f"{s['worst_auroc_delta']:.4f} | {s['openvino_speedup']:.2f} | {'yes' if s['qualifies'] else 'no'} |")
    lines += ["", f"chosen: **{chosen}**" if chosen else "chosen: none qualifies (ship fp32/fp16 only)",
              f"(shipped default `dualstpm.export.INT8_SCOPE` = {INT8_SCOPE})"]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"), help="MVTec-layout data root")
    parser.add_argument("--category", action="append", default=[], help="repeatable; default: every category")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--params", type=Path, default=None, help="params file (default: built-in defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser.add_argument("--scope", dest="scopes", action="append", choices=INT8_SCOPES,
                        help=f"repeatable; default: all of {', '.join(INT8_SCOPES)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per throughput (median)")
    parser.add_argument("--test", action="store_true", help="also report the test split (never used to choose)")
    parser.add_argument("--refit", action="store_true", help="train again even where an identical fit exists")
    parser.add_argument("--out", type=Path, required=True, help="folder of int8_scope.json/.md, runs and exports")
    args = parser.parse_args(argv)
    args.scopes = tuple(args.scopes or INT8_SCOPES)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    categories = find_categories(args.data_root, args.category)
    per_dataset = {c: measure_category(args, c) for c in categories}
    chosen, summary = choose_scope(per_dataset, args.scopes)
    splits = ["validation", "test"] if args.test else ["validation"]
    text = markdown(per_dataset, chosen, summary, splits)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "int8_scope.json", {
        "datasets": per_dataset, "chosen": chosen, "summary": summary, "shipped": INT8_SCOPE,
        "command": " ".join(["python", "-m", "studies.int8_scope", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
        "cpus": os.cpu_count(), "load_average": os.getloadavg()})
    write_text(args.out / "int8_scope.md", text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
