"""The command line as a user runs it: real subprocesses, clear errors, no tracebacks."""

import json
import re
import shutil
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
    assert "the threshold promises 33.3% (why: calibration.notes in metrics.json)" in said
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


def test_a_redirected_console_is_wide_unless_columns_says_otherwise(monkeypatch: pytest.MonkeyPatch):
    import io

    from dualstpm.tables import REDIRECTED_WIDTH, console

    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a file, not a terminal
    monkeypatch.delenv("COLUMNS", raising=False)
    assert REDIRECTED_WIDTH > 80 and console().width == REDIRECTED_WIDTH  # rich alone would take 80
    monkeypatch.setenv("COLUMNS", "50")
    assert console().width == 50


def test_a_low_recall_at_the_threshold_is_explained_with_the_fix():
    from dualstpm.cli import recall_note

    result = {"default": "fused", "n_defective": 52, "calibration": {"false_alarm_rate": 0.01},
              "fused": {"recall": 2 / 52}, "memory": {"recall": 0.9}}
    note = recall_note(result)
    # 2 of 52 = 3.8 %, below the 50 % floor; the fix names the key and a value
    assert "2 of the 52 defective test parts (recall 3.8%)" in note and "1.0% false-alarm" in note
    assert "--set calibration.false_alarm_rate=0.05" in note
    assert recall_note({**result, "default": "memory"}) is None  # the decision view's recall counts, 90 %
    assert recall_note({**result, "fused": {"recall": 0.5}}) is None  # the floor itself is not low
    assert recall_note({**result, "n_defective": 0}) is None and recall_note({**result, "fused": {"recall": None}}) is None


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
    # the data layout too: before the model is built (torch is not even imported)
    (["fit", "--data-root", "{tmp}/data", "--category", "empty", "--out", "{tmp}/r"], "no training images in"),
    (["fit", "--data-root", "{tmp}/data", "--category", "nomask", "--out", "{tmp}/r"], "001.png has no mask"),
    (["test", "--run", "{fake}", "--data-root", "{tmp}/data"], "synth_texture/test does not exist"),
])
def test_path_errors_come_before_heavy_imports(args, fragment, tmp_path: Path):
    """A wrong path or data layout is refused before torch, timm, MLflow or Prefect are
    imported (so in well under a second, and before any model is built)."""
    fake = tmp_path / "run"  # a run directory whose model files exist (their content is never read this early)
    (fake / "model").mkdir(parents=True)
    for name in ("weights.safetensors", "params.yaml"):
        (fake / "model" / name).write_text("")
    (fake / "model" / "calibration.json").write_text(json.dumps({"category": "synth_texture"}))
    data = tmp_path / "data"  # categories with layout faults; the image files' content is never read either
    (data / "empty" / "train" / "good").mkdir(parents=True)
    for image in ("nomask/train/good/000.png", "nomask/test/crack/001.png", "synth_texture/train/good/000.png"):
        (data / image).parent.mkdir(parents=True, exist_ok=True)
        (data / image).write_bytes(b"")
    (data / "nomask" / "ground_truth" / "crack").mkdir(parents=True)
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
    # far more epochs than can pass before the signal (a tiny epoch takes well under a second, and 50 of them
    # once finished between two polls of the checkpoint on a fast machine): the fit must still be training
    EPOCHS = 5000
    args = ["fit", "--data-root", str(synthetic_root), "--category", "synth_texture", "--out", str(run),
            *sets(TINY_OVERRIDES + [f"fit.epochs={EPOCHS}"])]
    # Ctrl-C as a terminal sends it: a suite started in the background (`pytest ... &`) hands its
    # children SIGINT ignored, which Python then leaves ignored (the caller's choice)
    process = subprocess.Popen([sys.executable, "-m", "dualstpm", *args], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not (run / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    epoch = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]  # what is really on disk
    message = " ".join(stderr.split())
    assert f"epoch {epoch} of {EPOCHS} is checkpointed in {run / 'checkpoint.pt'}" in message
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


def test_a_category_with_only_good_training_images_fits_and_test_says_what_it_needs(tmp_path: Path):
    import yaml

    from dualstpm.data.synthetic import make_synthetic_category

    root = tmp_path / "mine"
    category = make_synthetic_category(root, "part", kind="texture", seed=0, image_size=64, n_train=10, n_test_good=1,
                                       n_per_defect=1)
    for folder in ("test", "ground_truth"):  # a user who has only good parts yet
        shutil.rmtree(category / folder)
    run = tmp_path / "run"
    done = dualstpm("fit", "--data-root", str(root), "--category", "part", "--out", str(run),
                    *sets(TINY_OVERRIDES + ["fit.epochs=1"]), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    # the model records the data it was trained on, not the params' default (data/synthetic): the
    # project (the working directory) holds both, so the root is written from the run directory
    data = yaml.safe_load((run / "model" / "params.yaml").read_text())["data"]
    assert (data["source"], data["root"], data["categories"]) == ("folder", "../mine", ["part"])
    assert (run / data["root"]).resolve() == root.resolve()
    done = dualstpm("test", "--run", str(run), "--data-root", str(root), cwd=tmp_path)
    message = " ".join(done.stderr.split())
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"no test images: {category / 'test'} does not exist" in message
    assert f"defect-free parts in {category / 'test' / 'good'}/" in message
    assert f"{category / 'ground_truth'}/<defect_type>/<name>_mask.png" in message
    assert not (run / "metrics.json").exists()


def _set_examples() -> dict[str, str]:
    """Each command's `--set` help example, as `dualstpm COMMAND --help` shows it."""
    import typer

    from dualstpm.cli import app

    examples = {}
    for name, command in typer.main.get_command(app).commands.items():
        for option in command.params:
            if "--set" in getattr(option, "opts", ()):
                examples[name] = re.fullmatch(r"override a param, e\.g\. --set (\S+) \(repeatable\)", option.help)[1]
    return examples


def test_each_commands_set_example_is_one_that_command_accepts():
    from dualstpm.cli import SERVING_SETTINGS, serving_params
    from dualstpm.config import load_params

    examples = _set_examples()
    assert {"fit", "test", "predict", "ablate", "register", "promote", "params", "review", "monitor"} <= set(examples)
    for command, example in examples.items():
        load_params(None, [example])  # a valid key and value
        if command in SERVING_SETTINGS:  # the validator `dualstpm test` / `predict` runs on --set
            serving_params(None, [example], command, SERVING_SETTINGS[command])
    assert not examples["predict"].startswith("fit.")  # the example it once showed, and refused
    for command in ("review", "monitor"):  # they read only the store's settings of --set
        assert examples[command].startswith("tracking."), (command, examples[command])


def test_predict_says_what_it_replaced_in_an_existing_out_folder(trained_run: Path, synthetic_root: Path,
                                                                tmp_path: Path):
    good = synthetic_root / "synth_texture" / "test" / "good"
    out = tmp_path / "pred"
    first = dualstpm("predict", "--run", str(trained_run), *(str(good / f"00{i}.png") for i in range(3)),
                     "--out", str(out), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "replaced" not in first.stdout  # a new folder: nothing to replace
    second = dualstpm("predict", "--run", str(trained_run), str(good / "002.png"), "--out", str(out), cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    said = " ".join(second.stdout.split())
    assert (f"replaced: {out} held an earlier batch: its predictions.csv of 3 image(s) is replaced by this one of 1; "
            "of its 3 overlay(s), 1 were overwritten by this batch's of the same name and 2 deleted "
            "(000_overlay.png, 001_overlay.png)") in said
    # monitor: batch.json; regions.jsonl: the batch's defect regions (docs/regions.md)
    assert sorted(p.name for p in out.iterdir()) == ["002_overlay.png", "monitor", "predictions.csv", "regions.jsonl"]


@pytest.mark.slow
def test_sigterm_during_fit_says_what_is_checkpointed_and_the_resume_command_works(synthetic_root: Path,
                                                                                   tmp_path: Path):
    """A scheduler stopping the job (SIGTERM) gets what Ctrl-C gets: the checkpoint and the
    --resume command on stderr, exit 143 (128 + SIGTERM); the printed command continues it."""
    import shlex
    import signal

    import torch

    run = tmp_path / "run"
    args = ["fit", "--data-root", str(synthetic_root), "--category", "synth_texture", "--out", str(run),
            *sets(TINY_OVERRIDES + ["fit.epochs=50"])]
    process = subprocess.Popen([sys.executable, "-m", "dualstpm", *args], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    for line in process.stderr:  # the first epoch's line comes after its checkpoint is written
        lines.append(line)
        if re.search(r"\bepoch 1\s", line):
            break
    assert (run / "checkpoint.pt").is_file(), "".join(lines)
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=600)
    stderr = "".join(lines) + rest
    assert process.returncode == 143, stderr
    assert "Traceback" not in stderr
    epoch = torch.load(run / "checkpoint.pt", weights_only=True)["epoch"]  # what is really on disk
    assert 1 <= epoch < 50
    message = " ".join(stderr.split())
    assert f"stopped by SIGTERM: epoch {epoch} of 50 is checkpointed in {run / 'checkpoint.pt'}" in message
    printed = [line for line in stderr.splitlines() if line.startswith("continue with: ")]
    assert printed == [f"continue with: {shlex.join(['dualstpm', *args, '--resume'])}"], stderr
    # The printed command, run as is but for one more --set (the last wins) so that it ends soon.
    command = shlex.split(printed[0].removeprefix("continue with: "))
    resumed = subprocess.run([sys.executable, "-m", *command, "--set", f"fit.epochs={epoch + 1}"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} after epoch {epoch}" in " ".join(resumed.stderr.split())
    history = pd.read_csv(run / "history.csv")
    assert history["epoch"].tolist() == list(range(1, epoch + 2))
    assert (run / "model" / "weights.safetensors").is_file()
