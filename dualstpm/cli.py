"""The `dualstpm` command line: a thin front over the library's stage functions."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dualstpm import __version__
from dualstpm.config import Params, load_params, valid_keys
from dualstpm.errors import NOT_DONE_EXIT, ConfigError, DataError, DualStpmError, RunError
from dualstpm.paths import category_dir, expand_paths
from dualstpm.rundir import CALIBRATION_FILE, REGIONS_FILE, trained_model_dir
from dualstpm.sizes import describe, from_json
from dualstpm.tables import format_metric as _fmt
from dualstpm.tables import console, out, print_auc_table, print_pipeline_summary

app = typer.Typer(
    help="Dual student-teacher feature pyramid matching: learn good parts, flag and locate defects.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = console(stderr=True)

DEFAULT_PARAMS = Path("params.yaml")
ParamsOption = Annotated[
    Optional[Path], typer.Option("--params", help="params file (default: ./params.yaml when present, else built-in defaults)")
]


def set_option(example: str) -> Any:
    """The repeatable `--set` option of a command; its help shows `example`, a setting that
    command applies (tests/test_cli.py checks each against the command's validator)."""
    return Annotated[Optional[list[str]], typer.Option("--set", help=f"override a param, e.g. --set {example} (repeatable)")]


SetOption = set_option("fit.epochs=5")
#: The params sections `dualstpm test` / `predict` read from --set: a trained model keeps its own (`serving_params`).
SERVING_SETTINGS = {"test": ("data.", "tracking."), "predict": ("data.",)}
#: data keys a trained model keeps as its own (in those sections, but never read from --set)
MODEL_DATA_KEYS = ("data.mm_per_px",)


CategoryOption = Annotated[Optional[str], typer.Option("--category", help="default: the category the model was trained on")]
TrainedRunOption = Annotated[Path, typer.Option("--run", help="run directory written by `dualstpm fit`")]
DataRootOption = Annotated[Path, typer.Option("--data-root", help="folder holding the category")]
DeviceOption = Annotated[str, typer.Option("--device", help="where the networks run: auto (the GPU when there is one), cpu or cuda")]


def trained_category(run: Path, category: str | None) -> str:
    """The category asked for, else the one the run's model was trained on (from its
    calibration.json, without loading the model). Raises RunError when RUN is not a trained model."""
    path = trained_model_dir(run) / CALIBRATION_FILE
    if category:
        return category
    try:
        return str(json.loads(path.read_text())["category"])
    except (ValueError, KeyError, TypeError):
        raise RunError(f"{path} is damaged (no category in it): fit the model again, or pass --category") from None


def check_layout(data_root: Path, category: str, *, require_test: bool) -> None:
    """Refuse a category whose folders or files a command would trip over (DataError naming
    the file and the fix, `dualstpm.data.mvtec.load_category`), from file names and image
    headers only: before torch, timm and MLflow load, so in well under a second."""
    category_dir(data_root, category)  # the standard library alone: a wrong path fails fastest
    from dualstpm.data.mvtec import load_category  # numpy and PIL only

    load_category(data_root, category, require_test=require_test)


def _show_version(value: bool) -> None:
    if value:
        print(f"dualstpm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Dual student-teacher feature pyramid matching: learn good parts, flag and locate defects."""


def resolve_params(path: Path | None, overrides: list[str] | None) -> Params:
    """An explicit --params must exist; otherwise ./params.yaml is used when there is one."""
    if path is None and DEFAULT_PARAMS.is_file():
        path = DEFAULT_PARAMS
    return load_params(path, overrides or [])


def serving_params(path: Path | None, overrides: list[str] | None, command: str, honoured: tuple[str, ...]) -> Params:
    """The params of a command that runs a trained model (`test`, `predict`): only the
    sections in `honoured` (e.g. `data.`) are read from them, the model keeps its own
    (RUN/model/params.yaml), so a --set of any other key is refused (ConfigError naming
    it), never silently ignored."""
    for item in overrides or []:
        key = item.split("=", 1)[0].strip()
        if key in MODEL_DATA_KEYS:
            raise ConfigError(
                f"`dualstpm {command}` does not apply --set {item}: the model measures its defect regions with the "
                f"{key} it was fitted with (RUN/model/params.yaml, recorded with its region rule); fit it with "
                f"--set {item} to change it")
        if not key.startswith(honoured):
            why = (" PyTorch inference always runs in float32, the precision the model's thresholds and "
                   "statistics were calibrated in (fit.precision is the training precision); for faster reduced-"
                   "precision scoring, export it (`dualstpm export --precision fp16|int8`) and use --backend."
                   if "precision" in key else "")
            raise ConfigError(
                f"`dualstpm {command}` does not apply --set {item}: a trained model scores with its own params "
                f"(RUN/model/params.yaml), and this command reads only {', '.join(h + '*' for h in honoured)} "
                f"from --set.{why}"
            )
    return resolve_params(path, overrides)


def print_metrics(result: dict) -> None:
    from dualstpm.mlops.stages import TABLE_VIEWS

    views = [v for v in (*TABLE_VIEWS, "chosen") if v in result]
    table = Table(title=f"{result['category']}: test metrics ({result['n_test_images']} images)",
                  caption=f"the model decides with: {result.get('default', 'fused')}")
    table.add_column("model", overflow="fold")
    for column in ("image AUROC", "pixel AUROC", "AUPRO", "image F1-max", "precision", "recall"):
        table.add_column(column, justify="right", no_wrap=True)  # figures whole: the names get the room
    for view in views:
        m = result[view]
        table.add_row(view, *(_fmt(m[k]) for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "precision", "recall")))
    out.print(table)
    calibration = result.get("calibration") or {}
    target, bound = calibration.get("false_alarm_rate"), calibration.get("false_alarm_bound")
    rates = [f"{v} {result[v]['false_alarm_rate']:.1%}" for v in views if result[v].get("false_alarm_rate") is not None]
    if rates and target is not None:
        promise = (f"; with its calibration images the threshold promises {bound:.1%} (why: calibration.notes in metrics.json)"
                   if bound is not None and bound > target else "")
        out.print(f"false alarms on the good test parts: {', '.join(rates)} (calibrated for {target:.1%}{promise})")
    if result.get("regions"):
        out.print(region_summary(result["regions"], result[result["regions"]["view"]]))
    if (low := recall_note(result)) is not None:
        out.print(f"[yellow]note:[/] {escape(low)}")
    if result.get("note"):
        out.print(f"[yellow]note:[/] {result['note']}")


#: below this recall of the decision view at its threshold, `test` says what limits it and the fix
LOW_RECALL = 0.5


def recall_note(result: dict) -> str | None:
    """What `test` adds when the decision view (`result["default"]`) flags fewer than
    LOW_RECALL of the defective test parts at its threshold: the count, and that the
    threshold, set on good calibration images for the false-alarm rate, is what trades
    recall for false alarms. None otherwise, or without defective test parts or a recall."""
    view = result.get(result.get("default", "fused")) or {}
    recall, defective = view.get("recall"), int(result.get("n_defective") or 0)
    if recall is None or defective == 0 or recall >= LOW_RECALL:
        return None
    rate = (result.get("calibration") or {}).get("false_alarm_rate")
    at = f"{rate:.1%} " if rate is not None else ""
    return (f"at its threshold the decision view flags {round(recall * defective)} of the {defective} defective test "
            f"parts (recall {recall:.1%}); the threshold is set on the good calibration images for a {at}false-alarm "
            "rate, so flagging more means accepting more false alarms: fit again with a higher "
            "calibration.false_alarm_rate (e.g. --set calibration.false_alarm_rate=0.05)")


def region_summary(regions: dict, plain: dict) -> str:
    """One line on metrics.json's `regions` beside the plain score's figures of the same view."""
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1%}"

    text = (f"defect regions ({regions['view']} view, pixel threshold {regions['pixel_threshold']:.4g}: "
            f"{pct(regions['pixel_fpr_good_test'])} of good test pixels above it, target {pct(regions['pixel_fpr_target'])}): "
            f"image AUROC of the largest region's area {_fmt(regions['image_auroc'])} (score {_fmt(plain['image_auroc'])})")
    rule = regions.get("at_rule")
    if rule:
        text += (f"; rule {regions['rule']}: false alarms {pct(rule['false_alarm_rate'])}, recall {pct(rule['recall'])} "
                 f"(score threshold: {pct(plain.get('false_alarm_rate'))}, {pct(plain['recall'])})")
    return text


