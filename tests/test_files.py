"""The atomic-write helpers: all or nothing, and permissions that follow the umask."""

from __future__ import annotations

import os
import stat

import pandas as pd
import pytest

from dualstpm.files import atomic_file, staged_dir, write_csv, write_json, write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_write_text_replaces_and_follows_umask(tmp_path, umask_022):
    path = tmp_path / "sub" / "metrics.json"
    write_text(path, "first")
    write_text(path, "second")
    assert path.read_text() == "second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # 0o666 & ~0o022
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no temp file left


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "table.csv"
    write_csv(path, pd.DataFrame({"a": [1, 2]}))
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_text("half a ta")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "a\n1\n2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.csv"]


def test_write_json_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"x": float("nan")})
    assert not (tmp_path / "m.json").exists()


def test_staged_dir_swaps_whole_folders(tmp_path, umask_022):
    final = tmp_path / "report"
    with staged_dir(final) as staging:
        (staging / "a.txt").write_text("old")
    assert stat.S_IMODE(final.stat().st_mode) == 0o755  # 0o777 & ~0o022, not mkdtemp's 0o700
    with pytest.raises(RuntimeError), staged_dir(final) as staging:
        (staging / "b.txt").write_text("new, half done")
        raise RuntimeError("crash")
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    with staged_dir(final) as staging:
        (staging / "b.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no staging or old folder left


def test_a_saved_model_directory_is_readable_per_the_umask(tmp_path, umask_022):
    """Issue #13: model directories were created owner-only (drwx------) by mkdtemp."""
    import torch

    from dualstpm.config import load_params
    from dualstpm.detector import Calibration, save_detector
    from dualstpm.fusion import MapStats, ScoreSpec

    calibration = Calibration(image_size=64, map_stats=MapStats(torch.zeros(2, 3), torch.ones(2, 3)),
                              thresholds={"fused": 1.0, "stpm": 1.0, "recon": 1.0}, val_score_summary={},
                              selected_epochs={"stpm": 1, "recon": 1}, category="c", false_alarm_rate=0.01,
                              score=ScoreSpec("max"), precision="float32")
    for _ in range(2):  # a new model and one replacing it
        model_dir = save_detector(tmp_path / "run", torch.nn.Linear(2, 2), load_params(None), calibration)
        assert stat.S_IMODE(model_dir.stat().st_mode) == 0o755
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in model_dir.iterdir()} == {
            "weights.safetensors": 0o644, "params.yaml": 0o644, "calibration.json": 0o644}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model"]  # no staging or old folder left
