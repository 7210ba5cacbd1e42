"""The run directory contract (dualstpm.rundir): names, dvc.yaml's outputs, readers and writers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dualstpm.errors import RunError, TrackingError
from dualstpm.rundir import (
    STAGE_OUTPUTS,
    RunDir,
    read_json,
    read_optional_json,
    read_weights,
    trained_model_dir,
    weights_bytes,
    write_model_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def test_paths_of_a_run_directory():
    run = RunDir("runs/weld")
    assert run.weights == Path("runs/weld/model/weights.safetensors")
    assert run.disc_weights == Path("runs/weld/model/discriminator.safetensors")
    assert run.params == Path("runs/weld/model/params.yaml")
    assert run.calibration == Path("runs/weld/model/calibration.json")
    assert run.lineage == Path("runs/weld/model/lineage.json")
    assert run.fusion == Path("runs/weld/model/fusion.json")
    assert run.metrics == Path("runs/weld/metrics.json")
    assert run.run_record == Path("runs/weld/mlflow_run.json")
    assert run.test_maps == Path("runs/weld/maps/test.npz")
    assert run.val_maps == Path("runs/weld/maps/val.npz")
    assert run.synthetic_maps == Path("runs/weld/maps/val_synthetic.npz")
    assert run.ablation_summary == Path("runs/weld/ablation/summary.json")
    assert run.evaluation("0123abcd.dir") == Path("runs/weld/evaluations/0123abcd")
    assert run.export("onnx", "fp32") == Path("runs/weld/exports/onnx-fp32")


def test_dvc_yaml_declares_exactly_the_outputs_the_contract_names():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, names in STAGE_OUTPUTS.items():
        outs = stages[stage]["do"]["outs"]
        declared = {(o if isinstance(o, str) else next(iter(o))).removeprefix("runs/${item}/") for o in outs}
        assert declared == set(names), stage


def test_dvc_yaml_dependencies_on_a_run_are_files_the_contract_names():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    named = {n for names in STAGE_OUTPUTS.values() for n in names}
    for stage in ("test", "ablate"):
        deps = [d.removeprefix("runs/${item}/") for d in stages[stage]["do"]["deps"] if d.startswith("runs/")]
        assert deps and set(deps) <= named, (stage, set(deps) - named)


def test_a_model_directory_missing_a_file_is_refused_naming_it(tmp_path: Path):
    write_model_dir(tmp_path, b"w", "seed: 0\n", {"format_version": 2})
    assert trained_model_dir(tmp_path) == tmp_path / "model"
    (tmp_path / "model" / "calibration.json").unlink()
    with pytest.raises(RunError, match=r"missing calibration\.json.*dualstpm fit --out"):
        trained_model_dir(tmp_path)


def test_write_model_dir_replaces_the_folder_whole(tmp_path: Path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stale.txt").write_text("from an earlier fit")
    model = write_model_dir(tmp_path, b"abc", "seed: 1\n", {"threshold": 0.5}, disc_weights=b"d")
    assert sorted(p.name for p in model.iterdir()) == [
        "calibration.json", "discriminator.safetensors", "params.yaml", "weights.safetensors"]
    assert (model / "weights.safetensors").read_bytes() == b"abc"
    assert (model / "params.yaml").read_text() == "seed: 1\n"
    assert read_json(model / "calibration.json", "fix") == {"threshold": 0.5}


def test_weights_round_trip_through_safetensors(tmp_path: Path):
    state = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([7])}
    path = tmp_path / "w.safetensors"
    path.write_bytes(weights_bytes(state))
    back = read_weights(path)
    assert set(back) == {"a.weight", "b"}
    assert back["a.weight"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert back["b"].tolist() == [7]


def test_damaged_json_names_the_file_and_the_fix(tmp_path: Path):
    path = tmp_path / "fusion.json"
    assert read_optional_json(path, "re-run ablate") is None
    path.write_text("{not json")
    with pytest.raises(RunError, match=r"fusion\.json is damaged .*re-run ablate"):
        read_optional_json(path, "re-run ablate")
    with pytest.raises(TrackingError, match="delete it"):
        read_json(path, "delete it", TrackingError)
