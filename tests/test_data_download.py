"""The MVTec AD downloader against a real local HTTP server and real tar archives."""

from __future__ import annotations

import hashlib
import io
import re
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dualstpm.data import MVTEC_CATEGORIES, extract_categories, fetch, load_category, prepare_mvtec, sha256_of
from dualstpm.data.synthetic import make_synthetic_category
from dualstpm.errors import DataError

ARCHIVE_PATH = "/mvtec.tar.xz"


@dataclass
class Server:
    """A local file server that logs the Range header of every request."""

    base: str
    files: dict[str, bytes]
    requests: list[str | None] = field(default_factory=list)
    honour_range: bool = True

    def url(self, path: str = ARCHIVE_PATH) -> str:
        return self.base + path


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server naming)
            wanted = self.headers.get("Range")
            server.requests.append(wanted)
            data = server.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            start = int(re.match(r"bytes=(\d+)-", wanted).group(1)) if wanted and server.honour_range else 0
            if start >= len(data) > 0 and wanted:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start:])

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@dataclass(frozen=True)
class Archive:
    path: Path
    data: bytes
    sha256: str
    source: Path  # the extracted tree it was made from


def _tar(path: Path, entries: dict[str, Path | bytes], mode: str = "w:xz") -> Path:
    """A tar of folders (added recursively) and in-memory files, in the given order."""
    with tarfile.open(path, mode) as tar:
        for name, content in entries.items():
            if isinstance(content, Path):
                tar.add(content, arcname=name)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    """A tiny MVTec-like tar.xz: two categories plus a licence file at the top."""
    root = tmp_path_factory.mktemp("mvtec_src")
    for name, kind in (("bottle", "object"), ("cable", "texture")):
        make_synthetic_category(root, name, kind, image_size=32, n_train=2, n_test_good=1, n_per_defect=1)
    path = _tar(root.parent / f"{root.name}.tar.xz",
                {"license.txt": b"CC BY-NC-SA 4.0", "bottle": root / "bottle", "cable": root / "cable"})
    data = path.read_bytes()
    return Archive(path, data, hashlib.sha256(data).hexdigest(), root)


