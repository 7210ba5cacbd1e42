"""The whole loop, scripted, on real data: train, predict on the line, review, feedback as a
new DVC data version, retrain, promote on evidence, and a drift alarm (issue 24, item 5).

Run it from the project root::

    python -m studies.loop_demo /tmp/loop --data-root ../shared/data --category battery_weld \\
        --results studies/results

OUT (new or empty) becomes a throwaway git + DVC repository with its own MLflow store
(``OUT/mlflow.db``) and Prefect home (``OUT/.prefect``); the source data is only read.
Every step runs the project's public commands in OUT (each printed as ``$ ...`` before it
runs), so the demo measures what a user gets:

0. the starting data: a copy of the category in ``OUT/data/<category>`` with
   ``--holdout-good`` of its ``train/good`` images held back and ``--line-defects`` of its
   defective test images (and masks) taken out of ``test/``; ``dvc add`` + git commit.
   The held-back and taken-out images are the **line batch** (``OUT/line/batch-1``,
   shuffled, renamed ``part-NNN``; the truth in ``OUT/line/truth.json``).
1. ``dualstpm fit``, ``test``, ``ablate``, ``register``, ``promote``: the first model,
   ``v1``; it becomes champion if it reaches ``tracking.promotion_floor``.
2. ``dualstpm predict`` of the line batch with v1: good parts it never saw, some flagged
   (false alarms), and defective parts.
3. the inspector: every part gets the verdict of its ground truth (a defective part with
   its ground-truth mask), written through the review page's own session and review log
   (:func:`studies.loop_line.review_from_truth`); then ``dualstpm feedback apply`` copies
   the parts into the category and ``dvc add`` records the new data version (committed).
4. retraining on the new data version: the Prefect ``retrain`` flow (``--retrain flow``,
   the default: ``python -m flows.retrain``, which fits, tests, ablates, registers and
   promotes) or the same commands as step 1 (``--retrain cli``); the model is ``v2``. The
   champion moves only when the registry's rule says so; the decision and its reason are
   read back from the registry's tags.
5. false alarms on the reviewed good parts: the share v1 flagged (step 2) against the share
   v2 flags (``dualstpm predict`` with v2), each at its own threshold; and on the test
   split's good parts (which neither model trained on), for both. The reviewed good parts
   are in v2's training data after the feedback: the first figure says what the feedback
   fixed, the second whether the model got better at good parts it never saw.
6. drift: the test split's good images as they are and with a lighting change
   (``--shift-contrast``, then ``--shift-brightness``, PIL ImageEnhance factors), both
   scored by the champion (v2 when no version is champion), then ``dualstpm monitor``:
   the KS statistic per batch and whether the alarm fires (exit code 3).

Writes ``OUT/loop_demo.json`` and ``OUT/loop_demo.md`` (the summary table), and with
``--results DIR`` the same two files into DIR. When the source category is absent the demo
is skipped, saying why (exit 0). Exit 1 when a command fails (its output is above).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from studies.loop_line import (
    DEFECTIVE,
    LineBatch,
    plan_split,
    review_from_truth,
    shifted_copy,
    write_line_batch,
    write_starting_data,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RESULTS_NAME = "loop_demo"
OFFLINE = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "DVC_NO_ANALYTICS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120"}
# git versions the params and DVC's records; the rest of OUT is the demo's workspace
GITIGNORE = "".join(f"/{name}\n" for name in ("line/", "runs/", "preds/", "retrain/", "monitor/", "mlflow.db",
                                               "mlartifacts/", "mlruns/", ".prefect/", "loop_demo.json", "loop_demo.md"))
NO_ALIAS = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE")  # MLflow's answers for an unset alias
NOT_PROMOTED = 3  # `dualstpm promote` judged and did not promote; `monitor`: a bound crossed


class CommandFailed(RuntimeError):
    """A command of the demo exited with a status it does not expect (its output is above)."""


@dataclass(frozen=True)
class Settings:
    """The demo's choices (the command line's options)."""

    out: Path
    data_root: Path
    category: str
    image_size: int = 128
    epochs: int = 10
    holdout_good: int = 12
    line_defects: int = 12
    max_train: int | None = None
    seed: int = 0
    retrain: str = "flow"
    shift_contrast: float = 0.5
    shift_brightness: float = 0.6
    overrides: tuple[str, ...] = ()
    results: Path | None = None


@dataclass
class Shell:
    """Runs the public commands in the demo repository `repo`, with the demo's own MLflow
    store and Prefect home in the environment of each command (never this process's), and
    keeps what ran (`ran`: command as a user types it, exit status, seconds)."""

    repo: Path
    ran: list[dict[str, Any]] = field(default_factory=list)

    @property
    def store(self) -> str:
        return f"sqlite:///{self.repo / 'mlflow.db'}"

    def env(self) -> dict[str, str]:
        env = {**OFFLINE, **os.environ}
        env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
        env["MLFLOW_TRACKING_URI"] = self.store
        env["PREFECT_HOME"] = str(self.repo / ".prefect")
        env.pop("PREFECT_API_URL", None)  # the flow's own temporary server, never a developer's
        return env

    def run(self, shown: list[str], argv: list[str], ok: tuple[int, ...] = (0,), capture: bool = False) -> subprocess.CompletedProcess:
        """Run `argv` in the repo, printing `shown` (the command as typed); raises CommandFailed
        on an exit status outside `ok`."""
        print(f"$ {shlex.join(shown)}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=self.repo, env=self.env(), text=True, check=False,
                              capture_output=capture)
        self.ran.append({"command": shlex.join(shown), "exit": done.returncode,
                         "seconds": round(time.perf_counter() - start, 1)})
        print(f"  (exit {done.returncode}, {self.ran[-1]['seconds']} s)", flush=True)
        if done.returncode not in ok:
            detail = f"\n{done.stdout}{done.stderr}" if capture else ""
            raise CommandFailed(f"`{shlex.join(shown)}` exited with {done.returncode} in {self.repo}{detail}")
        return done

    def dualstpm(self, *args: str, ok: tuple[int, ...] = (0,)) -> int:
        return self.run(["dualstpm", *args], [sys.executable, "-m", "dualstpm", *args], ok).returncode

    def flow(self, module: str, *args: str) -> int:
        return self.run(["python", "-m", module, *args], [sys.executable, "-m", module, *args]).returncode

    def tool(self, *args: str) -> str:
        """git or dvc (as a module of this Python, as `feedback apply` runs it); its output."""
        argv = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
        return self.run(list(args), argv, capture=True).stdout


# --------------------------------------------------------------------------- the steps


def set_up(settings: Settings, shell: Shell) -> tuple[LineBatch, dict[str, Any]]:
    """Step 0: the starting data under DVC in a new git repository, the line batch, the params."""
    out, category = settings.out, settings.category
    split = plan_split(settings.data_root, category, settings.holdout_good, settings.line_defects, settings.seed,
                       settings.max_train)
    write_starting_data(split, out / "data" / category)
    batch = write_line_batch(split, out / "line" / "batch-1", settings.seed)
    batch.write_truth(out / "line" / "truth.json")
    (out / ".gitignore").write_text(GITIGNORE)
    shell.tool("git", "init", "-q")
    shell.tool("git", "config", "user.name", "loop demo")
    shell.tool("git", "config", "user.email", "loop-demo@localhost")
    shell.tool("dvc", "init", "-q")
    overrides = [f"image_size={settings.image_size}", f"fit.epochs={settings.epochs}", "fit.recipe=fixed", "data.source=folder",
                 "data.root=data", f"data.categories=[{category}]", f"seed={settings.seed}",
                 f"tracking.uri={shell.store}", *settings.overrides]
    params = shell.run(["dualstpm", "params", "--params", "PROJECT/params.yaml", *_sets(overrides)],
                       [sys.executable, "-m", "dualstpm", "params", "--params", str(PROJECT_ROOT / "params.yaml"),
                        *_sets(overrides)], capture=True).stdout
    (out / "params.yaml").write_text(params)
    shell.tool("dvc", "add", "-q", f"data/{category}")
    shell.tool("git", "add", ".gitignore", ".dvcignore", ".dvc", "params.yaml", "data")
    shell.tool("git", "commit", "-q", "-m", f"starting data: {category} without the line's parts")
    defects = sum(1 for p in batch.parts.values() if p.truth == DEFECTIVE)
    return batch, {"train_good": len(split.train), "held_back_good": len(split.held_back), "line_defective": defects,
                   "duplicated_train_good": split.duplicated_train,
                   "test_good": sum(1 for p in split.test if p.parent.name == "good"),
                   "test_defective": sum(1 for p in split.test if p.parent.name != "good"),
                   "dvc_md5": [dvc_md5(out, category)], "params_overrides": overrides}


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def dvc_md5(out: Path, category: str) -> str:
    """The md5 the category's .dvc file records (the data version DVC tracks)."""
    record = yaml.safe_load((out / "data" / f"{category}.dvc").read_text())
    return str(record["outs"][0]["md5"])


def release_by_hand(shell: Shell, category: str, run: str) -> int:
    """fit, test, ablate, register, promote: one model from the commands; promote's exit status."""
    shell.dualstpm("fit", "--data-root", "data", "--category", category, "--out", run)
    shell.dualstpm("test", "--run", run, "--data-root", "data")
    shell.dualstpm("ablate", "--run", run)
    shell.dualstpm("register", "--run", run)
    return shell.dualstpm("promote", "--category", category, "--data-root", "data", ok=(0, NOT_PROMOTED))


def retrain(settings: Settings, shell: Shell) -> Path:
    """Step 4: the new model from the new data version; its run directory (in OUT)."""
    if settings.retrain == "flow":
        shell.flow("flows.retrain", settings.category, "--params", "params.yaml", "--out", "retrain", "--no-dvc")
        return settings.out / "retrain" / "runs" / settings.category
    release_by_hand(shell, settings.category, "runs/v2")
    return settings.out / "runs" / "v2"


def predict(shell: Shell, run: Path, out: str, images: list[str]) -> pd.DataFrame:
    """`dualstpm predict` of `images` (paths relative to the repo) with the model in `run`; its table."""
    shell.dualstpm("predict", *images, "--run", os.path.relpath(run, shell.repo), "--out", out)
    return pd.read_csv(shell.repo / out / "predictions.csv")


def flagged_share(table: pd.DataFrame) -> dict[str, Any]:
    """How many rows the model labelled defective (score above its own threshold), of how many."""
    flagged = int((table["label"] == DEFECTIVE).sum())
    return {"n": len(table), "flagged": flagged, "rate": flagged / len(table) if len(table) else None}


# --------------------------------------------------------------------------- the registry


def calibration_of(run: Path, table: pd.DataFrame) -> dict[str, Any]:
    """The threshold a model's predictions used (raw score units) and how many good
    validation images calibrated it (RUN/model/calibration.json)."""
    calibration = json.loads((run / "model" / "calibration.json").read_text())
    return {"threshold": float(table["threshold"].iloc[0]),
            "calibration_images": calibration["validation_split"]["calibration_images"]}


def registry_versions(store: str, category: str) -> dict[str, Any]:
    """The registered model of the demo's category: its versions (run directory, the metric
    tags, the promotion decision's tags) and who holds `champion`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from dualstpm.mlops.names import CHAMPION, model_name

    client = MlflowClient(tracking_uri=store, registry_uri=store)
    name = model_name(Path("data"), category)
    versions = {}
    for version in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        tags = version.tags
        versions[str(version.version)] = {
            "run_dir": tags.get("dualstpm.run_dir"),
            "data_hash": tags.get("dualstpm.data_hash"),
            "metrics": {k.removeprefix("metric."): _number(v) for k, v in tags.items() if k.startswith("metric.")},
            "promoted": tags.get("promotion.promoted") == "True",
            "reason": tags.get("promotion.reason"),
            "metric": tags.get("promotion.metric"),
            "challenger_value": _number(tags.get("promotion.challenger_value")),
            "champion_value": _number(tags.get("promotion.champion_value")),
        }
    try:
        champion = str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code not in NO_ALIAS:
            raise
        champion = None  # the store answered: no version holds the alias
    return {"name": name, "versions": versions, "champion": champion}


def _number(text: str | None) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def version_of(registry: dict[str, Any], run: Path) -> str:
    """The registry version registered from run directory `run`. Raises LookupError when none."""
    for number, version in registry["versions"].items():
        if version["run_dir"] and Path(version["run_dir"]) == run.resolve():
            return number
    raise LookupError(f"no version of {registry['name']} was registered from {run}")


def test_files(run: Path) -> dict[str, str]:
    """The test split a run was evaluated on: the test/ and ground_truth/ entries of its
    data_files.json (relative path -> md5)."""
    files = json.loads((run / "data_files.json").read_text())["files"]
    return {k: v for k, v in files.items() if k.startswith(("test/", "ground_truth/"))}


# --------------------------------------------------------------------------- the demo


def run_demo(settings: Settings) -> dict[str, Any]:
    """Steps 0-6 (the module docstring); the summary (also written as OUT/loop_demo.json, .md)."""
    out, category = settings.out, settings.category
    shell = Shell(out)
    load_at_start = os.getloadavg()[1]
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        seconds[step] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    print(f"== 0. starting data: {category} from {settings.data_root}, in a new git + DVC repository {out}")
    batch, data = set_up(settings, shell)
    lap("0_setup")

    print("== 1. the first model, v1: fit, test, ablate, register, promote")
    v1 = out / "runs" / "v1"
    release_by_hand(shell, category, "runs/v1")
    first = registry_versions(shell.store, category)
    lap("1_first_model")

    print("== 2. the line: a batch of new parts scored by v1")
    names = sorted(batch.parts)
    line = predict(shell, v1, "preds/batch-1", [f"line/batch-1/{n}" for n in names])
    truth = line["path"].map(lambda p: batch.parts[Path(p).name].truth)
    good_rows = line[truth == "good"]
    lap("2_predict")

    print("== 3. the inspector's verdicts (from the ground truth, through the review log), then feedback apply")
    review = review_from_truth(out / "preds" / "batch-1", v1, batch, out)
    print(f"   {review['verdicts']} verdicts written to preds/batch-1/review/verdicts.jsonl: {review['good']} good, "
          f"{review['defective']} defective ({review['with_mask']} with a mask), {review['overruled']} overrule v1")
    feedback_exit = shell.dualstpm("feedback", "apply", "preds/batch-1", "--data-root", "data", "--category", category,
                                   ok=(0, NOT_PROMOTED))
    shell.tool("git", "add", f"data/{category}.dvc")
    shell.tool("git", "commit", "-q", "-m", "feedback from preds/batch-1")
    data["dvc_md5"].append(dvc_md5(out, category))
    data["git_commits"] = shell.tool("git", "log", "--format=%h %s").strip().splitlines()[::-1]
    provenance = [json.loads(line) for line in (out / "data" / category / "feedback.jsonl").read_text().splitlines()]
    lap("3_review_feedback")

    print(f"== 4. retraining on the new data version ({settings.retrain}): v2, and the promotion decision")
    v2 = retrain(settings, shell)
    registry = registry_versions(shell.store, category)
    n1, n2 = version_of(registry, v1), version_of(registry, v2)
    lap("4_retrain")

    print("== 5. false alarms before and after")
    after = predict(shell, v2, "preds/v2/reviewed-good", list(good_rows["path"]))
    overruled = set(good_rows.loc[good_rows["label"] == DEFECTIVE, "path"])
    still = int(after.loc[after["path"].isin(overruled), "label"].eq(DEFECTIVE).sum())
    test_good = [f"data/{category}/test/good"]
    normal = {"v1": predict(shell, v1, "preds/v1/normal", test_good), "v2": predict(shell, v2, "preds/v2/normal", test_good)}
    lap("5_false_alarms")

    champion = registry["champion"]
    watched = "v1" if champion == n1 else "v2"
    print(f"== 6. drift: the test split's good parts as they are and with a lighting change, scored by {watched} "
          f"({'the champion' if champion else 'no version is champion'}), then dualstpm monitor")
    watched_run = v1 if watched == "v1" else v2
    shifted_copy([out / p for p in sorted(normal[watched]["path"])], out / "line" / "shifted",
                 settings.shift_contrast, settings.shift_brightness)
    predict(shell, watched_run, f"preds/{watched}/shifted", ["line/shifted"])
    monitor_exit = shell.dualstpm("monitor", "--run", os.path.relpath(watched_run, out), f"preds/{watched}/normal",
                                  f"preds/{watched}/shifted", "--out", "monitor", ok=(0, NOT_PROMOTED))
    monitor = json.loads((out / "monitor" / "monitor.json").read_text())
    lap("6_monitor")

    summary = {
        "schema": 1,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m studies.loop_demo " + shlex.join(sys.argv[1:]) if sys.argv[1:] else None,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items() if k != "results"},
        "data": data,
        "first_model": {"version": n1, "run": "runs/v1", **_decision(first["versions"][n1]),
                        "champion": first["champion"], **calibration_of(v1, line)},
        "line": {"parts": len(line), "good": len(good_rows), "defective": int(len(line) - len(good_rows)),
                 "false_alarms": len(overruled),
                 "missed": int(((truth == DEFECTIVE) & (line["label"] != DEFECTIVE)).sum())},
        "review": review,
        "feedback": {"exit": feedback_exit, "copied": len(provenance),
                     "to": _count(str(Path(p["path"]).parent) for p in provenance),
                     "dvc_md5_changed": data["dvc_md5"][0] != data["dvc_md5"][-1]},
        "retrain": {"mode": settings.retrain, "version": n2, "run": os.path.relpath(v2, out),
                    **_decision(registry["versions"][n2]), "champion_after": champion, **calibration_of(v2, after),
                    "same_test_split": test_files(v1) == test_files(v2),
                    "data_hash": {"v1": registry["versions"][n1]["data_hash"],
                                  "v2": registry["versions"][n2]["data_hash"]}},
        "false_alarms": {
            "reviewed_good": {"v1": flagged_share(good_rows), "v2": flagged_share(after),
                              "overruled_still_flagged_by_v2": still},
            "test_good": {"v1": flagged_share(normal["v1"]), "v2": flagged_share(normal["v2"])},
        },
        "monitor": {"model": watched, "version": n1 if watched == "v1" else n2, "exit": monitor_exit,
                    "shift": {"contrast": settings.shift_contrast, "brightness": settings.shift_brightness},
                    "bounds": monitor["bounds"],
                    "validation_scores": monitor["validation"]["n"],
                    "promised_false_alarm_rate": monitor["model"]["promised_false_alarm_rate"],
                    "batches": {b["name"]: {"n": b["n_scored"], **{k: b["drift"][k] for k in ("ks_statistic", "ks_pvalue", "drift")},
                                            "alarm_rate": b["alarms"]["alarm_rate"], "alarm_pvalue": b["alarms"]["alarm_pvalue"],
                                            "inputs": b["inputs"], "crossed": b["crossed"]} for b in monitor["batches"]}},
        "commands": shell.ran,
        "seconds": seconds,
        "machine": {"cpus": os.cpu_count(), "load_5min": [round(load_at_start, 1), round(os.getloadavg()[1], 1)]},
    }
    write_summary(summary, out)
    if settings.results is not None:
        write_summary(summary, settings.results)
    return summary


def _decision(version: dict[str, Any]) -> dict[str, Any]:
    keys = ("promoted", "reason", "metric", "challenger_value", "champion_value", "metrics")
    return {k: version[k] for k in keys}


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- the summary


def _pct(share: dict[str, Any]) -> str:
    return "n/a" if share["rate"] is None else f"{share['flagged']}/{share['n']} ({share['rate']:.0%})"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def summary_rows(s: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(step, figure, value) rows of the summary table."""
    d, first, re, fa, mon = s["data"], s["first_model"], s["retrain"], s["false_alarms"], s["monitor"]
    metric = first["metric"] or "image_auroc"
    rows = [
        ("0 data", "train/good kept / held back for the line", f"{d['train_good']} / {d['held_back_good']}"),
        ("0 data", "train/good images with the bytes of another image of the category (kept, never on the line)",
         str(d["duplicated_train_good"])),
        ("0 data", "test split: good / defective (the evaluation set)", f"{d['test_good']} / {d['test_defective']}"),
        ("1 v1", f"test {metric} (decision view)", _num(first["metrics"].get(metric))),
        ("1 v1", "threshold, calibrated on", f"{first['threshold']:.4g}, {first['calibration_images']} good images"),
        ("1 v1", "promotion", f"{'promoted' if first['promoted'] else 'not promoted'}: {first['reason']}"),
        ("2 line", "parts: good (never seen) / defective", f"{s['line']['good']} / {s['line']['defective']}"),
        ("2 line", "v1's false alarms / missed defects", f"{s['line']['false_alarms']} / {s['line']['missed']}"),
        ("3 review", "verdicts (good / defective, with a mask)",
         f"{s['review']['verdicts']} ({s['review']['good']} / {s['review']['defective']}, {s['review']['with_mask']})"),
        ("3 feedback", "parts copied into the data", f"{s['feedback']['copied']}: "
         + ", ".join(f"{n} to {k}" for k, n in s["feedback"]["to"].items())),
        ("3 feedback", "DVC data version (md5 of the category)", " -> ".join(m[:12] for m in d["dvc_md5"])),
        ("4 v2", f"test {metric} (decision view), same test split: {re['same_test_split']}",
         _num(re["metrics"].get(metric))),
        ("4 v2", "threshold, calibrated on", f"{re['threshold']:.4g}, {re['calibration_images']} good images"),
        ("4 v2", "promotion", f"{'promoted' if re['promoted'] else 'not promoted'}: {re['reason']}"),
        ("4 v2", "champion after", f"version {re['champion_after']}" if re["champion_after"] else "none"),
        ("5 false alarms", "reviewed good parts flagged: v1 -> v2",
         f"{_pct(fa['reviewed_good']['v1'])} -> {_pct(fa['reviewed_good']['v2'])}"),
        ("5 false alarms", "of v1's false alarms, still flagged by v2",
         f"{fa['reviewed_good']['overruled_still_flagged_by_v2']} of {s['line']['false_alarms']}"),
        ("5 false alarms", "test split's good parts flagged (seen by neither): v1 -> v2",
         f"{_pct(fa['test_good']['v1'])} -> {_pct(fa['test_good']['v2'])}"),
    ]
    watched = (f"6 monitor ({mon['model']}: {mon['validation_scores']} validation scores, "
               f"promises {mon['promised_false_alarm_rate']:.0%} false alarms)")
    for name, b in mon["batches"].items():
        drift = "drift" if b["drift"] else "no drift"
        alarms = "too many alarms" if b["alarm_pvalue"] is not None and b["alarm_pvalue"] < mon["bounds"]["alarm_p"] \
            else "alarm rate within the bound"
        figures = (f"scores: KS {_num(b['ks_statistic'])} (p {b['ks_pvalue']:.2g}): {drift}; "
                   f"{_inputs(b.get('inputs'))}; alarm rate {b['alarm_rate']:.0%} "
                   f"(p {b['alarm_pvalue']:.2g}): {alarms}; {'ALARM' if b['crossed'] else 'no alarm'}")
        rows.append((watched, f"batch `{name}` ({b['n']} parts)", figures))
    return rows


def _inputs(inputs: dict[str, Any] | None) -> str:
    """The input drift test of one batch in a few words (`dualstpm.monitor.input_drift_test`)."""
    if not inputs or "statistics" not in inputs:
        return "inputs: not tested"
    figures = ", ".join(f"{name} KS {_num(f['ks_statistic'])} (p {f['ks_pvalue']:.2g}, median {f['batch_median']:.3f} vs "
                        f"{f['reference_median']:.3f})" for name, f in inputs["statistics"].items())
    return f"inputs: {figures}: {'input drift' if inputs['drift'] else 'no input drift'}"


def markdown(summary: dict[str, Any]) -> str:
    """The summary table as Markdown, with the command that made it."""
    lines = [f"# The loop demo: {summary['settings']['category']}", ""]
    if summary["command"]:
        lines += ["```bash", summary["command"], "```", ""]
    st, machine = summary["settings"], summary["machine"]
    how = "the Prefect retrain flow" if st["retrain"] == "flow" else "the CLI commands"
    minutes = sum(summary["seconds"].values()) / 60
    setup = (f"{st['image_size']} px, {st['epochs']} epochs, seed {st['seed']}, retraining by {how}; "
             f"{summary['written_at']}; {minutes:.0f} minutes on {machine['cpus']} CPU cores, 5-minute load "
             f"average {machine['load_5min'][0]} at the start and {machine['load_5min'][1]} at the end.")
    lines += [setup, "", "| step | figure | value |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c.replace('|', '/')} |" for a, b, c in summary_rows(summary)]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{RESULTS_NAME}.json").write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    (folder / f"{RESULTS_NAME}.md").write_text(markdown(summary))


def print_summary(summary: dict[str, Any]) -> None:
    rows = summary_rows(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    print("\n== the loop, in figures")
    for a, b, c in rows:
        print(f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}")
    print(f"written: {summary['settings']['out']}/{RESULTS_NAME}.json, .md")


def parse(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m studies.loop_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="a new (or empty) folder: the demo's git + DVC repository")
    p.add_argument("--data-root", type=Path, default=PROJECT_ROOT.parent / "shared" / "data",
                   help="folder holding the category (default: ../shared/data)")
    p.add_argument("--category", default="battery_weld", help="battery_weld (default) or magnetic_tile, ...")
    p.add_argument("--image-size", type=int, default=Settings.image_size)
    p.add_argument("--epochs", type=int, default=Settings.epochs)
    p.add_argument("--holdout-good", type=int, default=Settings.holdout_good,
                   help="train/good images held back: the line's good parts")
    p.add_argument("--line-defects", type=int, default=Settings.line_defects,
                   help="defective test images taken out of test/: the line's defective parts")
    p.add_argument("--max-train", type=int, default=None, help="train on at most this many of the kept train/good images")
    p.add_argument("--seed", type=int, default=Settings.seed)
    p.add_argument("--retrain", choices=("flow", "cli"), default=Settings.retrain,
                   help="step 4 by the Prefect retrain flow (default) or by the CLI commands")
    p.add_argument("--shift-contrast", type=float, default=Settings.shift_contrast)
    p.add_argument("--shift-brightness", type=float, default=Settings.shift_brightness)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a further param override for every command (repeatable)")
    p.add_argument("--results", type=Path, default=None, help="also write loop_demo.json and .md here")
    a = p.parse_args(argv)
    return Settings(out=a.out.resolve(), data_root=a.data_root, category=a.category, image_size=a.image_size,
                    epochs=a.epochs, holdout_good=a.holdout_good, line_defects=a.line_defects, max_train=a.max_train,
                    seed=a.seed, retrain=a.retrain, shift_contrast=a.shift_contrast,
                    shift_brightness=a.shift_brightness, overrides=tuple(a.overrides), results=a.results)


def main(argv: list[str] | None = None) -> int:
    settings = parse(argv)
    source = settings.data_root / settings.category
    if not source.is_dir():
        print(f"loop demo skipped: no category folder {source} (the real datasets sit beside the project, "
              "in ../shared/data; pass --data-root)", file=sys.stderr)
        return 0
    if settings.out.exists() and any(settings.out.iterdir()):
        print(f"error: {settings.out} is not empty: the demo builds a new repository there; name a new folder",
              file=sys.stderr)
        return 2
    try:
        summary = run_demo(settings)
    except (CommandFailed, ValueError, LookupError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
