"""The project a command works in, and the data root as a run records it.

The project is the working directory, or, inside a DVC experiment's temporary copy
(`<project>/.dvc/tmp/exps/...`), the project that copy belongs to: the copy is thrown
away, what it records must not be tied to it. A run directory records the data root its
model was trained on relative to itself when both lie in the project, so that the record
is the same in every clone.

Only the standard library and the params model are used here: training, export and the
MLOps modules all read these, and none of them sits below this module.
"""

from __future__ import annotations

import os
from pathlib import Path

from dualstpm.config import Params


def project_dir() -> Path:
    """The working directory, or the project a DVC temporary experiment copy was made from."""
    cwd = Path.cwd().resolve()
    parts = cwd.parts
    for i in range(len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return cwd


def params_for_data(params: Params, data_root: Path | str | None) -> Params:
    """`params` describing the data actually used, as logged to MLflow: a `--data-root`
    other than `data.root` makes it a `folder` dataset there."""
    if data_root is None or Path(data_root).resolve() == Path(params.data.root).resolve():
        return params
    data = params.data.model_copy(update={"source": "folder", "root": str(data_root)})
    return params.model_copy(update={"data": data})


def recorded_data_root(data_root: Path | str, run_dir: Path | str) -> str:
    """How `RUN/model/params.yaml` records the data root a model was trained on: relative to
    the run directory (POSIX, e.g. `../../../data/synthetic`) when both lie in the project
    (`project_dir`), so that the file is the same in every clone and stays valid when the
    project moves; else the absolute path. `resolve_data_root` reads it back."""
    root, run = Path(data_root).resolve(), Path(run_dir).resolve()
    project = project_dir()
    if root.is_relative_to(project) and run.is_relative_to(project):
        return Path(os.path.relpath(root, run)).as_posix()
    return str(root)


def resolve_data_root(recorded: str, run_dir: Path | str) -> Path:
    """The folder a `recorded_data_root` names: an absolute path as it is, a relative one
    from the run directory (whatever the working directory)."""
    root = Path(recorded)
    return root if root.is_absolute() else (Path(run_dir) / root).resolve()
