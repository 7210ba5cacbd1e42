"""The review log: every inspector's verdict, one JSON line each, never rewritten.

Layout, beside the predictions it reviews::

    PREDICTIONS_DIR/review/verdicts.jsonl     one verdict per line, append-only
    PREDICTIONS_DIR/review/masks/<id>.png     uploaded masks (8-bit, 0 = good, 255 = defect)

Why an append-only JSON-lines file (and not one file per verdict, or a database): a
verdict is one line written with one ``write`` under an exclusive ``fcntl.flock`` on the
log, then ``fsync``-ed before the page is told it is kept, so a crashed browser or server
loses nothing that was acknowledged, and two servers (two inspectors on the same folder)
or two tabs append safely: the lock serialises them and each re-reads what the others
appended before it answers. The file is readable with ``jq``, ``pandas.read_json(lines=True)``
or a text editor, and diffs cleanly in git/DVC.

A later verdict on the same image (`image`, its absolute path) supersedes the earlier
one in the current view (:meth:`ReviewLog.current`); the earlier line stays in the file.
dualstpm never truncates, rewrites or deletes lines: a line that is not valid (edited by
hand, or cut off by a crash) stops the reader with its line number and the fix, and the
file is left exactly as it is.

Schema (``schema`` = 1), the keys of each line:

============== ======================================================================
schema          1 (a reader refuses a higher version)
id              32 hex digits, unique per verdict; also the mask's file name
time            UTC, ISO 8601 with milliseconds, e.g. ``2026-12-06T19:40:00.123+00:00``
reviewer        who gave it (``--reviewer``, default: the login name)
image           absolute path of the reviewed image: the key a later verdict supersedes by
image_sha256    SHA-256 of the image file when the verdict was given (provenance: the
                same part under another path is the same part)
listed_path     the path as ``predictions.csv`` lists it
verdict         ``good`` or ``defective``
note            free text, may be empty
mask            ``masks/<id>.png`` relative to the review folder, or null
score           the model's raw image score (predictions.csv ``score``)
normalized_score  predictions.csv ``normalized_score`` (0.5 = the model's stored threshold)
threshold       the threshold the model's label used (predictions.csv ``threshold``)
model_label     the model's label: ``good`` or ``defective``
overlay         the overlay file name in PREDICTIONS_DIR
predictions     absolute path of the predictions.csv the part was listed in
model           what scored it: ``{"run": abs path, "model_sha256": ..., "mlflow_run_id": ...|null}``
                for ``--run``, or ``{"registered_model": name, "alias": ...|null, "version": ...,
                "mlflow_run_id": ..., "tracking_uri": ...}`` for ``--model``
============== ======================================================================
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dualstpm.errors import DataError
from dualstpm.files import atomic_file, file_digest, fsync_dir
from dualstpm.rundir import LOG_FILE

SCHEMA_VERSION = 1
MASK_DIR = "masks"
VERDICTS = ("good", "defective")
REQUIRED_KEYS = ("schema", "id", "time", "reviewer", "image", "verdict")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ReviewLogError(DataError):
    """The review log cannot be read or written as it is (names the file, the line and the fix)."""


class VerdictError(DataError):
    """A verdict that cannot be recorded (missing image, bad mask); nothing was written."""


def image_key(path: Path | str) -> str:
    """The key a verdict is filed under: the absolute, normalised path (symlinks not resolved)."""
    return os.path.normpath(os.path.abspath(path))


def _problem(entry: Any) -> str | None:
    """What is wrong with one parsed line, or None when it is a valid verdict."""
    if not isinstance(entry, dict):
        return f"it is a JSON {type(entry).__name__}, not an object"
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    if missing:
        return f"keys {', '.join(missing)} are missing"
    if not isinstance(entry["schema"], int) or not 1 <= entry["schema"] <= SCHEMA_VERSION:
        return f"schema {entry['schema']!r} is not one this version reads (1..{SCHEMA_VERSION})"
    if entry["verdict"] not in VERDICTS:
        return f"verdict {entry['verdict']!r} is neither {' nor '.join(VERDICTS)}"
    if not isinstance(entry["image"], str) or not entry["image"]:
        return f"image {entry['image']!r} is not a path"
    return None


@contextmanager
def _locked(path: Path, exclusive: bool) -> Iterator[int]:
    """An fd on the log holding ``flock`` (exclusive: opened for appending, created if needed)."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT if exclusive else os.O_RDONLY
    fd = os.open(path, flags, 0o666)  # the umask applies, as for open()
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield fd
    finally:
        os.close(fd)  # releases the lock


