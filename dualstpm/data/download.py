"""Getting MVTec AD onto disk: resumable, checksummed download and safe extraction.

The archive is large (about 5 GB), so an interrupted download resumes from its
``.part`` file, a finished one is verified against the sha256 in ``params.yaml``
(``data.mvtec.sha256``) before use, and a file with the wrong checksum is never
deleted (the user may want to inspect it). Extraction takes only the requested
categories, refuses members that would land outside the output folder, and moves a
category into place only once it is complete.
"""

from __future__ import annotations

import gzip
import http.client
import lzma
import os
import posixpath
import re
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from pathlib import Path

from rich.progress import DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

from dualstpm.data.mvtec import load_category
from dualstpm.errors import DataError, NetworkError
from dualstpm.files import file_digest
from dualstpm.progress import progress_bar

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
SHA256_KEY = "data.mvtec.sha256"
_CHUNK = 1 << 20
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError, ValueError)  # ValueError: bad URL
_RETRY_HTTP_STATUS = frozenset({408, 429})  # request timeout, too many requests; and every 5xx
# What a truncated or corrupt tar raises, by compression (bz2 raises a plain OSError).
_BROKEN_ARCHIVE = (tarfile.ReadError, tarfile.CompressionError, EOFError, lzma.LZMAError,
                   zlib.error, gzip.BadGzipFile)


# --- checksums -------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (the archive does not fit in memory)."""
    return file_digest(path)


def _expected(sha256: str) -> str:
    value = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise DataError(f"{SHA256_KEY} must be a 64-character hex sha256, got {sha256!r}: fix it in params.yaml.")
    return value


def _verify(path: Path, expected: str) -> None:
    """Raise on a checksum mismatch; the file is left where it is."""
    got = sha256_of(path)
    if got != expected:
        raise DataError(
            f"checksum mismatch for {path.absolute()}: got sha256 {got}, expected {expected} "
            f"({SHA256_KEY} in params.yaml). The file was kept for you to inspect, not deleted: "
            f"if it is a damaged download, delete it and run again; if it is a different "
            f"release of the archive, set {SHA256_KEY} to its checksum."
        )


# --- download --------------------------------------------------------------------------

