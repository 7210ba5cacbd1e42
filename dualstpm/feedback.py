"""Feedback becomes data: reviewed parts copied into the category's folder, with provenance, then versioned by DVC.

`dualstpm feedback apply PREDICTIONS_DIR... --data-root ROOT --category C` reads the
current verdicts of each folder's review log (:class:`dualstpm.review.log.ReviewLog`;
superseded verdicts are ignored) and *copies* each reviewed image into the category
(the predictions folder stays as it is: it is the record the verdicts point at).

Where a verdict goes (``<C>`` = ``ROOT/C``):

=============================== ===================================================================
good, the model said good        ``<C>/train/good/``: a confirmed normal part, more training data
good, the model said defective   a false alarm the inspector overruled: ``<C>/validation/good/`` when
                                 the category already has that folder (the next calibration sees the
                                 part), else ``<C>/train/good/``. The folder is never created: when it
                                 exists, ``split_train_val`` uses it *instead of* the seeded hold-out
                                 of train/good, so a handful of reviewed parts would become the whole
                                 validation set. In train/good the part is learnt as normal (and, at
                                 ``fit.val_fraction``, held out for calibration by the seeded split).
defective                        ``<C>/validation/<defect>/``, its mask (if the inspector gave one) as
                                 ``<C>/validation_ground_truth/<defect>/<name>_mask.png`` (the MVTec
                                 ``ground_truth/<defect>/<stem>_mask.png`` naming, beside the
                                 validation set). ``<defect>`` is the first word of the note when it
                                 names a defect type of the category's ``test/`` folder (a note
                                 "scratch near the rim" files the part under ``scratch``), else
                                 ``reviewed``. Reviewed defects are validation evidence only, never
                                 training data: ``load_category`` reads them as
                                 ``Category.validation_defects``, which select the epoch and the
                                 ablation's fusion in place of synthetic defects (docs/your-own-data.md).
=============================== ===================================================================

A copy is named ``<original stem>-<first 12 hex digits of its SHA-256><suffix>``, so two
batches' ``0001.png`` never collide and the same part always gets the same name.

Rules:

- A part is never copied twice. The key is the image's SHA-256 (``image_sha256`` of the
  verdict): a part already in the category (any image file under ``<C>``, whatever its
  name, or recorded in the provenance file) is skipped and reported; a part that is one of
  the category's *test* images is refused (copying it would leak test data into training).
- A conflict (the same part marked good in one place and defective in another: two
  review logs, one log under two paths, or a verdict already applied the other way) is
  reported with both verdicts and not applied; the other parts are.
- A verdict whose image no longer exists, or whose bytes changed since the review (the
  hash differs), or whose mask file is missing or no longer of the image's size, is
  reported and skipped.
- All or nothing: the copies are written into a hidden staging folder in the data root
  (readers skip hidden folders) and then moved into place; if anything fails, what was
  moved is removed again and the provenance file is left as it was. Two applies to one
  category at once run one after the other (an OS lock on the category folder).

Provenance: ``<C>/feedback.jsonl``, one JSON line per copied image, append-only:

============== ============================================================
schema          1
sha256          the image's SHA-256 (the key)
path            the copy, relative to ``<C>`` (e.g. ``train/good/0007-3fa2c1d9e0b4.png``)
mask            the mask copy relative to ``<C>``, or null
verdict         ``good`` or ``defective``; ``defect_type`` the folder (defective) or null
verdict_id      the verdict's ``id`` in the review log; ``reviewer``, ``verdict_time``, ``note``
source_image    the reviewed image's absolute path; ``predictions`` its predictions folder
model           the verdict's ``model`` record; ``model_label``, ``score``, ``threshold``
applied_at      UTC time of the apply
============== ============================================================

DVC (:func:`record_in_dvc`): when the category (or a folder above it) is tracked by a
``.dvc`` file, ``dvc add`` updates it; when it is inside the output of a ``dvc.yaml``
stage (the download stage's ``data/<data.source>``), ``dvc commit --force STAGE`` records
the new content; when the folder is only a stage dependency (``data.source: folder``),
``dvc status`` already sees the change; otherwise the summary says how to put it under DVC.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from dualstpm.data.images import IMAGE_SUFFIXES
from dualstpm.data.mvtec import MASK_SUFFIX, VALIDATION_GT
from dualstpm.errors import DataError
from dualstpm.files import file_digest, fsync_dir, umask_mode
from dualstpm.paths import category_dir
from dualstpm.review.log import ReviewLog
from dualstpm.rundir import LOG_FILE, review_dir

PROVENANCE_FILE = "feedback.jsonl"
PROVENANCE_SCHEMA = 1
GOOD = "good"
REVIEWED_DEFECT = "reviewed"
HASH_CHARS = 12


@dataclass(frozen=True)
class Copy:
    """One planned copy: the verdict behind it, the image (and mask) and where they go (relative to the category)."""

    verdict: dict[str, Any]
    predictions_dir: Path
    image: Path
    dest: str
    mask: Path | None = None
    mask_dest: str | None = None
    defect_type: str | None = None


@dataclass
class FeedbackResult:
    """What an apply did (or, dry run, would do): the copies, and each verdict not applied with why."""

    category_dir: Path
    copies: list[Copy] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the data: nothing to do
    conflicts: list[str] = field(default_factory=list)  # not applied: both verdicts named
    problems: list[str] = field(default_factory=list)  # missing/changed image, missing mask: not applied
    dvc: str | None = None  # what was done in DVC, or why nothing
    dvc_error: str | None = None  # a dvc command that failed after the copies were made (they stay), and its output
    dry_run: bool = False

    def summary(self) -> dict[str, Any]:
        return {"category_dir": str(self.category_dir), "dry_run": self.dry_run,
                "copied": [c.dest for c in self.copies], "masks": [c.mask_dest for c in self.copies if c.mask_dest],
                "skipped": self.skipped, "conflicts": self.conflicts, "problems": self.problems, "dvc": self.dvc,
                "dvc_error": self.dvc_error}


def _describe(entry: dict[str, Any]) -> str:
    return (f"{entry['verdict']} by {entry.get('reviewer', '?')} at {entry.get('time', '?')} "
            f"(verdict {entry['id']}, {entry['image']})")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _category_hashes(category: Path) -> tuple[dict[str, str], set[str]]:
    """(sha256 -> path relative to the category, for every visible image file; the hashes of test/ images)."""
    found: dict[str, str] = {}
    test: set[str] = set()
    for parent, dirs, files in os.walk(category):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(parent) / name
            if _is_image(path):
                relative = path.relative_to(category).as_posix()
                digest = file_digest(path)
                found.setdefault(digest, relative)
                if relative.startswith("test/"):
                    test.add(digest)
    return found, test


def read_provenance(category: Path) -> list[dict[str, Any]]:
    """The lines of ``<category>/feedback.jsonl`` (empty without the file). Raises DataError naming a bad line."""
    path = Path(category) / PROVENANCE_FILE
    if not path.is_file():
        return []
    lines = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict) or not {"sha256", "verdict", "path"} <= entry.keys():
                raise ValueError("keys sha256, verdict, path are required")
        except ValueError as exc:
            raise DataError(f"{path}, line {number} is not a feedback record ({exc}): fix or delete that line "
                            "(schema: docs/loop.md); nothing was applied") from None
        lines.append(entry)
    return lines


def _defect_type(note: str, known: set[str]) -> str:
    words = note.strip().split()
    first = words[0].strip(".,;:").lower() if words else ""
    return first if first in known else REVIEWED_DEFECT


def _mask_problem(mask: Path, image: Path) -> str | None:
    """Why a stored mask cannot go with its image (not readable, another size), or None.
    The review page checks masks when they are uploaded; this catches one replaced since."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(mask) as m, Image.open(image) as i:
            if m.size != i.size:
                return f"is {m.size[0]}x{m.size[1]} px but the image is {i.size[0]}x{i.size[1]} px"
    except (OSError, UnidentifiedImageError) as exc:
        return f"cannot be read ({exc})"
    return None


