"""The project's `dvc.yaml`, run for real: `dvc repro` in a temporary git repository.

The repository holds the project's dvc.yaml, params.yaml (with tiny settings: one
synthetic category, 64 px, one epoch), DVC config and the package (a dependency of the
stages). Stages run the installed `dualstpm` command and log to a throwaway MLflow store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from dualstpm.config import apply_overrides

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore",
                 "vendor/vega/dvc_plots.html")
CATEGORY = "synth_texture"
TINY = ["image_size=64", "fit.epochs=1", "fit.device=cpu", f"data.categories=[{CATEGORY}]",
        "ablation.branch_weight_step=0.5", "ablation.panel_images=0"]
ALL_STAGES = ["download", f"fit@{CATEGORY}", f"test@{CATEGORY}", f"ablate@{CATEGORY}", "report"]


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(command)} failed ({done.returncode}):\n{output[-4000:]}"
    return output


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def make_project(root: Path, overrides: list[str]) -> Path:
    """A git repository with the project's pipeline files and tiny params, committed."""
    root.mkdir(parents=True)
    for name in PROJECT_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROJECT_ROOT / name, root / name)
    shutil.copytree(PROJECT_ROOT / "dualstpm", root / "dualstpm", ignore=shutil.ignore_patterns("__pycache__"))
    raw = yaml.safe_load((root / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(apply_overrides(raw, overrides), sort_keys=False))
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "tests@dualstpm"],
                    ["git", "config", "user.name", "tests"], ["git", "add", "-A"], ["git", "commit", "-qm", "pipeline"]):
        subprocess.run(command, cwd=root, check=True)
    return root


@pytest.fixture(scope="module")
def dvc_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """This interpreter's `dualstpm` and `dvc` first on PATH; a throwaway MLflow store."""
    store = tmp_path_factory.mktemp("mlflow")
    return {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "DVC_NO_ANALYTICS": "1"}


@pytest.fixture(scope="module")
def repro(tmp_path_factory: pytest.TempPathFactory, dvc_env: dict[str, str]) -> tuple[Path, str]:
    """The project after its first `dvc repro`, with that run's output."""
    project = make_project(tmp_path_factory.mktemp("dvc") / "project", TINY)
    run(["dvc", "config", "--local", "core.site_cache_dir", str(tmp_path_factory.mktemp("dvc-site"))], project, dvc_env)
    return project, run(["dvc", "repro"], project, dvc_env)


def test_repro_runs_every_stage_once_then_nothing(repro, dvc_env) -> None:
    project, first = repro
    assert stages_run(first) == ALL_STAGES
    second = run(["dvc", "repro"], project, dvc_env)
    assert stages_run(second) == []
    assert "Data and pipelines are up to date." in second
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["download"]["outs"][0]["path"] == "data/synthetic"  # the data is versioned, in the cache
    assert (project / ".dvc" / "cache").is_dir()


def test_metrics_show_prints_the_auc_table(repro, dvc_env) -> None:
    project, _ = repro
    table = pd.read_csv(project / "reports" / "auc_table.csv")
    assert list(table["model"]) == ["stpm", "recon", "fused", "fused_chosen"]
    assert set(table["category"]) == {CATEGORY}
    shown = run(["dvc", "metrics", "show", "--json"], project, dvc_env)
    metrics = json.loads(shown)[""]["data"][f"reports/metrics/{CATEGORY}.json"]["data"]
    fused = table[table["model"] == "fused"].iloc[0]
    assert metrics["fused"]["image_auroc"] == pytest.approx(fused["image_auroc"])
    assert set(metrics) == {"stpm", "recon", "fused", "fused_chosen"}
    printed = run(["dvc", "metrics", "show"], project, dvc_env)
    assert f"reports/metrics/{CATEGORY}.json" in printed and "fused.image_auroc" in printed
    plots = json.loads(run(["dvc", "plots", "show", "--json"], project, dvc_env))
    assert not plots.get("errors")
    assert {f"{CATEGORY} roc", f"{CATEGORY} pro", f"reports/overlays/{CATEGORY}.png"} <= set(plots["data"])
    assert plots["data"][f"{CATEGORY} roc"][0]["content"]["title"]["text"] == \
        f"{CATEGORY}: image ROC, views fused, stpm, recon"


