"""The evidence tables of issue 11: recipe variants, learning curve, score reductions, gate leak.

Run from the project root (a module of the ``studies`` package: see studies/README.md)::

    python -m studies.study recipe --data-root ../shared/data --image-size 256 --epochs 10 --out studies/results
    python -m studies.study curve  --category magnetic_tile --curve-epochs 1,3,10,30 --out studies/results
    python -m studies.study reduce --image-size 256 --epochs 10 --out studies/results
    python -m studies.study leak   --image-size 256 --epochs 10 --out studies/results

Every subcommand runs on each category of ``--data-root`` (every folder with a ``train``
folder; ``--category`` picks some), prints a markdown table and writes
``OUT/<subcommand>.json`` and ``OUT/<subcommand>.md``. Run directories go to
``OUT/runs/<category>/<variant>``; a finished fit whose params are identical is reused
(its recorded timings with it) unless ``--refit``.

What each figure is
-------------------
- **validation** (``val_*``): the run's own validation images (normal, never trained on)
  plus one defective copy of each made by the ablation's synthetic defects
  (``dualstpm.ablation.defects.paste_defects`` with ``params.ablation.synthetic_*``),
  scored by the detector and measured by ``dualstpm.metrics``. Defaults are CHOSEN on
  these figures only (:func:`choose_variant`).
- **test**: ``dualstpm.evaluation.evaluate_detector`` on the category's test split:
  reported, never used to choose.
- **s/epoch**: wall seconds from the end of one epoch to the end of the next as ``fit``
  runs it (training, validation selection, checkpoint), median over epochs 2..n; with one
  epoch, the first epoch including decoding and the teacher-feature cache build.
  **fit s**: the whole ``fit`` call (decoding, cache, every epoch, calibration, saving,
  and any stage ``fit`` runs after the branches).

Variants are lists of ``--set``-style overrides applied by ``dualstpm.config`` exactly as
``dualstpm fit --set`` applies them; a variant naming a key this dualstpm does not have
fails before anything is trained, naming the variant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download
os.environ.setdefault("DO_NOT_TRACK", "true")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from dualstpm import metrics  # noqa: E402
from dualstpm.ablation.defects import paste_defects  # noqa: E402
from dualstpm.ablation.margin import Contributions, contributions, selection_value  # noqa: E402
from dualstpm.ablation.reductions import REDUCTIONS  # noqa: E402
from dualstpm.ablation.selection import SELECTION_METRICS  # noqa: E402
from dualstpm.compute import Compute  # noqa: E402
from dualstpm.config import AblationParams, Params, load_params  # noqa: E402
from dualstpm.data import decode_images, decode_masks, load_category, split_train_val  # noqa: E402
from dualstpm.detector import Detector  # noqa: E402
from dualstpm.errors import DualStpmError  # noqa: E402
from dualstpm.evaluation import evaluate_detector  # noqa: E402
from dualstpm.feature_cache import TeacherFeatureCache  # noqa: E402
from dualstpm.files import write_json, write_text  # noqa: E402
from dualstpm.maps import MapSet
from dualstpm.model.fusion import BRANCHES, image_score  # noqa: E402
from dualstpm.progress import progress_bar  # noqa: E402
from dualstpm.rundir import MAPS_DIR, TEST_MAPS
from dualstpm.training import Trainer, calibrate, data_signature, fit  # noqa: E402
from studies.leak import leak_test  # noqa: E402

#: the three metrics whose mean is the validation selection score (the ablation's `mean`)
SELECT = SELECTION_METRICS["mean"]
STUDY_FIT_FILE = "study_fit.json"
COMMAND = "python -m studies.study"  # how a result records the command that made it

#: issue 11, item 1: each source's recipe alone, then all four together (names: the param contract)
RECIPE = ("fit.loss_scale=2.0", "fit.select=map_mean", "model.decoder_width=full", "model.gate_form=method")
VARIANTS: dict[str, tuple[str, ...]] = {
    "baseline": (),
    "loss_scale_2": (RECIPE[0],),
    "select_map_mean": (RECIPE[1],),
    "decoder_full": (RECIPE[2],),
    "gate_method": (RECIPE[3],),
    "attention_none": ("model.attention=none",),
    "recipe": RECIPE,
}
DEFAULT_CURVE_EPOCHS = (1, 3, 10, 30)

Metrics = dict[str, float | None]


class StudyError(DualStpmError):
    """A study that cannot run as asked; the message says why and what to do."""


# --------------------------------------------------------------------------- variants and params


def parse_variant(text: str) -> tuple[str, tuple[str, ...]]:
    """`NAME=k=v,k=v` -> (NAME, ("k=v", "k=v")). A comma splits only before the next `key=`,
    so values holding commas (``fusion.weights=[[1,1,1],[1,1,1]]``) stay whole."""
    name, sep, rest = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise StudyError(f"--variant expects NAME=key=value[,key=value...], got {text!r} "
                         "(e.g. --variant lr_low=fit.lr=0.1)")
    overrides = tuple(p for p in re.split(r",(?=[A-Za-z_][\w.]*=)", rest) if p) if rest else ()
    return name, overrides


def pick_variants(extra: Sequence[str], only: str | None) -> dict[str, tuple[str, ...]]:
    """The built-in variants plus `extra` (`--variant`), restricted to `only` (comma list), in order."""
    variants = dict(VARIANTS)
    for text in extra:
        name, overrides = parse_variant(text)
        if name in variants:
            raise StudyError(f"--variant {name}: that name is taken ({', '.join(variants)}); choose another")
        variants[name] = overrides
    if only is None:
        return variants
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in variants]
    if unknown or not wanted:
        raise StudyError(f"--only {only!r}: unknown variant(s) {unknown}; known: {', '.join(variants)}")
    return {n: variants[n] for n in wanted}


def variant_params(args: argparse.Namespace, name: str, overrides: Sequence[str], epochs: int | None = None) -> Params:
    """The params of one variant: the file (or defaults), the common flags (`epochs` instead of
    --epochs when given, trained as `fit.recipe: fixed`: exactly that many epochs), `--set`, then
    the variant's overrides (a variant may set `fit.recipe=real`)."""
    common = [f"image_size={args.image_size}", f"fit.epochs={epochs or args.epochs}", "fit.recipe=fixed", *args.set]
    try:
        return load_params(args.params, [*common, *overrides])
    except DualStpmError as exc:
        raise StudyError(f"variant {name} ({', '.join(overrides) or 'no overrides'}) cannot be built: {exc}\n"
                         "(a key of the param contract that is not merged yet? leave the variant out with --only)"
                         ) from None