class ReviewLog:
    """The verdicts of one review folder, kept in step with the file by :meth:`refresh`.

    `entries` holds every line read so far, in file order (dicts, the module's schema).
    Reading is incremental: each refresh reads only the bytes appended since the last one,
    so a log of thousands of verdicts costs nothing per request. Safe to share between the
    threads of one server (a mutex guards the in-memory state; ``flock`` guards the file
    between processes).
    """

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOG_FILE
        self.entries: list[dict[str, Any]] = []
        self._offset = 0  # bytes consumed
        self._lines = 0  # lines consumed (blank ones included), for line numbers
        self._unterminated = False  # the last line read has no newline (a hand edit): the next append adds one
        self._mutex = threading.Lock()

    def refresh(self) -> ReviewLog:
        """Read what was appended since the last call (by anyone). Raises ReviewLogError on
        a line that is not a valid verdict, naming it; nothing of that read is kept then."""
        if not self.path.exists():
            if self._offset:
                raise ReviewLogError(f"{self.path} was deleted while it was in use; restore it from a copy "
                                     f"(it held {len(self.entries)} verdicts) and start again")
            return self
        with self._mutex, _locked(self.path, exclusive=False) as fd:
            self._read_new(fd)
        return self

    def _read_new(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size < self._offset:
            raise ReviewLogError(
                f"{self.path} shrank from {self._offset} to {size} bytes while it was in use: it was truncated or "
                f"edited by hand. Restore it (it held {len(self.entries)} verdicts) and start again; "
                "dualstpm only ever appends to it")
        chunks, at = [], self._offset
        while at < size:
            chunk = os.pread(fd, size - at, at)
            if not chunk:
                break
            chunks.append(chunk)
            at += len(chunk)
        data = b"".join(chunks)
        if not data:
            return
        lines = data.split(b"\n")
        unterminated = lines[-1] != b""
        if not unterminated:
            lines.pop()
        parsed = []
        for number, raw in enumerate(lines, start=self._lines + 1):
            if not raw.strip():
                continue
            cut = unterminated and number == self._lines + len(lines)
            try:
                entry = json.loads(raw.decode("utf-8"))
                problem = _problem(entry)
            except (UnicodeDecodeError, ValueError) as exc:
                problem = f"it is not valid JSON ({exc})"
            if problem is not None:
                how = ("it has no newline at its end: a write cut off by a crash, or an unfinished edit. "
                       if cut else "")
                raise ReviewLogError(
                    f"{self.path}, line {number}: {problem}. {how}Each line is one verdict (schema: docs/review.md); "
                    f"fix that line by hand or delete it (every other line is kept), then start again. "
                    "dualstpm never rewrites this file.")
            parsed.append(entry)
        self.entries.extend(parsed)
        self._offset += len(data)
        self._lines += len(lines)
        self._unterminated = unterminated

    def append(self, entry: Mapping[str, Any]) -> dict[str, Any]:
        """Append one verdict under an exclusive lock, after reading what others appended;
        durable (fsync) when this returns. Raises ReviewLogError when the log holds a bad
        line (nothing is written then) or the write fails (the partial line is removed)."""
        entry = dict(entry)
        problem = _problem(entry)
        if problem is not None:
            raise ValueError(f"not a verdict: {problem}")  # a bug of the caller, not of the log file
        line = json.dumps(entry, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
        self.folder.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        with self._mutex, _locked(self.path, exclusive=True) as fd:
            self._read_new(fd)
            payload = (b"\n" if self._unterminated else b"") + line
            before = os.fstat(fd).st_size
            try:
                written = 0
                while written < len(payload):
                    written += os.write(fd, payload[written:])
                os.fsync(fd)
            except OSError as exc:
                os.ftruncate(fd, before)  # our own partial line only: what was there stays
                raise ReviewLogError(f"could not write the verdict to {self.path} ({exc}); it was not recorded. "
                                     "Free disk space or fix the folder's permissions, then give it again") from None
            self.entries.append(entry)
            self._offset += len(payload)
            self._lines += 1  # a hand-edited last line without newline was already counted
            self._unterminated = False
        if created:
            fsync_dir(self.folder)
        return entry

    def current(self) -> dict[str, dict[str, Any]]:
        """image key -> its latest verdict (later lines supersede earlier ones)."""
        return {entry["image"]: entry for entry in self.entries}

    def history(self) -> dict[str, int]:
        """image key -> how many verdicts the log holds for it (superseded ones included)."""
        counts: dict[str, int] = {}
        for entry in self.entries:
            counts[entry["image"]] = counts.get(entry["image"], 0) + 1
        return counts


def new_entry(*, reviewer: str, image: Path | str, listed_path: str, verdict: str, note: str, mask: str | None,
              score: float, normalized_score: float, threshold: float, model_label: str, overlay: str,
              predictions: Path | str, model: Mapping[str, Any], entry_id: str | None = None) -> dict[str, Any]:
    """A verdict line (the module's schema), stamped now (UTC) with a fresh id and the image's hash.

    Raises VerdictError when `verdict` is not good/defective or the image no longer exists."""
    if verdict not in VERDICTS:
        raise VerdictError(f"verdict {verdict!r} is neither {' nor '.join(VERDICTS)}")
    key = image_key(image)
    if not Path(key).is_file():
        raise VerdictError(f"{key} no longer exists: the verdict was not recorded (earlier verdicts are kept). "
                           "Put the image back, or skip this part")
    return {
        "schema": SCHEMA_VERSION,
        "id": entry_id or uuid.uuid4().hex,
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
        "reviewer": reviewer,
        "image": key,
        "image_sha256": file_digest(key),
        "listed_path": listed_path,
        "verdict": verdict,
        "note": note,
        "mask": mask,
        "score": float(score),
        "normalized_score": float(normalized_score),
        "threshold": float(threshold),
        "model_label": model_label,
        "overlay": overlay,
        "predictions": image_key(predictions),
        "model": dict(model),
    }


def save_mask(folder: Path | str, entry_id: str, data: bytes, image: Path | str) -> str:
    """Check an uploaded mask against its image and store it as ``masks/<entry_id>.png``.

    `data` must be a PNG of the image's own size (width x height, px); defect pixels are
    read as ground-truth masks are (:func:`dualstpm.data.images.read_mask`: bright and
    opaque = defect) and stored as 8-bit 0/255, written atomically. Returns the path
    relative to `folder`. Raises VerdictError (nothing written) for a file that is not a
    PNG, a size that differs from the image's, or a mask with no defect pixel.
    """
    from dualstpm.data.images import image_size_of, read_mask

    if not data.startswith(_PNG_SIGNATURE):
        raise VerdictError("the mask is not a PNG file: save it as PNG (white = defect, black = good) and upload it again")
    masks = Path(folder) / MASK_DIR
    masks.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(suffix=".png", prefix=".upload-", dir=masks) as upload:
        upload.write(data)
        upload.flush()
        try:
            mask = read_mask(Path(upload.name))
        except DataError as exc:
            raise VerdictError(f"the mask cannot be read ({exc}): upload a valid PNG") from None
    width, height = image_size_of(Path(image))
    if mask.shape != (height, width):
        raise VerdictError(f"the mask is {mask.shape[1]}x{mask.shape[0]} px but the image {image_key(image)} is "
                           f"{width}x{height} px: draw or export the mask at the image's own size; nothing was recorded")
    if not mask.any():
        raise VerdictError("the mask has no defect pixel (all background): mark the defect white on black, "
                           "or give the verdict without a mask")
    name = f"{MASK_DIR}/{entry_id}.png"
    with atomic_file(Path(folder) / name) as tmp:
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(tmp, format="PNG")
    return name
