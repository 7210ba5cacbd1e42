"""Behaviour unchanged? Run the product's commands on real categories with one checkout, then
diff two such runs (issue 21: a refactor must leave every figure as it was).

    # in the checkout BEFORE the change, then in the one AFTER (same machine, same settings):
    python studies/behaviour_diff.py run  /tmp/before --data-root ../shared/data
    python studies/behaviour_diff.py run  /tmp/after  --data-root ../shared/data
    python studies/behaviour_diff.py diff /tmp/before /tmp/after

`run` calls `python -m dualstpm` (the checkout on PYTHONPATH / the current directory) for
each category: fit, test, ablate, then predict on the category's test images, with an MLflow
store of its own inside OUT. It keeps RUN/metrics.json, RUN/model/calibration.json,
RUN/ablation/summary.json and the predictions' predictions.csv under OUT/<category>/.

`diff` compares those files value by value: JSON numbers and CSV cells must be equal as
written (floats to the last printed digit), except keys that hold wall-clock times, dates,
MLflow run ids or absolute paths (listed in VOLATILE), which are skipped; a text that names
a file under OUT (e.g. summary.json's `run` and `fusion_file`) is compared with OUT itself
left out. It prints each difference with its largest absolute gap and exits 1 when any
figure differs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

FILES = {"metrics.json": "run/metrics.json", "calibration.json": "run/model/calibration.json",
         "summary.json": "run/ablation/summary.json", "predictions.csv": "predict/predictions.csv"}
#: keys whose values change from run to run whatever the code does
VOLATILE = re.compile(r"(^|_)(s|seconds|time|timing|timings|elapsed|date|created|run_id|mlflow|path|paths|dir|root|"
                      r"overlay|cache|started|finished|host|duration|wall)($|_)|_s$|per_s$|images_per_s", re.I)


def run(out: Path, data_root: Path, categories: list[str], image_size: int, epochs: int, seed: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{(out / 'mlflow.db').resolve()}"}
    settings = ["--set", f"image_size={image_size}", "--set", f"fit.epochs={epochs}", "--set", "fit.recipe=fixed",
                "--set", f"seed={seed}"]
    for category in categories:
        run_dir = out / category / "run"
        steps = [
            ["fit", "--data-root", str(data_root), "--category", category, "--out", str(run_dir), *settings],
            ["test", "--run", str(run_dir), "--data-root", str(data_root)],
            ["ablate", "--run", str(run_dir)],
            ["predict", "--run", str(run_dir), "--out", str(out / category / "predict"),
             str(data_root / category / "test")],
        ]
        for step in steps:
            print("+ dualstpm", " ".join(step), flush=True)
            subprocess.run([sys.executable, "-m", "dualstpm", *step], check=True, env=env)


def _walk(a, b, where: str, gaps: list[tuple[str, str]], roots: tuple[str, str] = ("", "")) -> None:
    """Append (where, what) for each difference of `a` (before) and `b` (after); `roots`: the
    two OUT folders, left out of texts that name a file under them."""
    if isinstance(a, str) and isinstance(b, str) and all(roots):
        a, b = a.replace(roots[0], "OUT"), b.replace(roots[1], "OUT")
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if VOLATILE.search(str(key)):
                continue
            if key not in a or key not in b:
                gaps.append((f"{where}.{key}", "only in " + ("after" if key not in a else "before")))
            else:
                _walk(a[key], b[key], f"{where}.{key}", gaps, roots)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            gaps.append((where, f"length {len(a)} vs {len(b)}"))
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, f"{where}[{i}]", gaps, roots)
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    elif a != b:
        gap = f"{a!r} vs {b!r}"
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            gap += f" (|gap| {abs(a - b):.3g})"
        gaps.append((where, gap))


def _read(path: Path):
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    # rows keyed by file name (paths differ between OUT folders); numbers compared as written
    return {Path(row.get("path") or row.get("image") or str(i)).name: row for i, row in enumerate(rows)}


def diff(before: Path, after: Path) -> int:
    failed = 0
    for category in sorted(p.name for p in before.iterdir() if (p / "run").is_dir()):
        for name, rel in FILES.items():
            a, b = before / category / rel, after / category / rel
            if not a.is_file() or not b.is_file():
                print(f"{category}/{name}: missing in {'before' if not a.is_file() else 'after'}")
                failed += 1
                continue
            gaps: list[tuple[str, str]] = []
            _walk(_read(a), _read(b), name, gaps, (str(before.resolve()), str(after.resolve())))
            print(f"{category}/{name}: {'identical' if not gaps else f'{len(gaps)} differences'}")
            for where, gap in gaps[:40]:
                print(f"    {where}: {gap}")
            failed += bool(gaps)
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("out", type=Path)
    r.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    r.add_argument("--categories", default="battery_weld,magnetic_tile")
    r.add_argument("--image-size", type=int, default=128)
    r.add_argument("--epochs", type=int, default=3)
    r.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("diff")
    d.add_argument("before", type=Path)
    d.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        run(args.out, args.data_root.resolve(), args.categories.split(","), args.image_size, args.epochs, args.seed)
        return 0
    return diff(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
