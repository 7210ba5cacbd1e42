"""The loop demo's line: which parts the model trains on, which arrive later, and the inspector.

A library for `studies/loop_demo.py` (not a script). It splits one real category into

- the **starting data**: a copy of the category with some of its ``train/good`` images held
  back and some of its defective test images (with their masks) taken out of ``test/``;
- the **line batch**: the held-back good images ("new parts the model never saw") and the
  defective ones taken out, shuffled and renamed ``part-NNN<suffix>`` so nothing in a name
  tells the truth; the truth is kept apart (:class:`LineBatch`), as the inspector's eyes;

and it stands in for the inspector: :func:`review_from_truth` gives every scored part of a
batch the verdict its ground truth says, through the review page's own session
(:func:`dualstpm.review.app.open_review`, whose ``record`` writes the review log with
:mod:`dualstpm.review.log`), a defective part with its ground-truth mask. It also makes the
lighting-shifted copy of a batch (:func:`shifted_copy`).

The split never touches the source folder: it only reads it.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageEnhance

from dualstpm.data.images import list_images, read_mask
from dualstpm.data.mvtec import GOOD, Category, load_category
from dualstpm.files import file_digest

DEFECTIVE = "defective"
TRUTH_FILE = "truth.json"
REVIEWER = "loop-demo (verdicts from the ground truth)"


@dataclass(frozen=True)
class LinePart:
    """One part of the line batch: its file in the batch (`name`), its ground truth
    (`truth`: good/defective, `defect_type`: the test sub-folder or None), the source image
    and, for a defective part, its ground-truth mask in the source category (or None)."""

    name: str
    truth: str
    defect_type: str | None
    source: str
    mask: str | None


@dataclass(frozen=True)
class LineBatch:
    """The batch folder and the truth of each of its parts, by file name."""

    folder: Path
    parts: dict[str, LinePart]

    def write_truth(self, path: Path) -> None:
        """The truth as JSON ({name: LinePart fields}), kept beside the batch, never in it."""
        path.write_text(json.dumps({n: asdict(p) for n, p in self.parts.items()}, indent=2) + "\n")


@dataclass(frozen=True)
class Split:
    """What the starting data keeps and what goes to the line.

    `train`: the train/good images kept; `held_back`: the train/good images that arrive on
    the line instead; `line_defects`: (image, defect type, mask or None) taken out of test/;
    `test`: the test images kept (the evaluation set of every model of the demo);
    `duplicated_train`: how many train/good images have the same bytes as another image of
    the category (never sent to the line)."""

    category: Category
    duplicated_train: int
    train: tuple[Path, ...]
    held_back: tuple[Path, ...]
    line_defects: tuple[tuple[Path, str, Path | None], ...]
    test: tuple[Path, ...]


def plan_split(data_root: Path, category: str, holdout_good: int, line_defects: int, seed: int,
               max_train: int | None = None) -> Split:
    """Choose, seeded, `holdout_good` train/good images and `line_defects` defective test
    images (spread over the defect types in turn) for the line, among those whose bytes no
    other image of the category has (battery_weld's train/good holds copies of test/good
    images: on the line they would be no new part, and `feedback apply` refuses test
    images); the rest is the starting data (train/good capped at `max_train` images when
    given). Raises ValueError when the category
    has too few images for that (at least 4 train images must stay: the fit's validation and
    calibration split needs them; at least one defective image must stay in test/)."""
    found = load_category(data_root, category, require_test=True)
    if found.validation is not None:
        raise ValueError(f"{found.root} has a validation/ folder: the demo splits train/good alone; "
                         "use a category without validation/ (battery_weld, magnetic_tile)")
    rng = random.Random(seed)
    train = list(found.train)
    digests, counts = _digests([*train, *(s.path for s in found.test)])
    unique = [i for i, p in enumerate(train) if counts[digests[p]] == 1]
    if holdout_good < 1 or holdout_good > min(len(unique), len(train) - 4):
        raise ValueError(f"--holdout-good {holdout_good}: {found.root / 'train' / GOOD} has {len(train)} images, "
                         f"{len(unique)} of them unlike any other image of the category; hold back between 1 and "
                         f"{min(len(unique), len(train) - 4)} (at least 4 must stay to train and calibrate)")
    held = set(rng.sample(unique, holdout_good))
    kept = [p for i, p in enumerate(train) if i not in held]
    if max_train is not None:
        if max_train < 4:
            raise ValueError(f"--max-train {max_train}: at least 4 images are needed to train and calibrate")
        kept = sorted(rng.sample(kept, min(max_train, len(kept))))
    by_type: dict[str, list] = {}
    for sample in found.test:
        if sample.label == 1 and counts[digests[sample.path]] == 1:
            by_type.setdefault(sample.defect_type, []).append(sample)
    n_defective = sum(len(v) for v in by_type.values())
    if line_defects < 0 or line_defects > n_defective - 1:
        raise ValueError(f"--line-defects {line_defects}: the category has {n_defective} defective test images unlike "
                         f"any other of its images; take "
                         f"between 0 and {n_defective - 1} (at least one must stay in test/)")
    pools = {t: rng.sample(samples, len(samples)) for t, samples in sorted(by_type.items())}
    taken = []
    while len(taken) < line_defects:
        for pool in pools.values():
            if pool and len(taken) < line_defects:
                taken.append(pool.pop())
    taken_paths = {s.path for s in taken}
    return Split(
        category=found,
        duplicated_train=len(train) - len(unique),
        train=tuple(kept),
        held_back=tuple(p for i, p in enumerate(train) if i in held),
        line_defects=tuple((s.path, s.defect_type, s.mask_path) for s in taken),
        test=tuple(s.path for s in found.test if s.path not in taken_paths),
    )


def _digests(paths: list[Path]) -> tuple[dict[Path, str], Counter]:
    """Each file's SHA-256, and how many of `paths` have each one."""
    digests = {p: file_digest(p) for p in paths}
    return digests, Counter(digests.values())


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source, target)


