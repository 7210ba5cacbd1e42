"""Writing results so that a crash never leaves half of them: one helper for every writer.

Every file a run, a report or a prediction writes goes through here:

- :func:`atomic_file` yields a temporary path *in the destination's folder*; when the
  block ends without an exception the file is flushed to disk (``fsync``) and renamed
  over the destination (``os.replace``, atomic on POSIX within one file system), then
  the folder entry is synced too. On an exception the temporary file is removed and the
  old destination, if any, is untouched.
- :func:`write_text`, :func:`write_json`, :func:`write_bytes` and :func:`write_csv` are
  that for the common cases.
- :func:`staged_dir` does the same for a whole folder (a model directory, a report): it
  is built in a hidden sibling and swapped in only when complete.
- :func:`file_digest` is the one checksum of a file (sha256 by default; md5 for DVC's hashes).
- :func:`fsync_dir` makes renames in a folder durable, for writers that move files
  themselves (the review log, feedback's copies).

Every machine-readable output says "no value" the same way: JSON that any strict parser
accepts, with ``null`` where a number is undefined (never ``NaN``/``Infinity``, which
Python writes by default and JavaScript, Go and Java parsers refuse). :func:`json_ready`
is that conversion (non-finite floats become None), :func:`json_text` the strict text
(every JSON file written here: :func:`write_json`), and :func:`json_ready_table` the same
for a DataFrame that another library serialises (the MLflow model's served answer). CSV
files (:func:`write_csv`) leave a missing value as an empty cell.

Permissions follow the user's umask, as files written with ``open()`` do:
``tempfile.mkstemp``/``mkdtemp`` would create them owner-only (0600/0700), which makes a
model or report a team shares unreadable to the rest of the team.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["atomic_file", "json_ready", "json_ready_table", "json_text", "staged_dir", "umask_mode", "write_bytes",
           "write_csv", "write_json", "write_text"]


def umask_mode(base: int) -> int:
    """`base` (0o666 for files, 0o777 for folders) with the process umask applied.

    The umask can only be read by setting it, so it is set back at once; this is the
    standard idiom (no thread can observe the temporary value change anything, since the
    value written back is the one read).
    """
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: some file systems refuse O_RDONLY dirs)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` atomically.

    The caller writes the temporary file by any means (``to_csv``, ``savefig``, ``np.savez``
    with the returned name, ...). The suffix is kept so that writers that choose a format
    from the file name still do. Parent folders are created. Raises whatever the writer
    raises, after removing the temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode(0o666))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns `path`."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path | str, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path`."""
    return write_bytes(path, text.encode("utf-8"))


def json_ready(data: Any) -> Any:
    """`data` with every value that has no JSON number (NaN, +-inf) replaced by None.

    Walks dicts, lists and tuples (tuples become lists); numpy scalars become Python
    scalars and numpy arrays nested lists (an all-finite float array stays a fast
    ``tolist``). Anything else is returned as it is, for `json.dumps` to accept or refuse.
    """
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: json_ready(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [json_ready(value) for value in data]
    if isinstance(data, np.ndarray):
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            return np.where(np.isfinite(data), data.astype(object), None).tolist()
        return data.tolist()
    if isinstance(data, np.generic):
        return json_ready(data.item())
    return data


def json_text(data: Any, indent: int | None = 2) -> str:
    """Strict JSON text of `data` (`json_ready` first, so an undefined number is ``null``).

    Raises TypeError for a value JSON has no type for (and ValueError, from
    ``allow_nan=False``, never after `json_ready`)."""
    return json.dumps(json_ready(data), indent=indent, allow_nan=False)


def json_ready_table(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with each missing or non-finite float (NaN, +-inf) as None, for a serialiser
    that writes a DataFrame's NaN as the invalid JSON ``NaN`` (MLflow's scoring server).

    Only float columns that hold such a value change: they become object columns holding
    Python floats and None (``isna()`` is still true there); every other column is kept
    with its dtype. Returns a new DataFrame."""
    table = table.copy()
    for column in table.columns:
        values = table[column].to_numpy()
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            table[column] = np.asarray(json_ready(values), dtype=object)
    return table


def write_json(path: Path | str, data: Any, indent: int = 2) -> Path:
    """Write `data` as strict JSON (`json_text`: an undefined number is ``null``) to `path`
    atomically; returns `path`."""
    return write_text(path, json_text(data, indent) + "\n")


def write_csv(path: Path | str, table: pd.DataFrame) -> Path:
    """Write a DataFrame as CSV (no index) to `path` atomically; returns `path`. A missing
    value (NaN, None) is an empty cell, which pandas reads back as NaN."""
    with atomic_file(path) as tmp:
        table.to_csv(tmp, index=False, na_rep="")
    return Path(path)


@contextlib.contextmanager
def staged_dir(final: Path | str) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of `final`; on success it replaces `final`.

    The old `final` (if any) is moved aside, the staging folder renamed into place, and
    the old one deleted, so at every instant `final` is either the complete old folder or
    the complete new one (a crash between the two renames leaves the old one beside it as
    ``.<name>.old-*``, never a half-written `final`). On an exception the staging folder
    is deleted and `final` is untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        os.chmod(staging, umask_mode(0o777))
        yield staging
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        fsync_dir(final.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def file_digest(path: Path | str, algorithm: str = "sha256") -> str:
    """The hex digest (`hashlib` algorithm name) of a file's bytes, read in 1 MiB blocks:
    the one checksum of files (downloads, model files, lineage, reviewed images)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
