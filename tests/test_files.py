"""The atomic-write helpers: all or nothing, permissions that follow the umask, and strict
JSON (null where a number has no value) from every JSON writer."""

from __future__ import annotations

import csv
import os
import stat

import numpy as np
import pandas as pd
import pytest

from conftest import strict_json
from dualstpm.files import (atomic_file, json_ready_table, json_text, staged_dir, write_csv, write_json,
                            write_text)


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


def test_strict_json_parser_refuses_what_python_writes_by_default():
    """The parser the other tests trust: it must refuse NaN and Infinity, as JavaScript does."""
    import json

    for value in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError):
            strict_json(json.dumps({"x": value}))


def test_write_json_writes_null_for_every_number_without_a_value(tmp_path):
    data = {"nan": float("nan"), "inf": [float("inf"), -float("inf"), 1.5], "f32": np.float32("nan"),
            "f64": np.float64(0.25), "i64": np.int64(3), "array": np.array([[1.0, np.nan], [np.inf, 2.0]]),
            "tuple": (float("nan"), "x"), "nested": {"deep": [{"v": float("nan")}]}, "none": None}
    write_json(tmp_path / "m.json", data)
    assert strict_json((tmp_path / "m.json").read_text()) == {
        "nan": None, "inf": [None, None, 1.5], "f32": None, "f64": 0.25, "i64": 3,
        "array": [[1.0, None], [None, 2.0]], "tuple": [None, "x"], "nested": {"deep": [{"v": None}]}, "none": None}
    assert strict_json(json_text([float("nan")], indent=None)) == [None]


def test_json_ready_table_nulls_missing_numbers_and_keeps_other_columns():
    table = pd.DataFrame({"score": [0.5, 1.5], "disc_score": [np.nan, np.nan], "mixed": [np.inf, 2.0],
                          "label": ["good", "defective"], "count": [1, 2]})
    ready = json_ready_table(table)
    assert ready.to_dict(orient="records") == [
        {"score": 0.5, "disc_score": None, "mixed": None, "label": "good", "count": 1},
        {"score": 1.5, "disc_score": None, "mixed": 2.0, "label": "defective", "count": 2}]
    assert ready["score"].dtype == np.float64 and ready["count"].dtype == np.int64  # untouched
    assert ready["disc_score"].isna().all()  # still missing for pandas users
    assert table["disc_score"].dtype == np.float64  # the input is not changed


def test_write_csv_leaves_a_missing_value_as_an_empty_cell(tmp_path):
    write_csv(tmp_path / "t.csv", pd.DataFrame({"score": [0.5, np.nan], "disc_score": [np.nan, np.nan],
                                                "error": ["", "cannot read"]}))
    with open(tmp_path / "t.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["score", "disc_score", "error"], ["0.5", "", ""], ["", "", "cannot read"]]


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
    from dualstpm.model.fusion import MapStats, ScoreSpec

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