def untracked(project: Path, env: dict[str, str]) -> set[str]:
    """What `git status` lists besides committed files, one path per file; asserts nothing tracked changed."""
    status = run(["git", "status", "--porcelain", "--untracked-files=all"], project, env).splitlines()
    changed = [line for line in status if not line.startswith("?? ")]
    assert changed == [], changed
    return {line[3:] for line in status}


def test_after_repro_and_plots_show_git_lists_only_what_to_commit(repro, dvc_env) -> None:
    """dvc.lock (DVC's record of the pipeline) and the report's small files, which DVC keeps out
    of its cache for git (README); the plots page, the run directories, the data and the
    cached overlays are ignored."""
    project, _ = repro
    run(["dvc", "plots", "show"], project, dvc_env)
    assert (project / "dvc_plots" / "index.html").is_file()
    assert untracked(project, dvc_env) == {
        "dvc.lock", "reports/.gitignore", "reports/auc_table.csv", "reports/ablation.csv", "reports/dvc.yaml",
        f"reports/metrics/{CATEGORY}.json", f"reports/plots/roc/{CATEGORY}.csv", f"reports/plots/pro/{CATEGORY}.csv"}


def test_gitignore_ignores_what_the_demo_and_plots_show_leave_but_not_the_pipeline_record(tmp_path: Path,
                                                                                           dvc_env) -> None:
    project = make_project(tmp_path / "project", [])
    left = ["dvc.lock", "reports/auc_table.csv", "reports/metrics/a.json",  # to commit
            "dvc_plots/index.html", "dvc_plots/static/workspace_reports_overlays_a.png",  # `dvc plots show`
            "out/runs/a/metrics.json", "out/reports/auc_table.csv", "mlflow.db", "mlartifacts/1/x/model.onnx",
            "runs/a/model/weights.safetensors", "data/synthetic/a/train/good/000.png"]  # `make demo`, `dvc repro`
    for name in left:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text("x")
    assert untracked(project, dvc_env) == {"dvc.lock", "reports/auc_table.csv", "reports/metrics/a.json"}


def test_plots_show_works_offline_and_titles_name_the_category(tmp_path: Path, dvc_env) -> None:
    from dualstpm.mlops.report import write_dvc_plots

    project = make_project(tmp_path / "project", [])
    for category in ("bottle", "wood"):
        folder = project / "reports" / "plots" / "roc"
        folder.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"fpr": [0.0, 1.0], "fused": [0.5, 1.0], "stpm": [0.2, 1.0], "recon": [0.1, 1.0]}).to_csv(
            folder / f"{category}.csv", index=False)
    write_dvc_plots(project / "reports", {"bottle": ["roc"], "wood": ["roc"]})
    run(["dvc", "plots", "show", "-o", "page"], project, dvc_env)
    page = (project / "page" / "index.html").read_text()
    assert re.findall(r"<script[^>]*\bsrc=", page) == []  # nothing to fetch: the libraries are inlined
    assert "vegaEmbed" in page and "/* vega-lite@" in page
    titles = re.findall(r'"title": \{"text": "([^"]+)"', page)
    assert sorted(titles) == ["bottle: image ROC, views fused, stpm, recon", "wood: image ROC, views fused, stpm, recon"]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_flows_data_step_brings_back_the_versioned_data(repro, dvc_env, monkeypatch) -> None:
    from dualstpm.config import load_params
    from dualstpm.mlops.dvc_stage import reproduce_download

    project, _ = repro
    data = project / "data" / "synthetic"
    versioned = digest(data)
    shutil.rmtree(data)
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    assert reproduce_download(load_params(project / "params.yaml"), project) == data.resolve()
    assert digest(data) == versioned
    assert "Data and pipelines are up to date." in run(["dvc", "status"], project, dvc_env)


def set_params(project: Path, *overrides: str) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(apply_overrides(raw, list(overrides)), sort_keys=False))


def test_changing_an_ablation_param_reruns_ablate_and_report_only(repro, dvc_env) -> None:
    project, _ = repro
    set_params(project, "ablation.synthetic_seed=1")
    output = run(["dvc", "repro"], project, dvc_env)
    assert stages_run(output) == [f"ablate@{CATEGORY}", "report"]
    for unchanged in ALL_STAGES[:3]:
        assert f"Stage '{unchanged}' didn't change, skipping" in output


