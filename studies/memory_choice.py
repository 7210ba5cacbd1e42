"""Choose the decision view among `fused`, `memory` and `fused+memory` on validation evidence of
all datasets at once (issue 22, items 3 and 6), from `studies.memory_evidence` outputs::

    python -m studies.memory_choice studies/results/memory/*.json --out studies/results/memory/choice.json

The rule is the one the recipe study and `dualstpm ablate` use (docs/results/part-level):
a candidate replaces `fused` only when its gain in validation image AUROC, averaged over the
datasets, keeps a one-sided 95 % bootstrap lower bound above 0; among those that pass, the
largest mean gain wins. Each dataset's evidence is its *real* validation defects when it has
them, else synthetic defects pasted on its selection images. A bootstrap resample draws, per
dataset, the good selection images with replacement (a pasted copy goes with its base image),
and the real defects with replacement. No test figure is read.

Pixel AUROC cannot be resampled from image scores alone; its validation point estimates are
printed beside the choice, and a candidate whose pixel AUROC falls more than 0.005 below
`fused`'s on any dataset is refused (the issue's bound for the shipped model, "on any
dataset").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dualstpm import metrics
from dualstpm.files import write_json

CANDIDATES = ("memory", "fused+memory")
BASELINE = "fused"
PIXEL_TOLERANCE = 0.005


def evidence_of(result: dict) -> tuple[str, dict]:
    """('real' | 'synthetic', per-view scores) of one dataset: its real defects when it has them."""
    scores = result["validation_scores"]
    return ("real", scores["real"]) if "real" in scores else ("synthetic", scores["synthetic"])


def auroc(good: np.ndarray, defect: np.ndarray) -> float:
    labels = np.concatenate([np.zeros(len(good), np.int8), np.ones(len(defect), np.int8)])
    return float(metrics.image_auroc(labels, np.concatenate([good, defect])))


def resample(kind: str, scores: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices (good, defect) of one bootstrap draw of a dataset's evidence."""
    n_good = len(scores[BASELINE]["good"])
    good = rng.integers(0, n_good, n_good)
    if kind == "real":
        n_defect = len(scores[BASELINE]["defect"])
        return good, rng.integers(0, n_defect, n_defect)
    base = np.asarray(scores[BASELINE]["defect_base"])
    return good, np.concatenate([np.flatnonzero(base == g) for g in good])


def gains(results: list[dict], resamples: int, seed: int) -> dict:
    """Per candidate: the mean gain over datasets in validation image AUROC, its bootstrap lower
    bound (5th percentile) and each dataset's point gain."""
    rng = np.random.default_rng(seed)
    evidence = [evidence_of(r) for r in results]

    def view_auroc(scores: dict, view: str, good: np.ndarray | None = None, defect: np.ndarray | None = None) -> float:
        g, d = np.asarray(scores[view]["good"]), np.asarray(scores[view]["defect"])
        return auroc(g if good is None else g[good], d if defect is None else d[defect])

    out = {}
    for view in CANDIDATES:
        point = [view_auroc(s, view) - view_auroc(s, BASELINE) for _, s in evidence]
        draws = []
        for _ in range(resamples):
            per_dataset = []
            for kind, s in evidence:
                good, defect = resample(kind, s, rng)
                per_dataset.append(view_auroc(s, view, good, defect) - view_auroc(s, BASELINE, good, defect))
            draws.append(float(np.mean(per_dataset)))
        out[view] = {"mean_gain": float(np.mean(point)), "lower_bound_95": float(np.percentile(draws, 5)),
                     "per_dataset": dict(zip([r["category"] + f" ({k})" for r, (k, _) in zip(results, evidence)],
                                             point, strict=True))}
    return out


def pixel_aurocs(result: dict) -> dict[str, float | None]:
    """Each view's validation pixel AUROC on one dataset: its real defects with masks where present, else synthetic."""
    real = result["validation"]["real"]
    source = (real if real is not None and real[BASELINE].get("pixel_auroc") is not None
              else result["validation"]["synthetic"])
    return {view: source[view]["pixel_auroc"] for view in (BASELINE, *CANDIDATES)}


def pixel_losses(results: list[dict], view: str) -> list[str]:
    """The datasets where `view`'s validation pixel AUROC is more than PIXEL_TOLERANCE below `fused`'s."""
    out = []
    for r in results:
        pixel = pixel_aurocs(r)
        if None not in (pixel[view], pixel[BASELINE]) and pixel[view] < pixel[BASELINE] - PIXEL_TOLERANCE:
            out.append(f"{r['category']}: {pixel[view]:.3f} against {pixel[BASELINE]:.3f}")
    return out


def choose(results: list[dict], resamples: int = 1000, seed: int = 0) -> dict:
    by_view = gains(results, resamples, seed)
    for view, figures in by_view.items():
        figures["pixel_losses"] = pixel_losses(results, view)
    passing = {v: g for v, g in by_view.items() if g["lower_bound_95"] > 0 and not g["pixel_losses"]}
    chosen = max(passing, key=lambda v: passing[v]["mean_gain"]) if passing else BASELINE
    return {"datasets": [r["category"] + f" ({r['image_size']} px)" for r in results], "resamples": resamples,
            "gains": by_view, "validation_pixel_auroc": {r["category"]: pixel_aurocs(r) for r in results},
            "chosen": chosen}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evidence", type=Path, nargs="+", help="studies.memory_evidence JSON files, one per dataset")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = [json.loads(p.read_text()) for p in args.evidence]
    missing = [str(p) for p, r in zip(args.evidence, results, strict=True) if "validation_scores" not in r]
    if missing:
        print(f"error: {', '.join(missing)} lack per-image validation scores: rerun studies.memory_evidence",
              file=sys.stderr)
        return 2
    result = choose(results, args.resamples)
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