def decision_view(params: Params) -> str:
    """The view the model decides with (`fusion.view`)."""
    return params.fusion.view


def find_categories(data_root: Path, wanted: Sequence[str]) -> list[str]:
    """`wanted` (checked), else every folder of `data_root` with a `train` folder, sorted."""
    root = Path(data_root)
    if not root.is_dir():
        raise StudyError(f"--data-root {root} is not a folder (expected ../shared/data or an MVTec-layout root)")
    found = sorted(p.name for p in root.iterdir() if (p / "train").is_dir())
    if wanted:
        missing = [c for c in wanted if c not in found]
        if missing:
            raise StudyError(f"--category {missing} not in {root} (found: {', '.join(found) or 'none'})")
        return list(wanted)
    if not found:
        raise StudyError(f"no category (a folder with a train/ folder) in {root}")
    return found


# --------------------------------------------------------------------------- the choice rule


@dataclass(frozen=True)
class Choice:
    """The variant with the best mean validation selection score over all datasets."""

    best: str
    means: dict[str, float]  # variant -> mean over datasets of the per-dataset selection score
    datasets: tuple[str, ...]


def selection_score(figures: Mapping[str, float | None]) -> float:
    """Mean of the defined `SELECT` metrics (image AUROC, pixel AUROC, AUPRO); NaN when none is."""
    values = [figures[m] for m in SELECT if figures.get(m) is not None]
    return float(np.mean(values)) if values else math.nan