def _copy_name(image: Path, digest: str) -> str:
    return f"{image.stem}-{digest[:HASH_CHARS]}{image.suffix.lower()}"


def plan_feedback(predictions_dirs: Sequence[Path | str], data_root: Path | str, category: str) -> FeedbackResult:
    """Read the verdicts and decide every copy (nothing is written). Raises DataError for a
    category folder that does not exist or a review log / provenance file that cannot be read."""
    root = category_dir(Path(data_root), category)
    result = FeedbackResult(root)
    applied = {e["sha256"]: e for e in read_provenance(root)}
    in_data, test_hashes = _category_hashes(root)
    known_defects = {p.name for p in (root / "test").iterdir() if p.is_dir() and p.name != GOOD} if (root / "test").is_dir() else set()
    has_validation_good = (root / "validation" / GOOD).is_dir()

    by_hash: dict[str, list[tuple[dict[str, Any], Path]]] = {}
    for folder in map(Path, predictions_dirs):
        log_dir = review_dir(folder)
        if not (log_dir / LOG_FILE).is_file():
            raise DataError(f"no review log in {log_dir}: review the predictions first (`dualstpm review {folder} ...`), "
                            "or pass the folder `dualstpm predict --out` wrote")
        for entry in ReviewLog(log_dir).refresh().current().values():
            digest = entry.get("image_sha256")
            if not digest:
                result.problems.append(f"{_describe(entry)} has no image_sha256 (a hand-written line?): not applied")
                continue
            by_hash.setdefault(digest, []).append((entry, folder))

    for digest, entries in by_hash.items():
        verdicts = {e["verdict"] for e, _ in entries}
        if len(verdicts) > 1:
            result.conflicts.append(f"the same part (sha256 {digest[:HASH_CHARS]}) has conflicting verdicts: "
                                    + "; ".join(_describe(e) for e, _ in entries) + ". Not applied: settle it in "
                                    "one review (a later verdict on the same image supersedes) and apply again")
            continue
        entry, folder = min(entries, key=lambda pair: pair[0]["time"])
        if digest in applied:
            earlier = applied[digest]
            if earlier["verdict"] != entry["verdict"]:
                result.conflicts.append(f"{_describe(entry)} conflicts with the verdict already applied: "
                                        f"{earlier['verdict']} by {earlier.get('reviewer', '?')} (verdict "
                                        f"{earlier.get('verdict_id', '?')}, now {earlier['path']}). Not applied: "
                                        "remove that copy and its feedback.jsonl line by hand if the new verdict is right")
            else:
                result.skipped.append(f"{entry['image']}: already applied as {earlier['path']}")
            continue
        if digest in test_hashes:
            result.conflicts.append(f"{_describe(entry)}: the part is the category's test image {in_data[digest]}; "
                                    "not copied (test data must stay out of training and validation)")
            continue
        if digest in in_data:
            result.skipped.append(f"{entry['image']}: already in the data as {in_data[digest]}")
            continue
        image = Path(entry["image"])
        if not image.is_file():
            result.problems.append(f"{_describe(entry)}: the image no longer exists; not applied (nothing else is "
                                   "affected: put it back and apply again)")
            continue
        if file_digest(image) != digest:
            result.problems.append(f"{_describe(entry)}: the image changed since it was reviewed (its SHA-256 "
                                   "differs); not applied: review it again")
            continue
        name = _copy_name(image, digest)
        if entry["verdict"] == GOOD:
            flagged = entry.get("model_label") == "defective"
            folder_name = "validation/good" if flagged and has_validation_good else "train/good"
            result.copies.append(Copy(entry, folder, image, f"{folder_name}/{name}"))
            continue
        defect = _defect_type(str(entry.get("note") or ""), known_defects)
        mask = mask_dest = None
        if entry.get("mask"):
            mask = review_dir(folder) / entry["mask"]
            if not mask.is_file():
                result.problems.append(f"{_describe(entry)}: its mask {mask} is missing; not applied (restore the "
                                       "mask, or give the verdict again)")
                continue
            problem = _mask_problem(mask, image)
            if problem:
                result.problems.append(f"{_describe(entry)}: its mask {mask} {problem}; not applied (give the "
                                       "verdict again with a mask of the image's size)")
                continue
            mask_dest = f"{VALIDATION_GT}/{defect}/{Path(name).stem}{MASK_SUFFIX}.png"
        result.copies.append(Copy(entry, folder, image, f"validation/{defect}/{name}", mask, mask_dest, defect))
    return result


