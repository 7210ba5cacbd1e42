"""Retraining as a Prefect flow: the pipeline for one or more categories, then promotion.

    python -m flows.retrain bottle cable          # default: every category of data.categories
    python -m flows.retrain --all                 # also those whose data did not change

Only categories whose data changed since their registered model was tested are retrained
(the others are skipped, with the reason: `dualstpm.mlops.retraining.unchanged_categories`),
e.g. after `dualstpm feedback apply` added reviewed parts. Reviewed defects
(``validation/<defect_type>/``) select the epochs and the ablation's fusion; they are never
trained on. Each retrained category gets a new registry version (alias `challenger`), and
`champion` moves to it only when it beats the champion on the same evaluation data: a
champion tested before the data changed is re-tested on the challenger's data first; the
decision is tagged with that evidence and the share of reviewed false alarms each model
still flags (`dualstpm.mlops.retraining.promotion_evidence`, `dualstpm.mlops.promote.promote`).
`python -m flows.serve` runs this flow on a schedule.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow

from dualstpm.config import load_params
from dualstpm.mlops.tracking import entry_store
from dualstpm.tables import print_pipeline_summary
from flows.pipeline import check_categories, entry_point, run_categories, run_options


@flow(name="dualstpm-retrain")
def retrain(categories: list[str] | None = None, params_file: str | None = "params.yaml",
            overrides: list[str] | None = None, out: str = "out", use_dvc: bool = True,
            all_categories: bool = False) -> dict:
    """Fit, test, report, register and promote those of `categories` (default: all of
    data.categories) whose data changed (all of them with `all_categories`), in the MLflow
    store resolved here once (`entry_store`); the summary's `skipped` says why the others
    were not. `params_file` None: the built-in defaults; a file that does not exist is
    refused (ConfigError)."""
    params = load_params(Path(params_file) if params_file is not None else None, overrides or [])
    chosen = check_categories(params, categories or params.data.categories)
    return run_categories(params, entry_store(params), chosen, Path(out).resolve(), Path.cwd() if use_dvc else None,
                          retraining=True, changed_only=not all_categories)


def main(argv: list[str] | None = None) -> dict:
    parser = run_options(argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__.splitlines()[0]))
    parser.add_argument("categories", nargs="*", help="categories to retrain (default: data.categories)")
    parser.add_argument("--all", dest="all_categories", action="store_true",
                        help="retrain also the categories whose data did not change since their model was tested")
    args = parser.parse_args(argv)
    summary = retrain(args.categories or None, args.params, args.overrides, args.out, args.use_dvc,
                      args.all_categories)
    print_pipeline_summary(summary)
    return summary

if __name__ == "__main__":
    entry_point(main)