def choose_variant(evidence: Mapping[str, Mapping[str, Mapping[str, float | None]]]) -> Choice:
    """evidence[variant][dataset] = VALIDATION metrics of the view the variant decides with.

    Score of a variant: the mean over datasets of `selection_score`; the highest wins, ties go
    to the earliest variant (the baseline comes first). Every variant must have been measured
    on the same datasets, and every dataset must give a defined score: otherwise ValueError,
    since a mean over different sets would not compare like with like. Test metrics are not
    an input: they cannot influence the choice.
    """
    if not evidence:
        raise ValueError("no variant to choose from")
    datasets = {v: tuple(sorted(d)) for v, d in evidence.items()}
    reference = next(iter(datasets.values()))
    for variant, names in datasets.items():
        if names != reference:
            raise ValueError(f"variant {variant} was measured on {list(names)}, others on {list(reference)}: "
                             "choose only among variants measured on the same datasets")
    means = {}
    for variant, per_dataset in evidence.items():
        scores = {d: selection_score(f) for d, f in per_dataset.items()}
        undefined = [d for d, s in scores.items() if math.isnan(s)]
        if undefined:
            raise ValueError(f"variant {variant} has no validation selection metric on {undefined}")
        means[variant] = float(np.mean(list(scores.values())))
    best = max(means, key=lambda v: (means[v], -list(means).index(v)))
    return Choice(best, means, reference)


# --------------------------------------------------------------------------- data, once per category


@dataclass
class Decoded:
    """One category's decoded images, shared by every variant with the same split and size."""

    data_root: Path
    category: str
    _memo: dict[tuple, Any] = field(default_factory=dict)

    def split(self, params: Params, which: str) -> Tensor:
        """(N, 3, S, S) `train` or `val` images of `params`' seeded split."""
        key = (which, params.image_size, params.fit.val_fraction, params.seed, params.data.max_image_pixels)
        if key not in self._memo:
            dataset = load_category(self.data_root, self.category)
            train, val = split_train_val(dataset, params.fit.val_fraction, params.seed)
            paths = train if which == "train" else val
            self._memo[key] = decode_images(paths, params.image_size, f"decoding {len(paths)} {which} images",
                                            params.data.max_image_pixels)
        return self._memo[key]

    def validation_set(self, params: Params) -> ValidationSet:
        """The `val` split with the ablation's synthetic defects pasted on, built once per
        (split, size, `ablation.synthetic_*`) and shared by every variant that has them."""
        ab = params.ablation
        key = ("val+synthetic", params.image_size, params.fit.val_fraction, params.seed, params.data.max_image_pixels,
               tuple(ab.synthetic_kinds), ab.synthetic_per_image, ab.synthetic_seed)
        if key not in self._memo:
            self._memo[key] = ValidationSet.build(self.split(params, "val"), ab)
        return self._memo[key]


# --------------------------------------------------------------------------- measuring a detector


def score_views(detector: Detector, images: Tensor) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every view the inference module computes (`fused`, `stpm`, `recon`, and `disc` when the
    model has it): view -> (image scores (N,) float64, maps (N, S, S) float32)."""
    parts: dict[str, tuple[list, list]] = {}
    views = tuple(v for v in detector.views if v != "chosen")
    for _, scored in detector.batches(images, detector.batch_size, views):
        for view, scores in scored.scores.items():
            s, m = parts.setdefault(view, ([], []))
            s.append(scores.float().cpu().numpy().astype(np.float64))
            m.append(scored.maps[view].float().cpu().numpy())
    return {v: (np.concatenate(s), np.concatenate(m)) for v, (s, m) in parts.items()}


def quality(labels: np.ndarray, truth: metrics.PixelTruth, scores: np.ndarray, maps: np.ndarray) -> Metrics:
    """Image AUROC, pixel AUROC, AUPRO (dualstpm.metrics) of one view."""
    pixel, pro = metrics.pixel_metrics(truth, maps)
    return {"image_auroc": metrics.image_auroc(labels, scores), "pixel_auroc": pixel, "aupro": pro}


@dataclass(frozen=True)
class ValidationSet:
    """Normal validation images followed by one synthetic defective copy per `per_image`."""

    images: Tensor  # (N + M, 3, S, S)
    labels: np.ndarray  # (N + M,) 1 = synthetic defect
    masks: np.ndarray  # (N + M, S, S) bool

    @classmethod
    def build(cls, val_images: Tensor, ablation: AblationParams) -> ValidationSet:
        """The ablation's selection set (same defects, same seed) as images, not stored maps."""
        defective, masks, _ = paste_defects(val_images, list(ablation.synthetic_kinds), ablation.synthetic_per_image,
                                            ablation.synthetic_seed)
        n, size = len(val_images), val_images.shape[-1]
        return cls(torch.cat([val_images, defective]),
                   np.concatenate([np.zeros(n, np.int8), np.ones(len(defective), np.int8)]),
                   np.concatenate([np.zeros((n, size, size), bool), masks]))