def _provenance_line(copy: Copy, applied_at: str) -> dict[str, Any]:
    entry = copy.verdict
    return {
        "schema": PROVENANCE_SCHEMA, "sha256": entry["image_sha256"], "path": copy.dest, "mask": copy.mask_dest,
        "verdict": entry["verdict"], "defect_type": copy.defect_type, "verdict_id": entry["id"],
        "reviewer": entry.get("reviewer"), "verdict_time": entry.get("time"), "note": entry.get("note", ""),
        "source_image": entry["image"], "predictions": str(Path(copy.predictions_dir).resolve()),
        "model": entry.get("model"), "model_label": entry.get("model_label"), "score": entry.get("score"),
        "threshold": entry.get("threshold"), "applied_at": applied_at,
    }


def _move_into_place(staging: Path, category: Path, relatives: list[str]) -> tuple[list[Path], list[Path]]:
    """Move staged files to the same relative paths under `category`; returns (the files
    moved, the folders created for them). On any failure undoes both, then re-raises."""
    moved: list[Path] = []
    created: list[Path] = []
    try:
        for relative in relatives:
            target = category / relative
            for parent in reversed(target.relative_to(category).parents[:-1]):
                folder = category / parent
                if not folder.is_dir():
                    folder.mkdir()
                    created.append(folder)
            if target.exists():
                raise FileExistsError(f"{target} appeared while applying (another apply at the same time?)")
            os.replace(staging / relative, target)
            moved.append(target)
        for folder in {p.parent for p in moved}:
            fsync_dir(folder)
    except BaseException:
        _remove(moved, created)
        raise
    return moved, created


