"""The command line as a user runs it: real subprocesses, clear errors, no tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import PROJECT_ROOT, TINY_OVERRIDES


def dualstpm(*args: str, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dualstpm", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def test_fit_test_predict_through_the_cli(synthetic_root: Path, tmp_path: Path):
    run = tmp_path / "run"
    done = dualstpm("fit", "--data-root", str(synthetic_root), "--category", "synth_object", "--out", str(run),
                    *sets(TINY_OVERRIDES + ["fit.epochs=1"]))
    assert done.returncode == 0, done.stderr
    done = dualstpm("test", "--run", str(run), "--data-root", str(synthetic_root), "--category", "synth_object")
    assert done.returncode == 0, done.stderr
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"fused", "stpm", "recon"} <= set(metrics)
    assert "image AUROC" in done.stdout
    images = sorted((synthetic_root / "synth_object" / "test" / "stain").iterdir())[:2]
    done = dualstpm("predict", "--run", str(run), *map(str, images), "--out", str(tmp_path / "pred"))
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(tmp_path / "pred" / "predictions.csv")) == 2


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["fit", "--data-root", "{root}", "--category", "nope", "--out", "{tmp}/r"], ["nope", "synth_texture"]),
        (["fit", "--data-root", "{root}", "--category", "synth_texture", "--out", "{tmp}/r", "--set", "fusion.mode=max"],
         ["fusion.mode", "product"]),
        (["fit", "--data-root", "{root}", "--category", "synth_texture", "--out", "{tmp}/r", "--set", "fit.epoch=1"],
         ["fit.epoch", "valid keys"]),
        (["test", "--run", "{tmp}/missing", "--data-root", "{root}"], ["missing", "dualstpm fit"]),
        (["predict", "--run", "{tmp}/missing", "{tmp}/x.png", "--out", "{tmp}/o"], ["missing"]),
        (["fit", "--data-root", "{root}", "--category", "synth_texture", "--out", "{tmp}/r", "--params", "{tmp}/none.yaml"],
         ["none.yaml"]),
    ],
)
def test_bad_input_is_one_clear_message_without_traceback(args, fragments, synthetic_root: Path, tmp_path: Path):
    args = [a.format(root=synthetic_root, tmp=tmp_path) for a in args]
    done = dualstpm(*args)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "error:" in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr


def test_params_command_lists_keys():
    done = dualstpm("params", "--set", "fit.epochs=9")
    assert done.returncode == 0 and "epochs: 9" in done.stdout and "fusion.normalize" in done.stdout