@app.command()
def fit(
    data_root: Annotated[Path, typer.Option("--data-root", help="folder holding <category>/train/good (test/ and "
                                            "ground_truth/ are read by `dualstpm test` only)")],
    category: Annotated[str, typer.Option("--category", help="category folder name")],
    out_dir: Annotated[Path, typer.Option("--out", help="run directory to write")],
    params: ParamsOption = None,
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted fit from its checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="start again in a run directory that has a checkpoint")] = False,
) -> None:
    """Train both branches on the good images (train/good) of one category, logged to MLflow.
    Ctrl-C or SIGTERM stops it saying what is checkpointed and the --resume command (exit 130 / 143)."""
    check_layout(data_root, category, require_test=False)  # training never reads test/
    p = resolve_params(params, overrides)
    from dualstpm.mlops.stages import tracked_fit
    from dualstpm.mlops.tracking import entry_store
    from dualstpm.training import FitInterrupted

    try:
        result = tracked_fit(p, data_root, category, out_dir, store=entry_store(p), resume=resume, overwrite=overwrite)
    except FitInterrupted as stop:  # Ctrl-C: exit 130, SIGTERM (a scheduler stopping the job): exit 143
        err.print(f"{stop.cause}: {stop}", highlight=False, soft_wrap=True)
        if stop.epochs_done:
            err.print(f"continue with: {resume_command()}", highlight=False, soft_wrap=True)
        raise typer.Exit(stop.exit_code) from None
    out.print(f"trained: {result.model_dir}")


