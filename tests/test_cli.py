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
    said = " ".join(done.stdout.split())  # rich wraps at the terminal's width
    rates = ", ".join(f"{v} {metrics[v]['false_alarm_rate']:.1%}" for v in ("stpm", "recon", "fused"))
    assert f"false alarms on the good test parts: {rates} (calibrated for 1.0%" in said
    # TINY_OVERRIDES leave 2 calibration images: they promise 1/3, and the console says so
    assert "the threshold promises 33.3% (see calibration notes)" in said
    # progress goes to stderr (a pipe here: a line per stage), never into stdout's results
    n_test = len(list((synthetic_root / "synth_object" / "test").glob("*/*.png")))
    assert f"computing anomaly maps of test images: {n_test} images\n" in done.stderr
    assert f"computing anomaly maps of test images: done, {n_test}/{n_test} images in " in done.stderr
    assert "anomaly maps" not in done.stdout
    # a quoted pattern, as a user types it when the shell does not expand it: 000.png and 001.png
    pattern = str(synthetic_root / "synth_object" / "test" / "stain" / "00[01].png")
    done = dualstpm("predict", "--run", str(run), pattern, "--out", str(tmp_path / "pred"))
    assert done.returncode == 0, done.stderr
    assert sorted(Path(p).name for p in pd.read_csv(tmp_path / "pred" / "predictions.csv")["path"]) == ["000.png", "001.png"]
    assert "scoring images: 2 images\n" in done.stderr and "scoring images: done, 2/2 images in " in done.stderr
    assert "scoring images" not in done.stdout


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["fit", "--data-root", "{root}", "--category", "nope", "--out", "{tmp}/r"], ["nope", "synth_texture"]),
        (["fit", "--data-root", "{root}", "--category", "synth_texture", "--out", "{tmp}/r", "--set", "fusion.mode=max"],
         ["fusion.mode", "product"]),
        (["fit", "--data-root", "{root}", "--category", "synth_texture", "--out", "{tmp}/r", "--set", "fit.epoch=1"],
         ["unknown key 'fit.epoch'", "did you mean 'fit.epochs'?", "valid keys"]),
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


def test_params_output_is_yaml_that_params_accepts(tmp_path: Path):
    """`dualstpm params > p.yaml` then `--params p.yaml`: the same params, even on a narrow terminal."""
    import os

    import yaml

    url = "https://example.com/" + "a-long-path-segment/" * 8 + "mvtec_anomaly_detection.tar.xz"
    narrow = {**os.environ, "COLUMNS": "40"}
    first = subprocess.run([sys.executable, "-m", "dualstpm", "params", "--set", "fit.epochs=9", "--set", f"data.mvtec.url={url}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600, env=narrow)
    assert first.returncode == 0, first.stderr
    loaded = yaml.safe_load(first.stdout)
    assert loaded["fit"]["epochs"] == 9 and loaded["data"]["mvtec"]["url"] == url
    (tmp_path / "p.yaml").write_text(first.stdout)
    again = dualstpm("params", "--params", str(tmp_path / "p.yaml"), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    keys = dualstpm("params", "--keys").stdout.split()
    assert "fusion.normalize" in keys and "fit.epochs" in keys and "fit" not in keys


def test_version_is_the_package_version():
    import tomllib

    version = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["version"]
    done = dualstpm("--version")
    assert done.returncode == 0 and done.stdout == f"dualstpm {version}\n"


HEAVY = ("torch", "timm", "mlflow", "prefect")


@pytest.mark.parametrize("args, fragment", [
    (["predict", "--run", "{tmp}/missing", "{tmp}/x.png", "--out", "{tmp}/o"], "missing"),
    (["predict", "--run", "{fake}", "{tmp}/x.png", "--out", "{tmp}/o"], "x.png does not exist"),
    (["predict", "--run", "{fake}", "{tmp}/*.tif", "--out", "{tmp}/o"], "*.tif' matches no file"),
    (["fit", "--data-root", "{tmp}/missing", "--category", "c", "--out", "{tmp}/r"], "missing does not exist"),
    (["fit", "--data-root", "{tmp}", "--category", "nope", "--out", "{tmp}/r"], "nope not found"),
    (["test", "--run", "{tmp}/missing", "--data-root", "{tmp}"], "missing/model is not a trained model"),
    (["test", "--run", "{fake}", "--data-root", "{tmp}"], "synth_texture not found"),
    (["register", "--run", "{tmp}/missing"], "missing/model is not a trained model"),
    (["ablate", "--run", "{tmp}/missing"], "missing/model is not a trained model"),
    (["bench", "--data-root", "{tmp}/missing", "--category", "c"], "missing does not exist"),
])
def test_path_errors_come_before_heavy_imports(args, fragment, tmp_path: Path):
    """A wrong path is refused before torch, timm, MLflow or Prefect are imported (so in well under a second)."""
    fake = tmp_path / "run"  # a run directory whose model files exist (their content is never read this early)
    (fake / "model").mkdir(parents=True)
    for name in ("weights.safetensors", "params.yaml"):
        (fake / "model" / name).write_text("")
    (fake / "model" / "calibration.json").write_text(json.dumps({"category": "synth_texture"}))
    args = [a.format(tmp=tmp_path, fake=fake) for a in args]
    code = (
        "import json, sys\n"
        "from dualstpm.cli import main\n"
        f"sys.argv = ['dualstpm', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as exc:\n"
        f"    print(json.dumps([exc.code, [m for m in {HEAVY!r} if m in sys.modules]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert json.loads(done.stdout.splitlines()[-1]) == [2, []], done.stderr
    assert fragment in " ".join(done.stderr.split()), done.stderr


def test_ctrl_c_during_fit_says_what_is_checkpointed_and_how_to_resume(synthetic_root: Path, tmp_path: Path):
    import shlex
    import signal
    import time

    import torch

    run = tmp_path / "run"
    args = ["fit", "--data-root", str(synthetic_root), "--category", "synth_texture", "--out", str(run),
            *sets(TINY_OVERRIDES + ["fit.epochs=50"])]
    process = subprocess.Popen([sys.executable, "-m", "dualstpm", *args], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (run / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    epoch = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]  # what is really on disk
    message = " ".join(stderr.split())
    assert f"epoch {epoch} of 50 is checkpointed in {run / 'checkpoint.pt'}" in message
    assert f"continue with: {shlex.join(['dualstpm', *args, '--resume'])}" in message


def test_resume_with_overwrite_is_refused_before_the_store_opens(synthetic_root: Path, tmp_path: Path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the default store: ./mlflow.db
    done = subprocess.run([sys.executable, "-m", "dualstpm", "fit", "--data-root", str(synthetic_root), "--category",
                           "synth_texture", "--out", "run", "--resume", "--overwrite"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 2 and "--resume and --overwrite contradict" in done.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "run").exists()


def test_a_damaged_calibration_is_named(tmp_path: Path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    for name, text in (("weights.safetensors", ""), ("params.yaml", ""), ("calibration.json", "{")):
        (tmp_path / "run" / "model" / name).write_text(text)
    done = dualstpm("test", "--run", str(tmp_path / "run"), "--data-root", str(tmp_path), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{tmp_path / 'run' / 'model' / 'calibration.json'} is damaged" in done.stderr