def validation_evidence(detector: Detector, vset: ValidationSet) -> dict[str, Metrics]:
    """view -> validation metrics on normal + synthetic-defect images (what defaults are chosen on)."""
    truth = metrics.PixelTruth(vset.masks)
    return {view: quality(vset.labels, truth, s, m) for view, (s, m) in score_views(detector, vset.images).items()}


def test_evidence(detector: Detector, data_root: Path, category: str, maps_dir: Path | None = None) -> dict[str, Metrics]:
    """view -> test metrics from `evaluate_detector` (reported, never used to choose)."""
    result = evaluate_detector(detector, data_root, category, maps_dir=maps_dir)
    return {view: {k: value.get(k) for k in SELECT} for view, value in result.items()
            if isinstance(value, dict) and "image_auroc" in value}


# --------------------------------------------------------------------------- fitting


@dataclass
class FitRecord:
    run_dir: Path
    fit_s: float
    epoch_s: float
    epochs_s: list[float]
    selected_epochs: dict[str, int]
    reused: bool = False


def fitted(params: Params, data_root: Path, category: str, run_dir: Path, refit: bool) -> FitRecord:
    """Fit `params` into `run_dir` and time it, or reuse a finished study fit there with identical params."""
    marker = run_dir / STUDY_FIT_FILE
    wanted = {"params": params.to_dict(), "data_root": str(Path(data_root).resolve()), "category": category}
    if not refit and marker.is_file() and (run_dir / "model").is_dir():
        saved = json.loads(marker.read_text())
        if json.loads(json.dumps(wanted)) == saved["inputs"]:
            print(f"reusing the fit in {run_dir} (identical params; --refit to train again)", file=sys.stderr)
            return FitRecord(run_dir, saved["fit_s"], saved["epoch_s"], saved["epochs_s"], saved["selected_epochs"], True)
    stamps: list[float] = []
    start = time.perf_counter()
    result = fit(params, data_root, category, run_dir, overwrite=True,
                 on_epoch=lambda _record: stamps.append(time.perf_counter()))
    fit_s = time.perf_counter() - start
    intervals = list(np.diff([start, *stamps]))
    epoch_s = statistics.median(intervals[1:]) if len(intervals) > 1 else intervals[0]
    record = FitRecord(run_dir, fit_s, float(epoch_s), [float(x) for x in intervals], dict(result.selected_epochs))
    write_json(marker, {"inputs": wanted, "fit_s": record.fit_s, "epoch_s": record.epoch_s,
                        "epochs_s": record.epochs_s, "selected_epochs": record.selected_epochs})
    return record


# --------------------------------------------------------------------------- tables


