"""Which model scored a predictions folder, as each review verdict records it: a run
directory (`--run RUN`) or a registered model version (`--model NAME@ALIAS`).

The review page (:mod:`dualstpm.review`) takes the description as a plain dict; it is
built here, on the MLOps side, so the page imports neither MLflow nor the hashing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dualstpm.errors import ConfigError, RunError
from dualstpm.mlops.hashing import model_sha256
from dualstpm.mlops.tracking import STORE_ANSWERED, tracking_errors
from dualstpm.rundir import read_lineage, trained_model_dir


def parse_model_spec(spec: str) -> tuple[str, str | None, str | None]:
    """``NAME@ALIAS`` or ``NAME/VERSION`` (``models:/`` prefix allowed) -> (name, alias, version).
    Raises ConfigError for anything else."""
    text = spec.removeprefix("models:/")
    if "@" in text:
        name, alias = text.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in text:
        name, version = text.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ConfigError(f"--model {spec!r} is neither NAME@ALIAS nor NAME/VERSION: e.g. "
                      "--model dualstpm-mvtec-bottle@champion")


def describe_run(run: Path) -> dict[str, Any]:
    """What `--run RUN` says about the model: its folder, the model files' sha256 (the
    hash the fit logs as ``dualstpm.model_sha256``) and its MLflow run when it has one.
    Raises RunError when RUN is not a trained model."""
    model_dir = trained_model_dir(run)
    lineage = read_lineage(run)
    return {"run": str(Path(run).absolute()), "model_sha256": model_sha256(model_dir),
            "mlflow_run_id": lineage["run_id"] if lineage else None}


def describe_registered(spec: str, client) -> dict[str, Any]:
    """The registered model version `spec` names (:func:`parse_model_spec`), resolved in
    the registry `client` (an ``MlflowClient``) talks to. Raises RunError when the model,
    alias or version does not exist, TrackingError when the registry cannot be reached."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_spec(spec)
    with tracking_errors(client.tracking_uri, f"resolving {spec}"):
        try:
            found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        except MlflowException as exc:
            if exc.error_code not in STORE_ANSWERED:
                raise
            found = None  # the registry answered: no such model, alias or version
    if found is None:
        raise RunError(f"the registry at {client.tracking_uri} has no {spec} (no such model, "
                       f"{'alias' if alias else 'version'}): list them with "
                       "`mlflow models search` or the MLflow UI, or review with --run RUN instead")
    return {"registered_model": name, "alias": alias, "version": str(found.version),
            "mlflow_run_id": found.run_id, "tracking_uri": client.tracking_uri}


def scored_by(run: Path | None, model: str | None, registry: Callable[[], Any]) -> Callable[[], dict[str, Any]]:
    """The description of the model named by exactly one of `run` / `model`, to be made
    later: the cheap checks run now (neither or both named, a malformed NAME@ALIAS, RUN
    not a trained model: ConfigError / RunError), the lookup when the returned function is
    called, so a typo is named before the registry (`registry()`: an ``MlflowClient``) is
    contacted."""
    if (run is None) == (model is None):
        raise ConfigError("name the model that scored the predictions: --run RUN or --model NAME@ALIAS (one of them)")
    if run is not None:
        trained_model_dir(run)
        return lambda: describe_run(run)
    parse_model_spec(model)
    return lambda: describe_registered(model, registry())