def resume_command(argv: list[str] | None = None) -> str:
    """This `dualstpm fit` command line with --resume instead of --overwrite, ready to paste."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
    return shlex.join(["dualstpm", *args, *([] if "--resume" in args else ["--resume"])])


@app.command()
def test(
    run: TrainedRunOption,
    data_root: DataRootOption,
    category: CategoryOption = None,
    params: ParamsOption = None,
    overrides: set_option("tracking.uri=http://localhost:5000") = None,
    device: DeviceOption = "auto",
    new_evaluation: Annotated[bool, typer.Option(
        "--new-evaluation", help="when the data changed since RUN was tested: keep this test beside the first, in "
        "RUN/evaluations/<data hash>/ (an MLflow child run of the model's run), instead of refusing")] = False,
) -> None:
    """Evaluate a trained model on the test split; writes RUN/metrics.json and RUN/plots/, logs to MLflow
    (in the store RUN records, unless MLFLOW_TRACKING_URI or tracking.uri names one)."""
    category = trained_category(run, category)
    check_layout(data_root, category, require_test=True)
    p = serving_params(params, overrides, "test", SERVING_SETTINGS["test"])
    from dualstpm.rundir import METRICS_FILE
    from dualstpm.mlops.stages import tracked_evaluation
    from dualstpm.mlops.tracking import entry_store

    result, folder = tracked_evaluation(p, run, data_root, category, device, store=entry_store(p),
                                        new_evaluation=new_evaluation)
    print_metrics(result)
    out.print(f"written: {folder / METRICS_FILE}")


@app.command()
def predict(
    paths: Annotated[list[Path], typer.Argument(help="image files, folders, or quoted glob patterns ('imgs/*.png')")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for overlays and predictions.csv")],
    run: Annotated[Optional[Path], typer.Option("--run", help="run directory written by `dualstpm fit`")] = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="override the calibrated threshold")] = None,
    backend: Annotated[str, typer.Option("--backend", help="torch | onnxruntime | openvino")] = "torch",
    exported: Annotated[Optional[Path], typer.Option("--exported", help="an export folder (`dualstpm export`) instead of --run")] = None,
    params: ParamsOption = None,
    overrides: set_option("data.max_image_pixels=400000000") = None,
    device: DeviceOption = "auto",
) -> None:
    """Score images (files, folders, or quoted patterns such as 'imgs/*.png'): label, heat-map
    overlay per image and one CSV (unreadable files: a row with their error; the command then
    exits with status 2). `--exported DIR` runs an export folder instead of `--run`."""
    if run is not None:
        trained_model_dir(run)  # wrong paths fail before torch loads
    paths = expand_paths(paths)  # before the params: their validation imports timm
    limit = serving_params(params, overrides, "predict", SERVING_SETTINGS["predict"]).data.max_image_pixels
    from dualstpm.backends import load_scorer
    from dualstpm.predict import EarlierBatch
    from dualstpm.predict import predict as predict_images
    from dualstpm.rundir import PREDICTIONS_FILE

    earlier = EarlierBatch.read(out_dir)  # a folder that is not ours fails before the model loads
    scorer = load_scorer(backend, run, exported, device)
    table = predict_images(scorer, paths, out_dir, threshold, max_pixels=limit)
    counts = table["label"].value_counts().to_dict()
    failed = int((table["error"] != "").sum())
    regions_only = scorer.regions is not None and not scorer.regions.has_rule  # with a rule: the line below names them
    out.print(f"{len(table)} images: {counts.get('defective', 0)} defective, {counts.get('good', 0)} good"
              f"{f', {failed} unreadable' if failed else ''} "
              f"(threshold {table['threshold'].iloc[0]:.5g}): {escape(str(out_dir / PREDICTIONS_FILE))}"
              + (f", regions in {escape(str(out_dir / REGIONS_FILE))}" if regions_only else ""), soft_wrap=True)
    if "verdict" in table.columns:  # a region rule decides the parts
        verdicts = table["verdict"].value_counts().to_dict()
        out.print(f"by the region rule: {verdicts.get('defective', 0)} defective, {verdicts.get('good', 0)} good "
                  f"(column verdict; regions in {out_dir / REGIONS_FILE})")
    if earlier is not None:
        out.print(Text.assemble(("replaced: ", "bold yellow"), earlier.replaced_by(table)), highlight=False, soft_wrap=True)
    if failed:
        raise DataError(f"{failed} of {len(table)} images could not be read and have no prediction: see the "
                        f"`error` column of {out_dir / PREDICTIONS_FILE}; every other image was scored.")


@app.command()
def export(
    run: TrainedRunOption,
    out_dir: Annotated[Path, typer.Option("--out", help="export folder to write (replaced atomically)")],
    fmt: Annotated[str, typer.Option("--format", help="onnx | openvino | torchscript")] = "onnx",
    precision: Annotated[str, typer.Option("--precision", help="fp32 | fp16 | int8")] = "fp32",
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="int8: folder holding the category "
                                                      "(default: the one the model was trained on)")] = None,
) -> None:
    """Export the whole detector (pre-processing to decision) with metadata.json."""
    from dualstpm.export import export_run

    out.print(f"exported: {export_run(run, fmt, precision, out_dir, data_root)}")


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Option("--out", help="data root to write the category into")],
    category: Annotated[str, typer.Option("--category")] = "synth_texture",
    kind: Annotated[str, typer.Option("--kind", help="texture | object")] = "texture",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    image_size: Annotated[int, typer.Option("--image-size")] = 128,
) -> None:
    """Write a deterministic synthetic category (MVTec layout) with scratches, holes and stains."""
    from dualstpm.data import make_synthetic_category

    out.print(f"written: {make_synthetic_category(out_dir, category, kind, seed=seed, image_size=image_size)}")


@app.command()
def download(
    params: ParamsOption = None,
    overrides: set_option("data.root=data/mvtec") = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="default: data.root")] = None,
    categories: Annotated[Optional[str], typer.Option("--categories", help="comma-separated; default: data.categories")] = None,
    source: Annotated[Optional[Path], typer.Option("--source", help="an MVTec archive or extracted folder you already have")] = None,
) -> None:
    """Download MVTec AD (resumable, sha256-checked) and extract the requested categories."""
    from dualstpm.data import prepare_mvtec

    p = resolve_params(params, overrides)
    wanted = categories.split(",") if categories else p.data.categories
    m = p.data.mvtec
    paths = prepare_mvtec(out_dir or Path(p.data.root), wanted, url=m.url, sha256=m.sha256, archive=Path(m.archive), source=source)
    for path in paths:
        out.print(f"ready: {path}")


@app.command()
def prepare(
    params: ParamsOption = None,
    overrides: set_option("data.categories=[synth_texture]") = None,
    stage_out: Annotated[Optional[Path], typer.Option("--out", help="the DVC download stage's output folder, data/<data.source>")] = None,
) -> None:
    """Make data.categories ready: generate (synthetic), download and extract (mvtec) or check (folder)."""
    from dualstpm.mlops.dvc_stage import run_download_stage
    from dualstpm.mlops.stages import prepare_data

    p = resolve_params(params, overrides)
    out.print(f"ready: {prepare_data(p) if stage_out is None else run_download_stage(p, stage_out)}")


@app.command()
def report(
    params: ParamsOption = None,
    overrides: set_option("data.categories=[synth_texture]") = None,
    runs: Annotated[Path, typer.Option("--runs", help="folder holding a run directory per category")] = Path("runs"),
    out_dir: Annotated[Path, typer.Option("--out", help="report folder")] = Path("reports"),
) -> None:
    """One AUC table over data.categories (each RUNS/<category> tested), with curves and overlays."""
    from dualstpm.mlops.report import write_report

    p = resolve_params(params, overrides)
    print_auc_table(write_report({c: runs / c for c in p.data.categories}, out_dir), f"AUC table ({out_dir})")


@app.command()
def ablate(
    run: Annotated[Path, typer.Option("--run", help="run directory, fitted and tested (its maps/ stored)")],
    params: ParamsOption = None,
    overrides: set_option("ablation.branch_weight_step=0.05") = None,
) -> None:
    """Re-score RUN's stored maps under the fusion grid, choose on validation data; writes RUN/ablation/."""
    trained_model_dir(run)  # a wrong run fails before torch and MLflow load
    from dualstpm.ablation import describe_outcome
    from dualstpm.detector import CHOSEN_VIEW
    from dualstpm.rundir import METRICS_FILE
    from dualstpm.mlops.stages import tracked_ablate
    from dualstpm.mlops.tracking import entry_store

    p = resolve_params(params, overrides)
    result = tracked_ablate(p, run, store=entry_store(p))
    summary = result.summary
    table = Table(title=f"{summary['category']}: fusion-weight ablation ({summary['n_configurations']} configurations, "
                        f"{summary['timing']['grid_s']:.1f} s)")
    for column in ("model", "configuration", "image AUROC", "pixel AUROC", "AUPRO", "image F1-max"):
        text = column in ("model", "configuration")  # a long configuration folds, never cut with "…"
        table.add_column(column, justify="left" if text else "right", overflow="fold", no_wrap=not text)
    for key, label in (("stpm_alone", "STPM alone"), ("fused_published", "published"), ("default", "default (params)"),
                       ("candidate", "best on val"), ("fused_chosen", "chosen"),
                       ("oracle", "oracle (test, best mean)")):
        if summary.get(key):
            row = summary[key]
            table.add_row(label, row["config"], *(_fmt(row[m]) for m in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")))
    out.print(table)
    out.print(f"best on validation data: {summary['candidate']['config']}; {summary['margin']['decision']}")
    out.print(f"{describe_outcome(summary)} ({summary['fusion_file']})")
    if summary["decision_view"] == CHOSEN_VIEW:
        out.print(f"{run / METRICS_FILE} was measured before this choice (its `default` is the params' fusion); "
                  f"`dualstpm test --run {run} --data-root DIR` measures the model as it now decides")
    out.print(f"written: {result.out_dir}")


@app.command("ablate-report")
def ablate_report(
    runs: Annotated[list[Path], typer.Argument(help="run directories that `dualstpm ablate` has processed")],
    out_file: Annotated[Path, typer.Option("--out", help="CSV file for the table")] = Path("reports/ablation.csv"),
    metrics_file: Annotated[Optional[Path], typer.Option("--metrics", help="also a nested JSON for `dvc metrics`")] = None,
) -> None:
    """STPM alone vs fused (published) vs fused (validation-chosen) vs oracle, per category and mean."""
    from dualstpm.ablation import ablation_report, report_metrics
    from dualstpm.files import write_csv, write_json

    table = ablation_report(runs)
    write_csv(out_file, table)
    if metrics_file is not None:
        write_json(metrics_file, report_metrics(table))
    print_auc_table(table, f"fusion-weight ablation ({out_file})")


def _project_module(name: str):
    """The Prefect flows live in the project's flows/ folder (beside params.yaml and dvc.yaml), not
    in the installed package: import them from the project root, the current directory."""
    root = Path.cwd()
    if not (root / "flows" / "pipeline.py").is_file():
        raise ConfigError(
            f"no flows/pipeline.py in {root}: run this from the project root (the folder holding params.yaml, "
            "dvc.yaml and flows/)"
        )
    package = sys.modules.get("flows")
    if package is None or Path(package.__path__[0]).resolve() != (root / "flows").resolve():
        # the package from this folder, by its location: sys.path (the whole process's) is left alone
        spec = importlib.util.spec_from_file_location("flows", root / "flows" / "__init__.py",
                                                      submodule_search_locations=[str(root / "flows")])
        package = importlib.util.module_from_spec(spec)
        sys.modules["flows"] = package
        spec.loader.exec_module(package)
    return importlib.import_module(name)


@app.command()
def demo(
    params: Annotated[Path, typer.Option("--params", help="params file")] = DEFAULT_PARAMS,
    overrides: SetOption = None,
    out_dir: Annotated[Path, typer.Option("--out", help="folder for runs/ and reports/")] = Path("out"),
    use_dvc: Annotated[bool, typer.Option("--dvc/--no-dvc", help="data through DVC's download stage (the versioned data)")] = True,
) -> None:
    """The main job: the Prefect pipeline flow (data, fit, test, report, register, promote), then the AUC table."""
    flows = _project_module("flows.pipeline")
    print_pipeline_summary(flows.pipeline(str(params), overrides or [], str(out_dir), use_dvc))


@app.command()
def bench(
    data_root: DataRootOption,
    category: Annotated[str, typer.Option("--category", help="its train/good images are the benchmark images")],
    params: ParamsOption = None,
    overrides: set_option("fit.batch_size=16") = None,
    images: Annotated[int, typer.Option("--images", help="how many train images to time on")] = 64,
    repeats: Annotated[int, typer.Option("--repeats", help="timed repetitions for medians")] = 5,
    out_file: Annotated[Path, typer.Option("--out", help="JSON file for the figures")] = Path("out/benchmark.json"),
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu or cuda (default: fit.device)")] = None,
    backends: Annotated[Optional[list[str]], typer.Option("--backend", help="also time exports on onnxruntime / "
                                                          "openvino (repeatable), beside PyTorch float32")] = None,
    precisions: Annotated[Optional[list[str]], typer.Option("--precision", help="fp32 | fp16 | int8 (repeatable; "
                                                            "default fp32)")] = None,
    train: Annotated[bool, typer.Option("--train/--no-train", help="time training too")] = True,
) -> None:
    """Training and inference speed, the inference floor, backends, peak memory: one run, one table."""
    check_layout(data_root, category, require_test=False)  # only train/good is timed
    from dualstpm.benchmark import benchmark, write_results

    settings = [*(overrides or []), *([f"fit.device={device}"] if device else [])]
    results = benchmark(resolve_params(params, settings), data_root, category, images, repeats,
                        tuple(backends or ()), tuple(precisions or ("fp32",)), train)
    write_results(results, out_file)
    size = describe(from_json(results["setup"]["image_size"]))
    table = Table(title=f"{results['setup']['category']} @ {size}, {results['machine']['device']}")
    table.add_column("figure", overflow="fold")
    table.add_column("value", justify="right")
    rows = [(f"{phase}.{key}", value) for phase in ("train", "inference") for key, value in results.get(phase, {}).items()]
    rows += [(f"{name}.{key}", value) for name, figures in results.get("backends", {}).items() for key, value in figures.items()]
    for key, value in rows:
        if isinstance(value, float):
            table.add_row(key, f"{value:.4g}")
    out.print(table)
    out.print(f"written: {out_file}")


@app.command("bench-frame")
def bench_frame(
    height: Annotated[int, typer.Option("--height", help="test frame height, px")] = 12288,
    width: Annotated[int, typer.Option("--width", help="test frame width, px")] = 16384,
    params: ParamsOption = None,
    overrides: set_option("image_size=512") = None,
    out_file: Annotated[Path, typer.Option("--out", help="JSON file for the figures")] = Path("out/bench_frame.json"),
) -> None:
    """Time and peak memory of predict on one large frame: tiled at its own size, and squashed (docs/frames.md).

    The default 12288 x 16384 frame takes about 5 minutes and 4.5 GB on a 2-core CPU
    (docs/frames.md); try --height 3072 --width 4096 first."""
    from dualstpm.benchmark import write_results
    from dualstpm.frame_benchmark import frame_benchmark

    settings = [f"data.max_image_pixels={max(height * width, 1)}", *(overrides or [])]
    results = frame_benchmark(resolve_params(params, settings), height, width)
    write_results(results, out_file)
    setup = results["setup"]
    table = Table(title=f"{height} x {width} frame (height x width), tiles of {setup['image_size']} px: "
                        f"{setup['tiles']} tiles, overlap {setup['overlap']:g}, CPU")
    for column in ("phase", "seconds", "peak RSS MiB", "above floor MiB", "bytes per frame px"):
        table.add_column(column, justify="right")
    for phase in ("floor", "tiled", "squashed"):
        figures = results[phase]
        table.add_row(phase, f"{figures['seconds']:.1f}", f"{figures['peak_rss_mib']:.0f}",
                      *(f"{figures[key]:.3g}" if key in figures else "" for key in ("above_floor_mib",
                                                                                      "bytes_per_frame_pixel")))
    out.print(table)
    out.print(f"written: {out_file}")


@app.command()
def register(
    run: Annotated[Path, typer.Option("--run", help="run directory, fitted and tested")],
    category: CategoryOption = None,
    params: ParamsOption = None,
    overrides: set_option("tracking.uri=http://localhost:5000") = None,
) -> None:
    """Register the tested model of RUN as a new version (alias `challenger`) in the MLflow registry
    (the store RUN records, unless MLFLOW_TRACKING_URI or tracking.uri names one)."""
    category = trained_category(run, category)  # a wrong run fails before MLflow loads
    from dualstpm.mlops.names import CHALLENGER
    from dualstpm.mlops.register import register_run
    from dualstpm.mlops.tracking import entry_store
    from dualstpm.progress import stage

    with stage(f"registering the model of {run} (logging it to MLflow with its ONNX export)"):
        p = resolve_params(params, overrides)
        version = register_run(run, p, category, store=entry_store(p))
    out.print(f"registered: {version.name} version {version.version} (@{CHALLENGER}) from MLflow run "
              f"{version.run_id}; load it as models:/{version.name}@{CHALLENGER}")


@app.command()
def promote(
    category: Annotated[str, typer.Option("--category", help="category whose challenger to judge")],
    metric: Annotated[str, typer.Option("--metric", help="fused test metric that decides")] = "image_auroc",
    min_delta: Annotated[float, typer.Option("--min-delta", help="margin the challenger must beat the champion by")] = 0.0,
    version: Annotated[Optional[int], typer.Option("--version", help="judge this version instead of @challenger")] = None,
    data_root: Annotated[Optional[Path], typer.Option("--data-root", help="the data the model was tested on (default: the category's only registered model)")] = None,
    params: ParamsOption = None,
    overrides: set_option("tracking.promotion_floor=0.8") = None,
) -> None:
    """Move `champion` to the challenger only if it beats the champion on the same data (reason tagged either way).

    Exit status: 0 promoted, 3 judged and not promoted (a CI job can gate on it), 2 an error (nothing judged)."""
    from dualstpm.mlops.names import CHAMPION
    from dualstpm.mlops.promote import promote as promote_category
    from dualstpm.mlops.tracking import entry_store

    p = resolve_params(params, overrides)
    decision = promote_category(category, p, metric, min_delta, store=entry_store(p), version=version,
                                decided_by="dualstpm promote", data_root=data_root)
    verdict = "[bold green]promoted[/]" if decision.promoted else "[bold yellow]not promoted[/]"
    out.print(f"{decision.model_name} version {decision.challenger_version}: {verdict}: {decision.reason}")
    out.print(f"@{CHAMPION}: version {decision.champion_version or 'none'}")
    if not decision.promoted:
        raise typer.Exit(NOT_DONE_EXIT)


@app.command("params")
def show_params(
    params: ParamsOption = None,
    overrides: SetOption = None,
    keys: Annotated[bool, typer.Option("--keys", help="list the valid keys instead, one per line")] = False,
) -> None:
    """Print the resolved params (after --set) as YAML that --params accepts (`dualstpm params > p.yaml`)."""
    import yaml

    if keys:
        sys.stdout.write("\n".join(valid_keys()) + "\n")
        return
    resolved = resolve_params(params, overrides).to_dict()
    sys.stdout.write(yaml.safe_dump(resolved, sort_keys=False, width=math.inf))  # plain text: no terminal wrapping


@app.command()
def review(
    predictions: Annotated[Path, typer.Argument(metavar="PREDICTIONS_DIR",
                                                help="the folder `dualstpm predict --out` wrote (predictions.csv, overlays)")],
    run: Annotated[Optional[Path], typer.Option("--run", help="run directory of the model that scored them")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="or the registered model that scored them: "
                                                 "NAME@ALIAS or NAME/VERSION (e.g. dualstpm-mvtec-bottle@champion)")] = None,
    host: Annotated[str, typer.Option("--host", help="address to listen on (another than 127.0.0.1 opens the page "
                                      "to the network: it has no login)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="port to listen on (0: any free port)")] = 8765,
    reviewer: Annotated[Optional[str], typer.Option("--reviewer", help="name recorded with each verdict "
                                                    "(default: your login name)")] = None,
    base: Annotated[Optional[Path], typer.Option("--base", help="folder the relative image paths of predictions.csv "
                                                 "start from (default: the current folder, where predict ran)")] = None,
    params: ParamsOption = None,
    overrides: set_option("tracking.uri=http://127.0.0.1:5000") = None,
) -> None:
    """The inspector's review page: mark each scored part good or defective (note, mask), sorted
    by what needs a look first; every verdict goes at once to PREDICTIONS_DIR/review/verdicts.jsonl
    (docs/review.md)."""
    from dualstpm.mlops.scored_by import scored_by
    from dualstpm.review.app import default_reviewer, open_review, serve

    def registry():
        from dualstpm.mlops.tracking import connect, entry_store

        return connect(entry_store(resolve_params(params, overrides)), create=False)  # a wrong folder: no empty store

    describe = scored_by(run, model, registry)  # the cheap checks first: a typo is named at once
    session = open_review(predictions, reviewer or default_reviewer(), describe, base=base)
    serve(session, host, port, say=lambda line: out.print(line, highlight=False, soft_wrap=True))


# --------------------------------------------------------------------------- the loop: feedback and monitoring (docs/loop.md)

feedback_app = typer.Typer(help="Turn reviewed parts into versioned data (docs/loop.md).", no_args_is_help=True)
app.add_typer(feedback_app, name="feedback")


@feedback_app.command("apply")
def feedback_apply(
    predictions: Annotated[list[Path], typer.Argument(metavar="PREDICTIONS_DIR...",
                                                      help="reviewed predictions folders (their review/verdicts.jsonl)")],
    data_root: Annotated[Path, typer.Option("--data-root", help="folder holding the category")],
    category: Annotated[str, typer.Option("--category", help="the category the parts belong to")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be copied; change nothing")] = False,
    dvc: Annotated[bool, typer.Option("--dvc/--no-dvc", help="record the new data version in DVC when the "
                                      "folder is tracked")] = True,
) -> None:
    """Copy the reviewed parts into the category's data (good: train/good or validation/good; defective:
    validation/<defect> with its mask), once each, all or nothing, with provenance; then `dvc add`/`commit`.
    Exits with 3 when some verdicts were not applied (conflicts, missing files: listed), after applying the rest;
    with 2 when dvc failed after the copies were made (they stay; the dvc command to run by hand is named)."""
    from dualstpm.feedback import apply_feedback

    result = apply_feedback(predictions, data_root, category, dry_run=dry_run, dvc=dvc)
    verb = "would copy" if dry_run else "copied"
    for copy in result.copies:
        out.print(f"{verb}: {copy.image} -> {result.category_dir / copy.dest}"
                  f"{f' (mask {copy.mask_dest})' if copy.mask_dest else ''}", highlight=False, soft_wrap=True)
    for line in result.skipped:
        out.print(f"skipped: {line}", highlight=False, soft_wrap=True)
    for line in [*result.conflicts, *result.problems]:
        err.print(Text.assemble(("not applied: ", "bold yellow"), line), highlight=False, soft_wrap=True)
    out.print(f"{len(result.copies)} part(s) {verb}, {len(result.skipped)} already in the data, "
              f"{len(result.conflicts) + len(result.problems)} not applied", highlight=False)
    if result.dvc:
        out.print(f"DVC: {result.dvc}", highlight=False, soft_wrap=True)
    if result.dvc_error:  # after everything else is printed: the copies stay, the data version is not recorded
        raise DataError(result.dvc_error)
    if result.conflicts or result.problems:
        raise typer.Exit(NOT_DONE_EXIT)


@app.command()
def monitor(
    predictions: Annotated[list[Path], typer.Argument(metavar="PREDICTIONS_DIR...",
                                                      help="predictions folders (predictions.csv) to check")],
    run: TrainedRunOption,
    out_dir: Annotated[Path, typer.Option("--out", help="report folder (replaced)")] = Path("monitor"),
    ks_p: Annotated[float, typer.Option("--ks-p", help="drift: KS p-value below this ...")] = 0.01,
    ks_statistic: Annotated[float, typer.Option("--ks-statistic", help="... and KS statistic above this")] = 0.2,
    alarm_p: Annotated[float, typer.Option("--alarm-p", help="too many alarms: one-sided binomial p below this")] = 0.01,
    expected_defect_rate: Annotated[float, typer.Option("--expected-defect-rate",
                                                        help="share of defective parts the line expects")] = 0.0,
    mlflow: Annotated[bool, typer.Option("--mlflow/--no-mlflow", help="log the figures to MLflow")] = True,
    params: ParamsOption = None,
    overrides: set_option("tracking.timeout_s=60") = None,
) -> None:
    """Compare batches' scores with the model's validation scores (KS drift, alarm rate against the
    calibrated target, inspectors' override rate); writes OUT/report.html and monitor.json, logs to MLflow.
    Exits with 3 when a batch drifts or raises too many alarms (docs/loop.md)."""
    trained_model_dir(run)  # a wrong run fails before torch loads
    from dualstpm.mlops.tracking import entry_store
    from dualstpm.mlops.monitoring import run_monitor
    from dualstpm.monitor import Bounds, describe_inputs

    bounds = Bounds(ks_p, ks_statistic, alarm_p, expected_defect_rate)
    store = entry_store(resolve_params(params, overrides)) if mlflow else None
    result, report, run_id = run_monitor(run, predictions, out_dir, bounds, store)
    for batch in result.batches:
        state = "[bold red]ALARM[/]" if batch.crossed else "[green]ok[/]"
        rate, override = batch.alarms["alarm_rate"], batch.review["override_rate"]
        alarms = "n/a" if rate is None else f"{rate:.1%}"
        overridden = "n/a" if override is None else f"{override:.1%} of {batch.review['n_reviewed']} reviewed"
        out.print(f"{batch.name}: {state} n={batch.n_scored}, KS {_fmt(batch.drift['ks_statistic'])} "
                  f"(p {_fmt(batch.drift['ks_pvalue'])}), alarms {alarms} (p {_fmt(batch.alarms['alarm_pvalue'])}), "
                  f"overrides {overridden}; {describe_inputs(batch.inputs)}", soft_wrap=True)
    out.print(f"written: {report / 'report.html'}" + (f"; MLflow run {run_id}" if run_id else ""), highlight=False)
    if result.crossed:
        raise typer.Exit(NOT_DONE_EXIT)


def main() -> None:
    """Console entry point: user errors print one clear message, no traceback."""
    from dualstpm.mlops.tracking import quiet_artifact_progress

    quiet_artifact_progress()
    try:
        app()
    except DualStpmError as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False, soft_wrap=True)  # paths, commands: unbroken
        raise SystemExit(exc.exit_code) from None
