"""Seed spread of our model at the comparison's settings: fit, `dualstpm test`, then the
pipeline's `ablate` stage, once per seed.

One row per seed: the fused view (params.fusion) and the branches on the test split, and
what `ablate` chose on validation data and what that choice scores on the test split
(reported, never used to choose). Run it from the project root::

    python -m studies.seeds --data-root ../shared/data --category battery_weld --seeds 0,1,2 \\
        --out studies/results/seeds/battery_weld.json

It can measure another checkout's library (a worktree of an older commit) with the same
settings: put that checkout first on ``PYTHONPATH`` and this one after it, and run with
``-P`` so that Python does not put the working directory (this checkout's ``dualstpm``)
ahead of them::

    PYTHONPATH=/path/to/old-checkout:$PWD python -P -m studies.seeds --data-root ../shared/data ...

That is how the seed figures of docs/results/part-level/seeds.md were made for the main the issue
was filed on. The settings are `studies/compare_anomalib.py`'s (256 px, 10 epochs, batch
16, the Lite0/Lite2 package teachers); `--set` adds overrides. Run directories go under
``--work-dir`` (kept; default studies/results/seeds/runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dualstpm.ablation.run import ablate
from dualstpm.config import load_params
from dualstpm.evaluation import test_run
from dualstpm.files import json_text, write_json
from dualstpm.training import fit

HEADLINE = ("image_auroc", "pixel_auroc", "aupro")
SETTINGS = ["image_size=256", "fit.epochs=10", "fit.recipe=fixed", "fit.batch_size=16", "model.t1.name=tf_efficientnet_lite0",
            "model.t1.weights=package", "model.t2.name=tf_efficientnet_lite2", "model.t2.weights=package"]


def one_seed(data_root: Path, category: str, seed: int, overrides: list[str], run_dir: Path) -> dict:
    """Fit, test and ablate one seed; its figures (test split) and the ablation's decision."""
    params = load_params(None, [*SETTINGS, f"seed={seed}", *overrides])
    start = time.perf_counter()
    fit(params, data_root, category, run_dir, overwrite=True)
    tested = test_run(run_dir, data_root, category)
    summary = ablate(run_dir, params.ablation).summary
    chosen = summary["fused_chosen"]
    return {"views": {v: {k: tested[v][k] for k in HEADLINE} for v in ("fused", "stpm", "recon")},
            "ablation": {"config": chosen["config"], "adopted": bool(chosen.get("adopted")),
                         "decision": summary.get("margin", {}).get("decision"),
                         "test": {k: chosen[k] for k in HEADLINE}},
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--seeds", default="0,1,2", help="comma list")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--work-dir", type=Path, default=Path("studies/results/seeds/runs"))
    parser.add_argument("--out", type=Path, required=True, help="JSON, extended seed by seed (a rerun skips done seeds)")
    args = parser.parse_args(argv)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for seed in (int(s) for s in args.seeds.split(",")):
        if str(seed) in results:
            continue
        results[str(seed)] = one_seed(args.data_root, args.category, seed, args.set,
                                      args.work_dir / f"{args.category}_{seed}")
        print(args.category, seed, json_text(results[str(seed)], indent=None), flush=True)
        write_json(args.out, results, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
