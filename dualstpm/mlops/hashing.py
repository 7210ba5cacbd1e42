"""What identifies the data, the code and the model of a run: hashes computed from files.

- the data: each file's md5 and the md5 DVC 3 gives a category folder (`data_version`),
  always from the files on disk, never from DVC's records of them;
- the code: the git commit of the checkout that runs, and whether it has local changes;
- the model: one sha256 over the files the fit writes (`model_sha256`).

No MLflow here: the tags these values are logged under are in `runs` and `lineage`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

from dualstpm.errors import ConfigError
from dualstpm.files import file_digest
from dualstpm.project import project_dir
from dualstpm.rundir import CALIBRATION_FILE, PARAMS_FILE, WEIGHTS_FILE  # not detector: a hash needs no torch

HASHED_FILES = (WEIGHTS_FILE, PARAMS_FILE, CALIBRATION_FILE)  # what the fit writes; not ablate's fusion.json


def folder_files(folder: Path) -> dict[str, str]:
    """{path relative to `folder` (POSIX): md5} of every file under `folder`, sorted by path:
    the file list DVC hashes (`data_hash`), and what tells two versions of the data apart."""
    return {path.relative_to(folder).as_posix(): file_digest(path, "md5")
            for path in sorted(p for p in Path(folder).rglob("*") if p.is_file())}


def _dvc_dir_hash(files: Mapping[str, str]) -> str:
    """The md5 DVC 3 gives a folder (`<md5 of its file list>.dir`), from `folder_files`."""
    entries = sorted(({"md5": md5, "relpath": relpath} for relpath, md5 in files.items()), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def data_version(data_root: Path, category: str) -> tuple[str, dict[str, str]]:
    """(hash, files) of the category's data as it is on disk now: `folder_files` of the
    category folder and the md5 DVC 3 gives that folder (`<md5>.dir`). Equal hashes mean
    the same evaluation data.

    Always computed from the files, never read from `dvc.lock` or a `.dvc` file: inside
    `dvc repro`, or after `dualstpm feedback apply` added parts to a folder that is only a
    stage's dependency, those still hold the previous version's md5 while the stage runs,
    so a test would be tagged with the data it did not see. Raises ConfigError when the
    category folder does not exist.
    """
    folder = (Path(data_root) / category).resolve()
    if not folder.is_dir():
        raise ConfigError(f"cannot hash {folder}: no such category folder")
    files = folder_files(folder)
    return _dvc_dir_hash(files), files


def data_hash(data_root: Path, category: str) -> str:
    """The hash of `data_version`: the md5 DVC 3 gives the category folder's current files."""
    return data_version(data_root, category)[0]


def git_state() -> tuple[str, bool]:
    """(commit, dirty) of the code that runs: the checkout holding the `dualstpm` package
    (an editable install), else the project's; ("unknown", False) outside git."""
    import dualstpm

    for where in (Path(dualstpm.__file__).parent, project_dir()):
        try:
            def git(*args: str) -> str:
                return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True,
                                      timeout=30, check=True).stdout.strip()
            return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown", False


def model_sha256(model_dir: Path) -> str:
    """sha256 (hex) over the fit's model files: each file's name and its own sha256, in order."""
    total = hashlib.sha256()
    for name in HASHED_FILES:
        total.update(f"{name}\0{file_digest(Path(model_dir) / name)}\n".encode())
    return total.hexdigest()
