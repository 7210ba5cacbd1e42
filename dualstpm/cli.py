"""The `dualstpm` command line: a thin front over the library's stage functions."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dualstpm.config import Params, load_params, valid_keys
from dualstpm.errors import DualStpmError

app = typer.Typer(
    help="Dual student-teacher feature pyramid matching: learn good parts, flag and locate defects.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

DEFAULT_PARAMS = Path("params.yaml")
ParamsOption = Annotated[
    Optional[Path], typer.Option("--params", help="params file (default: ./params.yaml when present, else built-in defaults)")
]
SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", help="override a param, e.g. --set fit.epochs=5 (repeatable)")
]


def resolve_params(path: Path | None, overrides: list[str] | None) -> Params:
    """An explicit --params must exist; otherwise ./params.yaml is used when there is one."""
    if path is None and DEFAULT_PARAMS.is_file():
        path = DEFAULT_PARAMS
    return load_params(path, overrides or [])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def print_metrics(result: dict) -> None:
    table = Table(title=f"{result['category']}: test metrics ({result['n_test_images']} images)")
    table.add_column("model")
    for column in ("image AUROC", "pixel AUROC", "AUPRO", "image F1-max", "precision", "recall"):
        table.add_column(column, justify="right")
    for view in ("stpm", "recon", "fused"):
        m = result[view]
        table.add_row(view, *(_fmt(m[k]) for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "precision", "recall")))
    out.print(table)
    if result.get("note"):
        out.print(f"[yellow]note:[/] {result['note']}")


@app.command()
def fit(
    data_root: Annotated[Path, typer.Option("--data-root", help="folder holding <category>/train, test, ground_truth")],
    category: Annotated[str, typer.Option("--category", help="category folder name")],
    out_dir: Annotated[Path, typer.Option("--out", help="run directory to write")],
    params: ParamsOption = None,
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted fit from its checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="start again in a run directory that has a checkpoint")] = False,
) -> None:
    """Train both branches on the good images of one category."""
    from dualstpm.training import fit as fit_category

    result = fit_category(resolve_params(params, overrides), data_root, category, out_dir, resume=resume, overwrite=overwrite)
    out.print(f"trained: {result.model_dir}")


@app.command()
def test(
    run: Annotated[Path, typer.Option("--run", help="run directory written by `dualstpm fit`")],
    data_root: Annotated[Path, typer.Option("--data-root", help="folder holding the category")],
    category: Annotated[Optional[str], typer.Option("--category", help="default: the category the model was trained on")] = None,
) -> None:
    """Evaluate a trained model on the test split; writes RUN/metrics.json."""
    from dualstpm.detector import Detector
    from dualstpm.evaluation import test_run

    category = category or Detector.load(run).calibration.category
    print_metrics(test_run(run, data_root, category))
    out.print(f"written: {run / 'metrics.json'}")


@app.command()
def predict(
    run: Annotated[Path, typer.Option("--run", help="run directory written by `dualstpm fit`")],
    paths: Annotated[list[Path], typer.Argument(help="image files or folders")],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for overlays and predictions.csv")],
    threshold: Annotated[Optional[float], typer.Option("--threshold", help="override the calibrated threshold")] = None,
) -> None:
    """Score images: label, heat-map overlay per image and one CSV."""
    from dualstpm.detector import Detector
    from dualstpm.predict import PREDICTIONS_FILE
    from dualstpm.predict import predict as predict_images

    table = predict_images(Detector.load(run), paths, out_dir, threshold)
    counts = table["label"].value_counts().to_dict()
    out.print(f"{len(table)} images: {counts.get('defective', 0)} defective, {counts.get('good', 0)} good "
              f"(threshold {table['threshold'].iloc[0]:.5g}); {out_dir / PREDICTIONS_FILE}")


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
    overrides: SetOption = None,
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
def demo(
    params: ParamsOption = None,
    overrides: SetOption = None,
    runs: Annotated[Path, typer.Option("--runs", help="folder for the run directories")] = Path("runs/demo"),
) -> None:
    """The main job on the configured data: prepare, fit and test every category, print the table."""
    from dualstpm.stages import fit_and_test, metrics_table, prepare_data

    p = resolve_params(params, overrides)
    root = prepare_data(p)
    results = {c: fit_and_test(p, root, c, runs / c) for c in p.data.categories}
    for result in results.values():
        print_metrics(result)
    table = metrics_table(results)
    runs.mkdir(parents=True, exist_ok=True)
    table.to_csv(runs / "auc_table.csv", index=False)
    out.print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    out.print(f"written: {runs / 'auc_table.csv'}")


@app.command("params")
def show_params(params: ParamsOption = None, overrides: SetOption = None) -> None:
    """Print the resolved params (after --set) and the valid keys."""
    import yaml

    out.print(yaml.safe_dump(resolve_params(params, overrides).to_dict(), sort_keys=False))
    out.print("valid keys: " + ", ".join(valid_keys()))


def main() -> None:
    """Console entry point: user errors print one clear message, no traceback."""
    try:
        app()
    except DualStpmError as exc:
        err.print(Text.assemble(("error: ", "bold red"), str(exc)), highlight=False)
        raise SystemExit(2) from None
