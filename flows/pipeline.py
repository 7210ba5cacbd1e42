"""The main job as a Prefect flow: prepare the data, fit and test every category, tabulate.

Run it as a plain script (Prefect starts a temporary local API):
    python -m flows.pipeline --params params.yaml
The stage logic lives in `dualstpm.stages`; this file only orchestrates it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from dualstpm.config import Params, load_params
from dualstpm.stages import fit_and_test, metrics_table, prepare_data


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[10, 60])
def prepare_task(params: Params) -> Path:
    return prepare_data(params)


@task(cache_policy=NO_CACHE)
def fit_and_test_task(params: Params, data_root: Path, category: str, run_dir: Path) -> dict:
    return fit_and_test(params, data_root, category, run_dir)


@flow(name="dualstpm-pipeline")
def pipeline(params_file: str = "params.yaml", overrides: list[str] | None = None, runs: str = "runs/pipeline") -> list[dict]:
    """Fit and test each configured category; returns the AUC table as records."""
    params = load_params(Path(params_file), overrides or [])
    data_root = prepare_task(params)
    results = {}
    for category in params.data.categories:  # one training at a time on one machine
        results[category] = fit_and_test_task(params, data_root, category, Path(runs) / category)
    table = metrics_table(results)
    Path(runs).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(runs) / "auc_table.csv", index=False)
    return table.to_dict(orient="records")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--runs", default="runs/pipeline")
    args = parser.parse_args()
    pipeline(args.params, args.overrides, args.runs)
