"""The download stage's rules (the real `dvc repro` runs in test_pipeline_dvc.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dualstpm.config import apply_overrides, load_params
from dualstpm.mlops.dvc_stage import reproduce_download, run_download_stage
from dualstpm.errors import ConfigError, DataError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def params(*overrides: str):
    return load_params(PROJECT_ROOT / "params.yaml", list(overrides))


def test_generated_data_must_live_in_the_stage_output(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"set data.root: .*data/synthetic"):
        run_download_stage(params(f"data.root={tmp_path / 'elsewhere'}"), tmp_path / "data" / "synthetic")
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "data").exists()


def test_a_folder_of_record_is_read_where_it_is_and_described_by_a_manifest(tmp_path: Path, synthetic_root: Path) -> None:
    folder = params("data.source=folder", f"data.root={synthetic_root}", "data.categories=[synth_texture, synth_object]")
    manifest = json.loads(run_download_stage(folder, tmp_path / "data" / "folder").read_text())
    assert manifest["data_root"] == str(synthetic_root.resolve())
    texture = manifest["categories"]["synth_texture"]
    assert texture["train_images"] == 20 and texture["defect_types"] == ["hole", "scratch", "stain"]
    assert texture["has_ground_truth"] is True


def test_a_folder_of_record_is_never_the_stage_output(tmp_path: Path) -> None:
    out = tmp_path / "data" / "folder"
    with pytest.raises(ConfigError, match="DVC deletes before each run"):
        run_download_stage(params("data.source=folder", f"data.root={out}"), out)


def test_a_missing_folder_category_is_a_clear_error(tmp_path: Path, synthetic_root: Path) -> None:
    with pytest.raises(DataError, match="synth_missing"):
        run_download_stage(params("data.source=folder", f"data.root={synthetic_root}", "data.categories=[synth_missing]"),
                           tmp_path / "data" / "folder")


def test_an_unusable_folder_category_is_recorded_and_costs_the_others_nothing(tmp_path: Path, synthetic_root: Path) -> None:
    data = tmp_path / "mine"
    shutil.copytree(synthetic_root / "synth_texture", data / "synth_texture")
    shutil.copytree(synthetic_root / "synth_texture", data / "synth_nomask")
    (data / "synth_nomask" / "ground_truth" / "stain" / "001_mask.png").unlink()
    folder = params("data.source=folder", f"data.root={data}", "data.categories=[synth_texture, synth_nomask, synth_gone]")
    manifest = json.loads(run_download_stage(folder, tmp_path / "data" / "folder").read_text())
    assert list(manifest["categories"]) == ["synth_texture"]
    assert sorted(manifest["unusable"]) == ["synth_gone", "synth_nomask"]
    assert "001_mask.png" in manifest["unusable"]["synth_nomask"]


def test_a_folder_category_without_test_images_is_recorded_for_its_fit(tmp_path: Path, synthetic_root: Path) -> None:
    data = tmp_path / "mine"
    shutil.copytree(synthetic_root / "synth_texture" / "train", data / "goodonly" / "train")
    folder = params("data.source=folder", f"data.root={data}", "data.categories=[goodonly]")
    manifest = json.loads(run_download_stage(folder, tmp_path / "data" / "folder").read_text())
    assert manifest["categories"]["goodonly"]["train_images"] == 20
    assert manifest["categories"]["goodonly"]["test_images"] == 0 and manifest["unusable"] == {}


def test_the_dvc_data_step_needs_the_dvc_project(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not the DVC project"):
        reproduce_download(params(), tmp_path)


def test_the_dvc_data_step_refuses_data_params_the_project_does_not_declare(tmp_path: Path) -> None:
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(PROJECT_ROOT / name, tmp_path / name)
    (tmp_path / ".dvc").mkdir()
    with pytest.raises(ConfigError, match=r"data\.categories differ"):
        reproduce_download(params("data.categories=[synth_object]"), tmp_path)
    raw = apply_overrides(yaml.safe_load((tmp_path / "params.yaml").read_text()), ["data.categories=[synth_object]"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"data\.source"):
        reproduce_download(params("data.categories=[synth_object]", "data.source=folder"), tmp_path)