def _remove(moved: list[Path], created: list[Path]) -> None:
    """Undo `_move_into_place`: the files moved, then the folders created for them (deepest first)."""
    for target in moved:
        target.unlink(missing_ok=True)
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass


def apply_feedback(predictions_dirs: Sequence[Path | str], data_root: Path | str, category: str,
                   dry_run: bool = False, dvc: bool = True) -> FeedbackResult:
    """Plan (:func:`plan_feedback`) and, unless `dry_run`, copy every planned part into the
    category, all or nothing, append their provenance, then (with `dvc`) record the new
    data version in DVC (:func:`record_in_dvc`). Raises DataError (the folder unchanged)
    when a copy or a move fails. A dvc command that fails does not raise: the copies are in
    place and recorded in feedback.jsonl by then, so the result keeps them with the failure
    in `dvc_error` (the command to run by hand, dvc's output) for the caller to report."""
    with _category_lock(category_dir(Path(data_root), category)):
        result = plan_feedback(predictions_dirs, data_root, category)
        result.dry_run = dry_run
        if dry_run or not result.copies:
            return result
        _apply(result)
    if dvc:
        try:
            result.dvc = record_in_dvc(result.category_dir)
        except DvcCommandError as exc:
            result.dvc_error = str(exc)
    return result