def _f(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def recipe_table(category: str, results: Mapping[str, dict]) -> str:
    """One row per (variant, view): validation and test figures, timings on the variant's first row."""
    rows = []
    for variant, r in results.items():
        for i, view in enumerate(r["validation"]):
            val, test = r["validation"][view], r["test"].get(view, {})
            mark = " (decides)" if view == r["decision_view"] else ""
            rows.append([variant if i == 0 else "", view + mark, *(_f(val[m]) for m in SELECT),
                         _f(selection_score(val)), *(_f(test.get(m)) for m in SELECT),
                         _f(r["epoch_s"], 1) if i == 0 else "", _f(r["fit_s"], 1) if i == 0 else ""])
    header = ["variant", "view", "val image AUROC", "val pixel AUROC", "val AUPRO", "val selection",
              "test image AUROC", "test pixel AUROC", "test AUPRO", "s/epoch", "fit s"]
    return f"### {category}\n\n" + markdown(header, rows)


def choice_lines(choice: Choice) -> str:
    ranked = sorted(choice.means.items(), key=lambda kv: -kv[1])
    return (f"**Chosen by validation across all datasets ({', '.join(choice.datasets)}): {choice.best}** "
            "(mean over datasets of the validation selection score, the mean of image AUROC, pixel AUROC "
            "and AUPRO of the view each variant decides with; test figures play no part)\n\n"
            + markdown(["variant", "mean validation selection"], [[v, _f(s, 4)] for v, s in ranked]))


# --------------------------------------------------------------------------- subcommands


def run_recipe(args: argparse.Namespace, categories: Sequence[str]) -> tuple[dict, str]:
    variants = pick_variants(args.variant, args.only)
    params = {name: variant_params(args, name, ov) for name, ov in variants.items()}  # all checked before any fit
    out: dict[str, Any] = {"variants": {n: list(ov) for n, ov in variants.items()}, "datasets": {}}
    tables = []
    for category in categories:
        decoded = Decoded(args.data_root, category)
        results: dict[str, dict] = {}
        for name, p in params.items():
            record = fitted(p, args.data_root, category, args.out / "runs" / category / name, args.refit)
            detector = Detector.load(record.run_dir)  # float32, as it is served
            vset = decoded.validation_set(p)
            view = decision_view(p)
            validation = validation_evidence(detector, vset)
            if view not in validation:
                raise StudyError(f"variant {name} decides with the view {view!r}, which the detector does not "
                                 f"score (it scores {', '.join(validation)})")
            results[name] = {
                "overrides": list(variants[name]), "run_dir": str(record.run_dir), "decision_view": view,
                "validation": validation,
                "test": test_evidence(detector, args.data_root, category),
                "fit_s": record.fit_s, "epoch_s": record.epoch_s, "epochs_s": record.epochs_s,
                "selected_epochs": record.selected_epochs, "fit_reused": record.reused,
            }
            out["datasets"][category] = results
            write_json(args.out / "recipe.json", out)  # after every variant: a long study can be read as it goes
        tables.append(recipe_table(category, results))
    evidence = {v: {c: out["datasets"][c][v]["validation"][out["datasets"][c][v]["decision_view"]]
                    for c in categories} for v in variants}
    choice = choose_variant(evidence)
    out["chosen"] = {"variant": choice.best, "means": choice.means, "datasets": list(choice.datasets)}
    return out, "\n\n".join([*tables, choice_lines(choice)])


def current_detector(trainer: Trainer, val_images: Tensor, category: str) -> Detector:
    """The trainer's model as it is now (not the selected epoch), calibrated on the validation images."""
    epochs = {b: trainer.epochs_done for b in BRANCHES}
    calibration = calibrate(trainer.model, trainer.params, val_images, trainer.compute, epochs, category)
    return Detector(trainer.model, trainer.params, calibration, trainer.compute)


def run_curve(args: argparse.Namespace, categories: Sequence[str]) -> tuple[dict, str]:
    """ONE fit per category to the largest listed epoch, measuring the current state after each listed one."""
    wanted = sorted(set(args.curve_epochs))
    params = variant_params(args, "baseline", (), epochs=wanted[-1])
    compute = Compute.resolve(params.fit.device, params.fit.precision)
    out: dict[str, Any] = {"epochs": wanted, "datasets": {}}
    tables = []
    for category in categories:
        decoded = Decoded(args.data_root, category)
        train, val = decoded.split(params, "train"), decoded.split(params, "val")
        vset = ValidationSet.build(val, params.ablation)
        dataset = load_category(args.data_root, category)
        run_dir = args.out / "runs" / category / "curve"
        run_dir.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(params, run_dir, compute, data_signature(dataset, *split_train_val(
            dataset, params.fit.val_fraction, params.seed)))
        view = decision_view(params)
        rows, table_rows, train_s = [], [], 0.0
        cache = None
        try:
            start = time.perf_counter()
            if params.fit.cache:
                cache = TeacherFeatureCache.build(trainer.model, train, params.fit.batch_size, compute,
                                                  params.fit.cache_ram_gb * 2**30, run_dir)
            train_s += time.perf_counter() - start
            with progress_bar() as progress:
                while trainer.epochs_done < wanted[-1]:
                    start = time.perf_counter()
                    losses = trainer.train_epoch(train, progress, cache)
                    train_s += time.perf_counter() - start
                    trainer.epochs_done += 1
                    selection = trainer.select(val)
                    if trainer.epochs_done in wanted:
                        detector = current_detector(trainer, val, category)
                        row = {"epoch": trainer.epochs_done, "train_s": train_s, **losses, **selection,
                               "validation": validation_evidence(detector, vset),
                               "test": test_evidence(detector, args.data_root, category)}
                        rows.append(row)
                        val_v, test_v = row["validation"][view], row["test"][view]
                        table_rows.append([str(row["epoch"]), *(_f(val_v[m]) for m in SELECT), _f(selection_score(val_v)),
                                           *(_f(test_v[m]) for m in SELECT), _f(train_s, 1)])
        finally:
            if cache is not None:
                cache.close()
        out["datasets"][category] = rows
        header = ["epoch", "val image AUROC", "val pixel AUROC", "val AUPRO", "val selection", "test image AUROC",
                  "test pixel AUROC", "test AUPRO", "train s (cumulative, cache included)"]
        tables.append(f"### {category} (view {view}; the state after that epoch, not the selected one; "
                      "the two branches only, as `Trainer` trains them)\n\n"
                      + markdown(header, table_rows))
    return out, "\n\n".join(tables)


def reduction_aurocs(labels: np.ndarray, maps: np.ndarray) -> dict[str, float | None]:
    """Reduction label -> image AUROC of the (N, S, S) maps reduced that way."""
    stack = torch.from_numpy(maps)
    return {spec.label: metrics.image_auroc(labels, image_score(stack, spec).numpy().astype(np.float64))
            for spec in REDUCTIONS}


def baseline_run(args: argparse.Namespace, category: str) -> tuple[Params, FitRecord]:
    """The baseline's fit (the recipe's `baseline` run, reused when its params are identical)."""
    params = variant_params(args, "baseline", ())
    return params, fitted(params, args.data_root, category, args.out / "runs" / category / "baseline", args.refit)


def run_reduce(args: argparse.Namespace, categories: Sequence[str]) -> tuple[dict, str]:
    out: dict[str, Any] = {"reductions": [r.label for r in REDUCTIONS], "datasets": {}}
    tables = []
    for category in categories:
        params, record = baseline_run(args, category)
        detector = Detector.load(record.run_dir)
        vset = Decoded(args.data_root, category).validation_set(params)
        val_maps = score_views(detector, vset.images)
        test_evidence(detector, args.data_root, category, maps_dir=record.run_dir / MAPS_DIR)  # stores the maps
        test = MapSet.load(record.run_dir / MAPS_DIR / TEST_MAPS)
        per_view = {}
        for view in val_maps:
            if view not in ("fused", *BRANCHES):
                continue  # a view that is not a fusion of the six stored maps cannot be re-scored from them
            test_fused = detector.inference.views.stack_maps(test.maps, view)
            per_view[view] = {"validation": reduction_aurocs(vset.labels, val_maps[view][1]),
                              "test": reduction_aurocs(test.labels, test_fused)}
        out["datasets"][category] = per_view
        header = ["reduction", *(f"{split} {view}" for view in per_view for split in ("val", "test"))]
        rows = [[label, *(_f(per_view[v][s][label]) for v in per_view for s in ("validation", "test"))]
                for label in (r.label for r in REDUCTIONS)]
        tables.append(f"### {category} (image AUROC; val = validation images + synthetic defects)\n\n"
                      + markdown(header, rows))
    return out, "\n\n".join(tables)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_leak(args: argparse.Namespace, categories: Sequence[str]) -> tuple[dict, str]:
    out: dict[str, Any] = {"datasets": {}}
    tables = []
    for category in categories:
        params, record = baseline_run(args, category)
        detector = Detector.load(record.run_dir)
        dataset = load_category(args.data_root, category)
        if not dataset.has_ground_truth:
            raise StudyError(f"{category} has no ground_truth masks: the leak test needs defect masks")
        defective = [s for s in dataset.test if s.label == 1]
        size, limit = params.image_size, params.data.max_image_pixels
        images = decode_images([s.path for s in defective], size, f"decoding {len(defective)} defective images", limit)
        masks, _ = decode_masks(defective, size, limit)
        result = leak_test(detector.model, images, masks, Decoded(args.data_root, category).split(params, "val"))
        out["datasets"][category] = result
        rows = [[k, _f(v, 4) if isinstance(v, float) else str(v)] for k, v in flatten(result).items()]
        tables.append(f"### {category}\n\n" + markdown(["figure", "value"], rows))
    return out, "\n\n".join(tables)


# --------------------------------------------------------------------------- choosing robustly


@dataclass(frozen=True)
class PooledMargin:
    """A variant's gain over the baseline in the validation selection metric, averaged over
    datasets, with the one-sided lower bound of a bootstrap that resamples each dataset's
    validation images (a synthetic copy goes with its base image) independently."""

    variant: str
    observed: float
    lower_bound: float
    per_dataset: dict[str, float]
    n_resamples: int

    @property
    def adopted(self) -> bool:
        return self.lower_bound > 0


def pooled_margin(variant: str, base: Mapping[str, Contributions], challenger: Mapping[str, Contributions],
                  n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> PooledMargin:
    """`margin.bootstrap_margin`'s rule on evidence pooled over datasets: per resample, each
    dataset's units are drawn with replacement, the gain (challenger - base, selection metric
    `mean`) is taken per dataset and averaged. Resamples undefined on a dataset are dropped."""
    rng = np.random.default_rng([seed, 0x5EED])
    per_dataset = {c: selection_value(challenger[c], np.ones(len(base[c].n_good)), "mean")
                   - selection_value(base[c], np.ones(len(base[c].n_good)), "mean") for c in base}
    gains = []
    for _ in range(n_resamples):
        values = []
        for c, b in base.items():
            n = len(b.n_good)
            w = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
            values.append(selection_value(challenger[c], w, "mean") - selection_value(b, w, "mean"))
        gains.append(np.mean(values))
    gains_arr = np.asarray(gains)
    gains_arr = gains_arr[~np.isnan(gains_arr)]
    lower = float(np.quantile(gains_arr, 1 - confidence)) if gains_arr.size else float("nan")
    return PooledMargin(variant, float(np.mean(list(per_dataset.values()))), lower, per_dataset, int(gains_arr.size))


def validation_contributions(detector: Detector, vset: ValidationSet, per_image: int) -> Contributions:
    """The decision view's per-image contributions on a validation set (`margin.contributions`):
    normal image i is unit i, its `per_image` synthetic copies follow it in `paste_defects`' order."""
    n_normal = int((vset.labels == 0).sum())
    units = np.concatenate([np.arange(n_normal), np.repeat(np.arange(n_normal), per_image)])
    scores, maps = score_views(detector, vset.images)[detector.decision_view]
    return contributions(scores, vset.labels, units, n_normal, maps, vset.masks)


def run_choose(args: argparse.Namespace, categories: Sequence[str]) -> tuple[dict, str]:
    """The default each variant of a finished `recipe` run (OUT/recipe.json) would earn: a
    variant replaces the baseline only when its pooled bootstrap lower bound is > 0 (the
    ablation's adoption rule, issue 11 item 4, pooled over datasets); among those, the
    largest observed gain. Loads the fitted models, fits nothing; test figures are not read."""
    recipe = json.loads((args.out / "recipe.json").read_text())
    datasets = [c for c in categories if c in recipe["datasets"]]
    variants = list(recipe["variants"])
    evidence: dict[str, dict[str, Contributions]] = {v: {} for v in variants}
    for category in datasets:
        decoded = Decoded(args.data_root, category)
        for variant in variants:
            detector = Detector.load(Path(recipe["datasets"][category][variant]["run_dir"]))
            vset = decoded.validation_set(detector.params)
            evidence[variant][category] = validation_contributions(detector, vset,
                                                                   detector.params.ablation.synthetic_per_image)
    if args.baseline not in evidence:
        raise StudyError(f"no variant {args.baseline!r} in {args.out / 'recipe.json'} to compare with: "
                         f"pass --baseline one of {', '.join(variants)}")
    margins = [pooled_margin(v, evidence[args.baseline], evidence[v], seed=args.seed_bootstrap)
               for v in variants if v != args.baseline]
    adopted = [m for m in margins if m.adopted]
    best = max(adopted, key=lambda m: m.observed).variant if adopted else args.baseline
    rows = [[m.variant, f"{m.observed:+.4f}", f"{m.lower_bound:+.4f}",
             *(f"{m.per_dataset[c]:+.4f}" for c in datasets), "yes" if m.adopted else "no"] for m in margins]
    header = ["variant", f"gain vs {args.baseline} (mean over datasets)", "95 % lower bound", *datasets, "adopted"]
    out = {"datasets": datasets, "margins": [asdict(m) for m in margins], "chosen": best}
    return out, (f"### Validation evidence pooled over {', '.join(datasets)} (selection metric: mean of image "
                 f"AUROC, pixel AUROC, AUPRO; {margins[0].n_resamples if margins else 0} resamples)\n\n"
                 + markdown(header, rows) + f"\n\nChosen default: **{best}**")


SUBCOMMANDS = {"recipe": run_recipe, "choose": run_choose, "curve": run_curve, "reduce": run_reduce, "leak": run_leak}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-root", type=Path, default=Path("../shared/data"), help="MVTec-layout data root")
    common.add_argument("--category", action="append", default=[],
                        help="category (repeatable or comma list; default: every one in --data-root)")
    common.add_argument("--image-size", type=int, default=256)
    common.add_argument("--epochs", type=int, default=10)
    common.add_argument("--params", type=Path, default=None, help="params file (default: built-in defaults)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for every variant (repeatable)")
    common.add_argument("--refit", action="store_true", help="train again even where an identical fit exists")
    common.add_argument("--out", type=Path, required=True, help="folder of the JSON, markdown and run directories")
    sub = parser.add_subparsers(dest="command", required=True)
    recipe = sub.add_parser("recipe", parents=[common], help="recipe variants side by side")
    recipe.add_argument("--variant", action="append", default=[], metavar="NAME=k=v,k=v", help="add a variant")
    recipe.add_argument("--only", default=None, help="comma list of the variants to run")
    curve = sub.add_parser("curve", parents=[common], help="learning curve of one fit")
    curve.add_argument("--curve-epochs", type=lambda s: [int(x) for x in s.split(",")],
                       default=list(DEFAULT_CURVE_EPOCHS), help="epochs after which to measure (default 1,3,10,30)")
    choose = sub.add_parser("choose", parents=[common], help="robust choice among a finished recipe run's variants")
    choose.add_argument("--seed-bootstrap", type=int, default=0, help="seed of the pooled bootstrap")
    choose.add_argument("--baseline", default="baseline", help="the variant the others must beat")
    sub.add_parser("reduce", parents=[common], help="image-score reductions on the baseline's maps")
    sub.add_parser("leak", parents=[common], help="the gate leak test on the baseline")
    args = parser.parse_args(argv)
    args.category = [c.strip() for text in args.category for c in text.split(",") if c.strip()]
    if getattr(args, "curve_epochs", None) is not None and min(args.curve_epochs) < 1:
        parser.error("--curve-epochs must be positive integers")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        categories = find_categories(args.data_root, args.category)
        result, table = SUBCOMMANDS[args.command](args, categories)
    except DualStpmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result.update({
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads()},
        "markdown": table,
    })
    write_json(args.out / f"{args.command}.json", result)
    write_text(args.out / f"{args.command}.md", table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