@pytest.mark.slow
def test_changing_epochs_reruns_fit_and_everything_after_it_only(repro, dvc_env) -> None:
    project, _ = repro
    set_params(project, "fit.epochs=2")
    output = run(["dvc", "repro"], project, dvc_env)
    assert stages_run(output) == ALL_STAGES[1:]
    assert "Stage 'download' didn't change, skipping" in output
    assert len(pd.read_csv(project / "runs" / CATEGORY / "history.csv")) == 2


@pytest.mark.slow
def test_the_pipeline_flow_agrees_with_dvc_repro(repro, dvc_env, monkeypatch) -> None:
    """Same params, same seed: the flow's AUC table equals dvc repro's (after the epochs change)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    project, _ = repro
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dvc_env["MLFLOW_TRACKING_URI"])
    with prefect_test_harness(server_startup_timeout=None):
        summary = pipeline("params.yaml", [], "out", True)
    flow_table = pd.read_csv(project / "out" / "reports" / "auc_table.csv")
    pd.testing.assert_frame_equal(flow_table, pd.read_csv(project / "reports" / "auc_table.csv"))
    assert set(summary["promotions"]) == {CATEGORY}


@pytest.mark.slow
def test_experiments_run_in_the_workspace_in_a_temp_copy_and_from_the_queue(repro, dvc_env) -> None:
    project, _ = repro
    run(["git", "add", "-A"], project, dvc_env)
    run(["git", "commit", "-qm", "reproduced"], project, dvc_env)  # experiments start from a commit
    run(["dvc", "exp", "run", "-S", "fit.epochs=2", "-n", "workspace-e2"], project, dvc_env)
    run(["dvc", "exp", "run", "--temp", "-S", "fit.epochs=3", "-n", "temp-e3"], project, dvc_env)
    run(["dvc", "exp", "run", "--queue", "-S", "fit.epochs=1", "-n", "queued-e1"], project, dvc_env)
    run(["dvc", "exp", "run", "--run-all"], project, dvc_env)
    shown = json.loads(run(["dvc", "exp", "show", "--json"], project, dvc_env))
    epochs = {}
    for commit in shown:
        for experiment in commit.get("experiments") or []:
            for revision in experiment["revs"]:
                data = revision["data"]
                metrics = data["metrics"][f"reports/metrics/{CATEGORY}.json"]["data"]
                epochs[revision["name"]] = (data["params"]["params.yaml"]["data"]["fit"]["epochs"],
                                            metrics["fused"]["image_auroc"])
    assert {name: e for name, (e, _) in epochs.items()}.items() >= {"workspace-e2": 2, "temp-e3": 3, "queued-e1": 1}.items()
    assert all(0 <= auroc <= 1 for _, auroc in epochs.values())


@pytest.mark.slow
def test_a_model_dvc_restores_registers_against_the_run_that_trained_it(repro, dvc_env) -> None:
    """fit.epochs 2, then 1 again: DVC restores the cached one-epoch model (with the
    lineage.json naming its run) and its test's outputs; `register` registers it against
    that run, not the two-epoch fit's that RUN/mlflow_run.json named, and says so."""
    from mlflow import MlflowClient

    project, _ = repro
    record = project / "runs" / CATEGORY / "mlflow_run.json"
    set_params(project, "fit.epochs=2")
    run(["dvc", "repro"], project, dvc_env)
    later = json.loads(record.read_text())["run_id"]
    set_params(project, "fit.epochs=1")
    output = run(["dvc", "repro"], project, dvc_env)
    assert f"fit@{CATEGORY}" not in stages_run(output)  # restored from the run cache, not trained
    trained_in = json.loads((project / "runs" / CATEGORY / "model" / "lineage.json").read_text())["run_id"]
    assert trained_in != later

    done = run(["dualstpm", "register", "--run", f"runs/{CATEGORY}"], project, dvc_env)
    message = " ".join(done.split())  # rich wraps long lines
    assert f"from MLflow run {trained_in}" in message and f"instead of run {later}" in message
    name = f"dualstpm-synthetic-{CATEGORY}"
    version = MlflowClient(dvc_env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(name, "challenger")
    assert version.run_id == trained_in
    assert json.loads(record.read_text())["run_id"] == trained_in  # the record now names it