def write_starting_data(split: Split, target: Path) -> Path:
    """Copy the starting data into `target` (the category folder, created): the kept
    train/good images, the kept test images and their masks (same relative paths as in
    the source). Returns `target`."""
    source = split.category.root
    kept_tests = set(split.test)
    for path in split.train:
        _copy(path, target / path.relative_to(source))
    for sample in split.category.test:
        if sample.path in kept_tests:
            _copy(sample.path, target / sample.path.relative_to(source))
            if sample.mask_path is not None:
                _copy(sample.mask_path, target / sample.mask_path.relative_to(source))
    return target


def write_line_batch(split: Split, folder: Path, seed: int) -> LineBatch:
    """The line batch: the held-back good parts and the line's defective parts, shuffled
    (seeded) and copied into `folder` (created) as ``part-001<suffix>``, ... Returns it with
    the truth of each part."""
    entries = [(p, GOOD, None, None) for p in split.held_back]
    entries += [(p, DEFECTIVE, t, m) for p, t, m in split.line_defects]
    random.Random(seed + 1).shuffle(entries)
    folder.mkdir(parents=True)
    width = max(3, len(str(len(entries))))
    parts = {}
    for number, (path, truth, defect_type, mask) in enumerate(entries, start=1):
        name = f"part-{number:0{width}d}{path.suffix.lower()}"
        shutil.copy2(path, folder / name)
        parts[name] = LinePart(name, truth, defect_type, str(path), None if mask is None else str(mask))
    return LineBatch(folder, parts)


def shifted_copy(images: list[Path], folder: Path, contrast: float, brightness: float) -> list[Path]:
    """Each image with its contrast, then its brightness scaled (PIL ImageEnhance factors:
    1 = unchanged, 0.5 = half), saved as PNG under its own name in `folder` (created): a
    lighting change on the line. Returns the new files, in the order given."""
    folder.mkdir(parents=True)
    written = []
    for path in images:
        with Image.open(path) as picture:
            picture = picture.convert("L") if picture.mode in ("I", "I;16", "F") else picture
            changed = ImageEnhance.Brightness(ImageEnhance.Contrast(picture).enhance(contrast)).enhance(brightness)
            changed.save(folder / f"{path.stem}.png")
        written.append(folder / f"{path.stem}.png")
    return written


def _mask_png(mask: str | None) -> bytes | None:
    """The ground-truth mask file's bytes when it is a PNG with a defect pixel (what the
    review page accepts), else None: the verdict is then given without a mask."""
    if mask is None or Path(mask).suffix.lower() != ".png" or not read_mask(Path(mask)).any():
        return None
    return Path(mask).read_bytes()


def review_from_truth(predictions: Path, run: Path, batch: LineBatch, base: Path) -> dict[str, int]:
    """Give every scored part of `predictions` (a `dualstpm predict` folder of `batch`'s
    images, scored by the model in `run`; its relative image paths start from `base`) the verdict of its ground truth, through the
    review page's session: good or defective, a defective part's note its defect type (the
    first word: `feedback apply` files it under that type) and its ground-truth mask.
    Returns the counts: verdicts, good, defective, with_mask, overruled (verdict differs
    from the model's label). Raises KeyError for a scored image that is not in `batch`."""
    from dualstpm.mlops.scored_by import describe_run
    from dualstpm.review.app import open_review

    session = open_review(predictions, REVIEWER, lambda: describe_run(run), base=base)
    counts = {"verdicts": 0, "good": 0, "defective": 0, "with_mask": 0, "overruled": 0}
    for part in session.predictions.parts:
        truth = batch.parts[Path(part.image).name]
        mask = _mask_png(truth.mask) if truth.truth == DEFECTIVE else None
        note = f"{truth.defect_type} (ground truth)" if truth.truth == DEFECTIVE else "good (ground truth)"
        session.record(part.id, truth.truth, note, mask)
        counts["verdicts"] += 1
        counts[truth.truth] += 1
        counts["with_mask"] += mask is not None
        counts["overruled"] += truth.truth != part.label
    return counts


def images_of(folder: Path) -> list[Path]:
    """The image files of a folder, sorted (the readers' own listing rule)."""
    return list_images(folder)