def _content_range_start(header: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-", header or "")
    return int(match.group(1)) if match else None


def _copy(response: http.client.HTTPResponse, part: Path, start: int) -> None:
    """Append the response body to `part` from byte `start` (0 rewrites it)."""
    length = response.headers.get("Content-Length")
    with open(part, "ab" if start else "wb") as handle, progress_bar(DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()) as progress:
        task = progress.add_task(f"downloading {part.name.removesuffix('.part')}",
                                 total=start + int(length) if length else None, completed=start)
        for chunk in iter(lambda: response.read(_CHUNK), b""):
            handle.write(chunk)
            progress.advance(task, len(chunk))


def _download(url: str, part: Path, timeout: float) -> None:
    """Fill `part` with the whole resource, resuming from its current length.

    A server that ignores ``Range`` (status 200) gets the file rewritten from zero;
    416 (range not satisfiable) means `part` is already complete (the checksum decides).
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            return
        raise
    with response:
        resumed = offset > 0 and getattr(response, "status", None) == 206
        if resumed and _content_range_start(response.headers.get("Content-Range")) != offset:
            raise DataError(
                f"{url} answered a resume request with the wrong byte range: delete "
                f"{part.absolute()} and run again to download from the start."
            )
        _copy(response, part, offset if resumed else 0)


def failed_for_a_while(exc: BaseException) -> bool:
    """True for a network failure that may pass (no connection, a timeout, a dropped
    connection, HTTP 408/429/5xx); False for one that stays (HTTP 404, a bad URL, a full disk)."""
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code in _RETRY_HTTP_STATUS
    return isinstance(exc, (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError))


def fetch(url: str, dest: Path, expected_sha256: str, *, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` unless `dest` already has the expected checksum.

    Bytes go to ``<dest>.part`` first (a re-run resumes it with an HTTP Range request);
    only a verified file is renamed to `dest`, so `dest` is never a partial download.
    A failed download raises NetworkError when trying again may succeed, else DataError.
    """
    dest = Path(dest)
    expected = _expected(expected_sha256)
    if dest.exists():
        _verify(dest, expected)
        return dest
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download(url, part, timeout)
    except _NETWORK_ERRORS as exc:
        raise (NetworkError if failed_for_a_while(exc) else DataError)(
            f"download of {url} failed: {exc}. Any partial download is kept as {part.absolute()} "
            "and running again resumes it. If you already have the archive or an extracted "
            "MVTec AD folder, pass it with --source instead."
        ) from exc
    _verify(part, expected)
    os.replace(part, dest)
    return dest


# --- extraction ------------------------------------------------------------------------

def _unsafe(archive: Path, member: tarfile.TarInfo, why: str) -> DataError:
    return DataError(
        f"refusing to extract {archive.absolute()}: member {member.name!r} {why}. The archive "
        "is damaged or not the MVTec AD archive: download it again or check its source."
    )


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Reject anything that could write outside the output folder.

    tarfile's ``filter="data"`` already does this; the explicit check makes the rule
    visible and independent of the Python version's filter details.
    """
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise _unsafe(archive, member, "has an absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise _unsafe(archive, member, "has a '..' path component")
    if member.issym() or member.islnk():
        # A symlink's target is relative to its folder, a hard link's to the archive root.
        base = posixpath.dirname(name) if member.issym() else ""
        target = posixpath.normpath(posixpath.join(base, member.linkname))
        if member.linkname.startswith("/") or target == ".." or target.startswith("../"):
            raise _unsafe(archive, member, f"links outside the output folder (to {member.linkname!r})")
    elif not (member.isfile() or member.isdir()):
        raise _unsafe(archive, member, "is a device, fifo or other special file")


def _category_of(parts: list[str], wanted: set[str]) -> int | None:
    """Depth of the category folder in a member path (``<cat>/...`` -> 0,
    ``<wrapper>/<cat>/...`` -> 1), or None when the member is not wanted."""
    for depth in (0, 1):
        if len(parts) > depth + 1 and parts[depth] in wanted:
            return depth
    return None


def _folders_in(paths: list[tuple[str, ...]]) -> list[str]:
    """Category-like folders of an archive, for error messages: the top-level folders,
    or those inside a single top-level wrapper folder."""
    top = sorted({parts[0] for parts in paths if len(parts) > 1})
    if len(top) == 1 and (top[0], "train") not in {parts[:2] for parts in paths}:
        return sorted({parts[1] for parts in paths if len(parts) > 2})
    return top


def _extract_into(archive: Path, staging: Path, wanted: set[str]) -> list[tuple[str, ...]]:
    """Stream the archive once, checking every member and extracting those of the
    `wanted` categories into ``staging/<category>/...`` (wrapper folder stripped).
    Return the path parts of all members."""
    paths: list[tuple[str, ...]] = []
    with tarfile.open(archive, mode="r:*") as tar:
        for member in tar:
            _check_member(archive, member)
            parts = member.name.strip("/").split("/")
            paths.append(tuple(parts))
            depth = _category_of(parts, wanted)
            if depth is None:
                continue
            linkname = member.linkname
            if member.islnk():  # hard-link targets are archive paths: strip the wrapper too
                linkname = "/".join(linkname.split("/")[depth:])
            renamed = member.replace(name="/".join(parts[depth:]), linkname=linkname, deep=False)
            try:
                tar.extract(renamed, staging, filter="data")
            except tarfile.FilterError as exc:
                raise _unsafe(archive, member, f"was refused by tarfile ({exc})") from exc
    return paths


def _extract_all(archive: Path, staging: Path, wanted: set[str]) -> list[tuple[str, ...]]:
    """:func:`_extract_into` with read and write failures turned into DataError."""
    try:
        return _extract_into(archive, staging, wanted)
    except _BROKEN_ARCHIVE as exc:
        raise DataError(
            f"cannot read archive {archive.absolute()}: {exc}. It may be incomplete or damaged: "
            "check its sha256, delete it and download it again."
        ) from exc
    except OSError as exc:
        raise DataError(
            f"extracting {archive.absolute()} into {staging.parent.absolute()} failed: {exc}. Check "
            "that the archive exists, and the free space and permissions of the output folder."
        ) from exc


def extract_categories(archive: Path, out_root: Path, categories: Sequence[str]) -> list[Path]:
    """Extract the requested categories of an MVTec-style tar to ``out_root/<category>``.

    Only members under ``<category>/`` (or ``<wrapper>/<category>/``) are written, but
    every member is checked, so an archive carrying an unsafe path is refused whole.
    Category folders that already exist are taken as complete and skipped: this
    function only ever moves complete folders into place. Everything is unpacked into
    a hidden temp folder inside `out_root`, in one pass over the archive, and a
    failure leaves no category behind.
    """
    archive, out_root = Path(archive), Path(out_root)
    targets = [out_root / name for name in dict.fromkeys(categories)]
    pending = {target.name for target in targets if not target.exists()}
    if not pending:
        return targets
    out_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extracting-", dir=out_root))
    try:
        paths = _extract_all(archive, staging, pending)
        missing = sorted(name for name in pending if not (staging / name).is_dir())
        if missing:
            raise DataError(
                f"archive {archive.absolute()} has no folder for {', '.join(missing)}; it has: "
                f"{', '.join(_folders_in(paths)) or 'no folders'}. Ask only for categories it holds."
            )
        for name in sorted(pending):
            os.replace(staging / name, out_root / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


# --- the whole job ---------------------------------------------------------------------

def _checked_categories(categories: Sequence[str]) -> list[str]:
    unknown = [name for name in categories if name not in MVTEC_CATEGORIES]
    if unknown or not categories:
        raise DataError(
            f"unknown MVTec AD categor{'y' if len(unknown) == 1 else 'ies'} "
            f"{', '.join(map(repr, unknown)) or '(none given)'}: choose from {', '.join(MVTEC_CATEGORIES)}."
        )
    return list(dict.fromkeys(categories))


def prepare_mvtec(out_root: Path, categories: Sequence[str], *, url: str, sha256: str,
                  archive: Path, source: Path | None = None) -> list[Path]:
    """Make the requested MVTec AD categories available and return their folders.

    `source` is what the user already has: an extracted MVTec AD root is validated
    and used in place (its category folders are returned, nothing is copied, so a
    read-only or shared copy works); an archive file is verified and extracted (and
    never deleted). Without `source` the archive is downloaded to `archive` first.
    Every returned category is checked with :func:`load_category`.
    """
    names = _checked_categories(categories)
    if source is not None and Path(source).is_dir():
        return [load_category(Path(source), name).root for name in names]
    if source is not None:
        source = Path(source)
        if not source.is_file():
            raise DataError(f"--source {source.absolute()} does not exist: pass the MVTec AD archive or extracted folder.")
        _verify(source, _expected(sha256))
        archive_path = source
    else:
        archive_path = fetch(url, Path(archive), sha256)
    folders = extract_categories(archive_path, Path(out_root), names)
    for name in names:
        load_category(Path(out_root), name)
    return folders
