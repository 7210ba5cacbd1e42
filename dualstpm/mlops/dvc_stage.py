"""The data step as DVC versions it: `dvc.yaml`'s `download` stage, and running it from Python.

The stage's output is `data/<data.source>`:

- `synthetic` and `mvtec`: the generated or downloaded categories themselves, so DVC keeps
  them in its cache and a second `dvc repro` (or a checkout of an older commit) never
  needs the network. `data.root` must therefore be that folder.
- `folder`: a manifest of the validated categories. The user's folder is read where it
  is and is only ever a dependency: DVC deletes a stage's outputs before running it,
  and a dataset of record must never be an output.

The Prefect flows reach the data through the same stage (`reproduce_download`), so the
data a flow trains on is the versioned one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dualstpm.config import Params, read_yaml, validate
from dualstpm.data import load_category, missing_test_message
from dualstpm.errors import ConfigError, DataError, NetworkError
from dualstpm.files import write_json
from dualstpm.mlops.stages import prepare_data, prepare_root
from dualstpm.progress import stderr_console

DOWNLOAD_STAGE = "download"
MANIFEST_FILE = "manifest.json"


def _same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def write_manifest(params: Params, out: Path) -> Path:
    """For `folder`: record what was validated (category, image counts, defect types), and
    under `unusable` each category that cannot be used with its error. One bad category
    costs the others nothing: its own fit then fails with that error. A category without
    test images is recorded (0 test images, a warning): its fit runs, its test says what
    it needs. Raises DataError when no category is usable."""
    root = Path(params.data.root)
    categories, unusable = {}, {}
    for name in params.data.categories:
        try:
            category = load_category(root, name, require_test=False)
        except DataError as exc:
            unusable[name] = str(exc)
            stderr_console.print(f"warning: category {name} cannot be used (its stages will fail): {exc}",
                                 highlight=False, markup=False)
            continue
        if not category.test:
            stderr_console.print(f"warning: category {name} can be trained but not tested (its test stage will "
                                 f"fail): {missing_test_message(category.root)}", highlight=False, markup=False)
        categories[name] = {
            "train_images": len(category.train),
            "test_images": len(category.test),
            "defect_types": list(category.defect_types),
            "has_ground_truth": category.has_ground_truth,
        }
    if not categories:
        raise DataError("no category of data.categories can be used:\n" + "\n".join(unusable.values()))
    return write_json(out / MANIFEST_FILE, {"data_root": str(root.resolve()), "categories": categories, "unusable": unusable})


def run_download_stage(params: Params, out: Path) -> Path:
    """What `dualstpm prepare --out data/<source>` does: prepare the data, produce `out`.

    Refuses a `data.root` that is not `out` for the sources whose data is the output,
    before touching anything, so the stage never fails with DVC's "output does not exist".
    """
    out = Path(out)
    if params.data.source == "folder":
        if _same_folder(Path(params.data.root), out):
            raise ConfigError(
                f"data.root {params.data.root} is the download stage's output folder {out}, which DVC deletes "
                "before each run: keep your data elsewhere and point data.root there."
            )
        prepare_root(params)
        return write_manifest(params, out)
    if not _same_folder(Path(params.data.root), out):
        raise ConfigError(
            f"data.source={params.data.source} makes the download stage write {out}, but data.root is "
            f"{params.data.root}: set data.root: {out} in params.yaml (DVC versions that folder), or use "
            "data.source: folder for data that lives elsewhere."
        )
    return prepare_data(params)


def _project_data_params(project: Path) -> dict:
    path = project / "params.yaml"
    return validate(read_yaml(path), str(path)).data.model_dump(mode="json")


def reproduce_download(params: Params, project: Path) -> Path:
    """Bring the data to the versioned state through DVC (`dvc repro download`); return the data root.

    DVC reads `<project>/params.yaml`, so the run's `data.*` must be the project's: a
    mismatch is refused rather than training on data the params do not describe. The
    current interpreter's folder goes first on PATH so the stage's `dualstpm` is this one.
    """
    project = Path(project).resolve()
    if not (project / "dvc.yaml").is_file() or not (project / ".dvc").is_dir():
        raise ConfigError(
            f"{project} is not the DVC project (no dvc.yaml or .dvc/): run from the project root, "
            "or skip DVC for the data step (flows: --no-dvc)."
        )
    wanted, declared = params.data.model_dump(mode="json"), _project_data_params(project)
    if wanted != declared:
        keys = sorted(k for k in wanted if wanted[k] != declared.get(k))
        raise ConfigError(
            f"the DVC data step reads {project / 'params.yaml'}, whose data.{', data.'.join(keys)} differ from this "
            "run's: put the data settings into params.yaml, or skip DVC for the data step (flows: --no-dvc)."
        )
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    command = [sys.executable, "-m", "dvc", "repro", DOWNLOAD_STAGE]
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        # The stage's command exits with NetworkError's code when its download may pass.
        transient = f"exited with {NetworkError.exit_code}" in done.stdout + done.stderr
        raise (NetworkError if transient else DataError)(
            f"`dvc repro {DOWNLOAD_STAGE}` failed in {project} (exit {done.returncode}):\n{tail}")
    return (project / params.data.root).resolve()
