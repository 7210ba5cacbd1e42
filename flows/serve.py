"""Scheduled retraining: serve the `retrain` flow on the cron of params.yaml.

    prefect server start                                  # once, in its own terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.serve                                 # until stopped (Ctrl-C pauses the schedule)

Schedules live on a Prefect server: without PREFECT_API_URL this refuses to start,
since a temporary local API disappears with the process and nothing would ever fire.
Runs of the deployment `dualstpm-retrain/scheduled` execute in this process's working
directory (the project root), one at a time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect.schedules import Cron, Schedule
from prefect.settings import PREFECT_API_URL

from dualstpm.config import PrefectParams, load_params
from dualstpm.errors import ConfigError
from flows.pipeline import entry_point, run_options
from flows.retrain import retrain

DEPLOYMENT = "scheduled"


def retrain_schedule(settings: PrefectParams) -> Schedule:
    """`prefect.retrain_cron` in `prefect.retrain_timezone`, checked by Prefect's own parser."""
    try:
        return Cron(settings.retrain_cron, timezone=settings.retrain_timezone)
    except ValueError as exc:
        raise ConfigError(f"prefect.retrain_cron = {settings.retrain_cron!r} is not a valid cron expression: {exc}") from None


def serve(params_file: str = "params.yaml", overrides: list[str] | None = None, out: str = "out",
          use_dvc: bool = True, name: str = DEPLOYMENT) -> None:
    """Create (or update) the scheduled deployment of `retrain` and run its flow runs until stopped."""
    if not PREFECT_API_URL.value():
        raise ConfigError(
            "scheduled retraining needs a Prefect server: start one (prefect server start) and set "
            "PREFECT_API_URL, e.g. export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    params_path = Path(params_file).resolve()
    params = load_params(params_path, overrides or [])
    retrain.serve(
        name=name,
        schedule=retrain_schedule(params.prefect),
        parameters={"params_file": str(params_path), "overrides": overrides or [], "out": str(Path(out).resolve()),
                    "use_dvc": use_dvc},
        global_limit=1,  # a retraining still running when the next one is due: the next one waits
        tags=["dualstpm"],
        description=f"retrain {', '.join(params.data.categories)} and promote the better models",
    )


def main(argv: list[str] | None = None) -> None:
    parser = run_options(argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0]))
    parser.add_argument("--name", default=DEPLOYMENT, help=f"deployment name (default: {DEPLOYMENT})")
    args = parser.parse_args(argv)
    serve(args.params, args.overrides, args.out, args.use_dvc, args.name)


if __name__ == "__main__":
    entry_point(main)