@pytest.fixture()
def server(archive: Archive) -> Iterator[Server]:
    state = Server("", {ARCHIVE_PATH: archive.data})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_of(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# --- fetch ----------------------------------------------------------------------------

def test_fetch_then_extract_only_the_requested_category(tmp_path: Path, server: Server, archive: Archive) -> None:
    dest = fetch(server.url(), tmp_path / "dl" / "mvtec.tar.xz", archive.sha256)
    assert dest.read_bytes() == archive.data and server.requests == [None]
    assert not dest.with_name("mvtec.tar.xz.part").exists()
    out = tmp_path / "out"
    assert extract_categories(dest, out, ["bottle"]) == [out / "bottle"]
    assert sorted(p.name for p in out.iterdir()) == ["bottle"]  # no cable, licence or temp folder
    assert _tree(out / "bottle") == _tree(archive.source / "bottle")
    assert load_category(out, "bottle").has_ground_truth


def test_fetch_resumes_a_partial_download(tmp_path: Path, server: Server, archive: Archive) -> None:
    half = len(archive.data) // 2
    dest = tmp_path / "mvtec.tar.xz"
    dest.with_name("mvtec.tar.xz.part").write_bytes(archive.data[:half])
    fetch(server.url(), dest, archive.sha256)
    assert server.requests == [f"bytes={half}-"]
    assert dest.read_bytes() == archive.data


def test_fetch_restarts_when_the_server_ignores_range(tmp_path: Path, server: Server, archive: Archive) -> None:
    server.honour_range = False
    dest = tmp_path / "mvtec.tar.xz"
    dest.with_name("mvtec.tar.xz.part").write_bytes(b"x" * 1000)
    fetch(server.url(), dest, archive.sha256)
    assert dest.read_bytes() == archive.data


def test_complete_part_file_is_verified_without_download(tmp_path: Path, server: Server, archive: Archive) -> None:
    dest = tmp_path / "mvtec.tar.xz"
    dest.with_name("mvtec.tar.xz.part").write_bytes(archive.data)
    fetch(server.url(), dest, archive.sha256)  # the server answers 416
    assert dest.read_bytes() == archive.data


def test_wrong_checksum_keeps_the_file(tmp_path: Path, server: Server, archive: Archive) -> None:
    dest = tmp_path / "mvtec.tar.xz"
    wrong = "0" * 64
    with pytest.raises(DataError) as caught:
        fetch(server.url(), dest, wrong)
    part = dest.with_name("mvtec.tar.xz.part")
    message = str(caught.value)
    assert str(part.absolute()) in message and archive.sha256 in message and wrong in message
    assert "data.mvtec.sha256" in message and "not deleted" in message
    assert part.read_bytes() == archive.data and not dest.exists()


def test_existing_destination_means_no_request(tmp_path: Path, server: Server, archive: Archive) -> None:
    dest = tmp_path / "mvtec.tar.xz"
    dest.write_bytes(archive.data)
    assert fetch(server.url(), dest, archive.sha256) == dest
    dest.write_bytes(b"something else")
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch(server.url(), dest, archive.sha256)
    assert dest.read_bytes() == b"something else" and server.requests == []


def test_network_error_names_url_and_alternatives(tmp_path: Path, server: Server, archive: Archive) -> None:
    url = server.url("/missing.tar.xz")
    with pytest.raises(DataError) as caught:
        fetch(url, tmp_path / "mvtec.tar.xz", archive.sha256)
    message = str(caught.value)
    assert url in message and "resumes" in message and "--source" in message


def test_malformed_checksum_setting(tmp_path: Path, server: Server) -> None:
    with pytest.raises(DataError, match="data.mvtec.sha256"):
        fetch(server.url(), tmp_path / "a.tar.xz", "TODO")
    assert server.requests == []


# --- extraction -----------------------------------------------------------------------

def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("evil", [
    "absolute", "../evil", "bottle/../../evil", "symlink:/etc", "symlink:../..", "hardlink:/etc/passwd",
])
def test_unsafe_archives_are_refused(tmp_path: Path, evil: str) -> None:
    out = tmp_path / "a" / "b" / "out"
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        good = tarfile.TarInfo("bottle/train/good/000.png")
        good.size = 3
        tar.addfile(good, io.BytesIO(b"png"))
        kind, _, target = evil.partition(":")
        if kind == "symlink":
            bad = _link("bottle/link", target)
        elif kind == "hardlink":
            bad = _link("bottle/link", target, tarfile.LNKTYPE)
        else:
            bad = tarfile.TarInfo(str(tmp_path / "evil") if evil == "absolute" else evil)
            bad.size = 4
        tar.addfile(bad, io.BytesIO(b"evil") if bad.isfile() else None)
    with pytest.raises(DataError) as caught:
        extract_categories(path, out, ["bottle"])
    assert str(path.absolute()) in str(caught.value) and repr(bad.name) in str(caught.value)
    assert not any("evil" in p.name for p in tmp_path.rglob("*") if p != path)
    assert list(out.iterdir()) == []  # no category, no temp folder


def test_missing_category_lists_what_the_archive_has(tmp_path: Path, archive: Archive) -> None:
    with pytest.raises(DataError) as caught:
        extract_categories(archive.path, tmp_path, ["bottle", "capsule"])
    assert "capsule" in str(caught.value) and "bottle, cable" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # bottle was not left behind either


def test_existing_categories_are_skipped(tmp_path: Path, archive: Archive) -> None:
    (tmp_path / "bottle").mkdir()
    extract_categories(archive.path, tmp_path, ["bottle", "cable"])
    assert list((tmp_path / "bottle").iterdir()) == []
    assert _tree(tmp_path / "cable") == _tree(archive.source / "cable")


def test_wrapper_folder_is_tolerated(tmp_path: Path, archive: Archive) -> None:
    wrapped = _tar(tmp_path / "wrapped.tar.gz", {"mvtec_anomaly_detection/bottle": archive.source / "bottle"},
                   mode="w:gz")
    extract_categories(wrapped, tmp_path / "out", ["bottle"])
    assert _tree(tmp_path / "out" / "bottle") == _tree(archive.source / "bottle")


def test_truncated_archive_leaves_nothing(tmp_path: Path, archive: Archive) -> None:
    cut = tmp_path / "cut.tar.xz"
    cut.write_bytes(archive.data[: len(archive.data) * 2 // 3])
    with pytest.raises(DataError, match="cannot read archive .*cut.tar.xz"):
        extract_categories(cut, tmp_path / "out", ["bottle", "cable"])
    assert list((tmp_path / "out").iterdir()) == []


# --- prepare_mvtec --------------------------------------------------------------------

def test_prepare_downloads_and_extracts(tmp_path: Path, server: Server, archive: Archive) -> None:
    folders = prepare_mvtec(tmp_path / "data", ["cable"], url=server.url(), sha256=archive.sha256,
                            archive=tmp_path / "mvtec.tar.xz")
    assert folders == [tmp_path / "data" / "cable"] and (tmp_path / "mvtec.tar.xz").exists()


def test_prepare_uses_an_extracted_source_in_place(tmp_path: Path, server: Server, archive: Archive) -> None:
    folders = prepare_mvtec(tmp_path / "data", ["bottle", "cable"], url=server.url(), sha256=archive.sha256,
                            archive=tmp_path / "mvtec.tar.xz", source=archive.source)
    assert folders == [archive.source / "bottle", archive.source / "cable"]
    assert server.requests == [] and not (tmp_path / "data").exists()


def test_prepare_uses_an_archive_source(tmp_path: Path, server: Server, archive: Archive) -> None:
    folders = prepare_mvtec(tmp_path / "data", ["bottle"], url=server.url(), sha256=archive.sha256,
                            archive=tmp_path / "unused.tar.xz", source=archive.path)
    assert folders == [tmp_path / "data" / "bottle"] and server.requests == []
    assert archive.path.exists() and not (tmp_path / "unused.tar.xz").exists()
    with pytest.raises(DataError, match="checksum mismatch"):
        prepare_mvtec(tmp_path / "data", ["cable"], url=server.url(), sha256="1" * 64,
                      archive=tmp_path / "unused.tar.xz", source=archive.path)
    assert archive.path.exists()


def test_prepare_rejects_unknown_categories(tmp_path: Path) -> None:
    with pytest.raises(DataError) as caught:
        prepare_mvtec(tmp_path, ["bottle", "bottel"], url="http://127.0.0.1:9/x", sha256="0" * 64,
                      archive=tmp_path / "a.tar.xz")
    assert "'bottel'" in str(caught.value) and ", ".join(MVTEC_CATEGORIES) in str(caught.value)