@contextmanager
def _category_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the category folder itself (no lock file in the data): two
    applies to one category run one after the other, each planning on what the other wrote."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _apply(result: FeedbackResult) -> None:
    """Copy `result.copies` into place and append their provenance, all or nothing."""
    category_path = result.category_dir
    applied_at = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    staging = Path(tempfile.mkdtemp(prefix=f".dualstpm-feedback-{category_path.name}-", dir=category_path.parent))
    provenance = category_path / PROVENANCE_FILE
    try:
        relatives: list[str] = []
        for copy in result.copies:
            for source, relative in ((copy.image, copy.dest), (copy.mask, copy.mask_dest)):
                if source is None or relative is None:
                    continue
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, staging / relative)
                os.chmod(staging / relative, umask_mode(0o666))
                relatives.append(relative)
        old_text = provenance.read_text(encoding="utf-8") if provenance.is_file() else ""
        if old_text and not old_text.endswith("\n"):
            old_text += "\n"
        new_lines = "".join(json.dumps(_provenance_line(c, applied_at), ensure_ascii=False) + "\n" for c in result.copies)
        staged_provenance = staging / ".provenance"
        staged_provenance.write_text(old_text + new_lines, encoding="utf-8")
        os.chmod(staged_provenance, umask_mode(0o666))
        with open(staged_provenance, "rb") as handle:
            os.fsync(handle.fileno())
        moved, created = _move_into_place(staging, category_path, relatives)
        try:
            os.replace(staged_provenance, provenance)
        except BaseException:
            _remove(moved, created)
            raise
        fsync_dir(category_path)
    except OSError as exc:
        raise DataError(f"applying the feedback to {category_path} failed ({exc}); nothing was changed there "
                        "(every copy made was removed). Fix the cause (disk space, permissions) and apply again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------- DVC


def _dvc_repo(path: Path) -> Path | None:
    for folder in (path, *path.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


class DvcCommandError(DataError):
    """A dvc command that failed; the message names it, the repo, and dvc's last output lines."""


def _run_dvc(repo: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-10:])
        raise DvcCommandError(f"`dvc {' '.join(args)}` failed in {repo} (exit {done.returncode}); the copies are in "
                              f"place and recorded in feedback.jsonl: fix the cause and run `cd {repo} && dvc "
                              f"{' '.join(args)}` by hand:\n{tail}")
    return done.stdout


def _lock_stages(repo: Path) -> dict[str, dict[str, list[Path]]]:
    """{stage: {"outs": [abs paths], "deps": [abs paths]}} from the repo's dvc.lock."""
    lock = repo / "dvc.lock"
    if not lock.is_file():
        return {}
    data = yaml.safe_load(lock.read_text()) or {}
    return {name: {key: [(repo / e["path"]).resolve() for e in stage.get(key) or [] if e.get("path")]
                   for key in ("outs", "deps")}
            for name, stage in (data.get("stages") or {}).items()}


def record_in_dvc(category: Path) -> str:
    """Record the changed category folder in DVC, as the module docstring says; returns what
    was done (or why nothing was, and how to put the folder under DVC). Raises
    DvcCommandError when a dvc command fails."""
    category = Path(category).resolve()
    repo = _dvc_repo(category)
    if repo is None:
        return (f"{category} is not inside a DVC project: the new data is not versioned. To version it: "
                f"`cd PROJECT && dvc add {category}` (inside the project), then `git add` the .dvc file it writes")
    for folder in (category, *category.parents):
        if folder == repo.parent:
            break
        dvc_file = folder.with_name(folder.name + ".dvc")
        if dvc_file.is_file():
            relative = folder.relative_to(repo).as_posix()
            _run_dvc(repo, "add", relative)
            return (f"`dvc add {relative}` in {repo}: {dvc_file.relative_to(repo)} records the new data version; "
                    f"commit it: `git add {dvc_file.relative_to(repo)} && git commit`")
    stages = _lock_stages(repo)
    for name, paths in stages.items():
        if any(out == category or out in category.parents for out in paths["outs"]):
            _run_dvc(repo, "commit", "--force", name)
            return (f"`dvc commit --force {name}` in {repo}: dvc.lock records the new content of that stage's output; "
                    "the stages that read it now show as changed (`dvc status`) and `dvc repro` retrains them. Commit "
                    "dvc.lock with git. Note: re-running that stage (a change to its code or params) regenerates the "
                    "folder and drops the feedback from the workspace (it stays in DVC's cache under this dvc.lock)")
    readers = sorted(name for name, paths in stages.items()
                     if any(dep == category or category in dep.parents or dep in category.parents for dep in paths["deps"]))
    if readers:
        return (f"{category} is a dependency of {', '.join(readers)} (not a DVC output): `dvc status` shows them "
                f"changed and `dvc repro` re-runs them; DVC keeps no copy of this version: to keep one, "
                f"`dvc add` the folder in {repo}")
    return (f"{category} is inside the DVC project {repo} but no .dvc file or stage tracks it: "
            f"`dvc add {category.relative_to(repo)}` there to version it")
