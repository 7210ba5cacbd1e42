"""Promotion to `champion` by evidence, and the rule that decides it.

`promote` moves `champion` only when the challenger beats the champion on the same
evaluation data by a margin, or, for the first champion, when it reaches
`tracking.promotion_floor` (the rule: `decide`, a pure function of the two versions'
`Standing`). Every decision, either way, is written to the challenger's tags (who, when,
values, data hash, reason, and the evidence its caller measured, e.g. the retrain flow's
false alarms on reviewed parts). A champion evaluated on other data than the challenger
stands by its re-score on the challenger's data when one is tagged on it (`RESCORED_TAG`:
`dualstpm.mlops.retraining.rescore_champion`). The alias moves before the decision is tagged, so a crash in
between never leaves a version tagged promoted that is not champion. Promotions of one
model are serialised by the registry lock (`dualstpm.mlops.lock`), so two racing
promotions end as if they had run one after the other: the better model is champion.
"""

from __future__ import annotations

import getpass
import json
import socket
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from dualstpm.config import Params
from dualstpm.errors import ConfigError, RunError
from dualstpm.files import json_text
from dualstpm.mlops.lock import promotion_lock
from dualstpm.mlops.names import (
    CHALLENGER,
    CHAMPION,
    INCOMPLETE,
    PROMOTION_METRICS,
    REGISTRATION_TAG,
    RESCORED_TAG,
    registered_name,
)
from dualstpm.mlops.tracking import MISSING, STORE_ANSWERED, TAG, Store, connect, tracking_errors, unless_missing


@dataclass
class PromotionDecision:
    """What `promote` decided, and why (the same facts are on the challenger's tags)."""

    promoted: bool
    reason: str
    model_name: str
    metric: str
    challenger_version: str
    challenger_value: float | None
    champion_version: str | None  # the champion after the decision
    previous_champion_version: str | None
    champion_value: float | None  # the previous champion's value on the metric
    data_hash: str
    decided_by: str
    decided_at: str
    #: what the caller measured beside the metric (JSON-ready), tagged as `promotion.evidence`; None: nothing
    evidence: dict | None = None

    def facts(self) -> dict[str, object]:
        """What is tagged: every field but the model's name (and `evidence` when there is none)."""
        return {k: v for k, v in asdict(self).items() if k != "model_name" and not (k == "evidence" and v is None)}


@dataclass(frozen=True)
class Standing:
    """What the promotion rule reads of a registered version: its number, its test metrics
    (`metric.<name>` tags: a number, or None where the metric is null for its data) and the
    hash of the evaluation data they were measured on (`dualstpm.data_hash`; None: not tagged).
    `rescored`: the metrics are those of a re-test on `data_hash`, not of its own test."""

    version: str
    metrics: Mapping[str, float | None]
    data_hash: str | None
    rescored: bool = False

    @classmethod
    def of(cls, model_version, metric: str, on_data: str | None = None) -> Standing:
        """The standing of an MLflow `ModelVersion` on `metric`, from its tags as `register`
        wrote them (only the `metric.<metric>` tag is read). With `on_data` (the challenger's
        evaluation data hash), a version tested on other data that carries a re-test on
        `on_data` (the `RESCORED_TAG` + hash tag, JSON) stands by that re-test."""
        own = model_version.tags.get(f"{TAG}data_hash")
        retest = model_version.tags.get(f"{RESCORED_TAG}{on_data}") if on_data and on_data != own else None
        if retest is not None:
            return cls(str(model_version.version), {metric: json.loads(retest).get(metric)}, on_data, rescored=True)
        raw = model_version.tags.get(f"metric.{metric}")
        value = None if raw in (None, "", "null") else float(raw)
        return cls(str(model_version.version), {metric: value}, own)


def decide(challenger: Standing, champion: Standing | None, metric: str, min_delta: float,
           floor: float) -> tuple[bool, str]:
    """The promotion rule: (promote?, why), on plain values; it reads no store.

    A challenger without `metric` is never promoted. Without a champion it becomes the
    first one when `metric` reaches `floor` (>=). Against a champion, only on the same
    evaluation data (equal, non-empty data hashes), and only when it beats the champion's
    `metric` by more than `min_delta` (a tie is not promoted). The champion itself is
    never promoted again. NaN compares false, so a NaN value is never promoted and never
    beaten.
    """
    value = challenger.metrics.get(metric)
    if value is None:
        return False, f"the challenger has no {metric} (null for this data); choose another --metric"
    if champion is None:
        if value >= floor:
            return True, f"first champion: {metric} {value:.4f} >= floor {floor:.4f}"
        return False, f"{metric} {value:.4f} is below the floor {floor:.4f} (tracking.promotion_floor) for a first champion"
    if champion.version == challenger.version:
        return False, f"version {challenger.version} is already the champion"
    ours, theirs = challenger.data_hash, champion.data_hash
    if not ours or ours != theirs:
        return False, (
            f"not comparable: the challenger was evaluated on data {ours or '?'}, the champion "
            f"(version {champion.version}) on {theirs or '?'}; test both on the same data (the retrain flow "
            "re-tests the champion on the challenger's data)"
        )
    best = champion.metrics.get(metric)
    where = f"version {champion.version}" + (f", re-tested on data {ours}" if champion.rescored else "")
    if best is None:
        return False, f"the champion ({where}) has no {metric}; choose another --metric"
    if value > best + min_delta:
        return True, f"{metric} {value:.4f} beats the champion's {best:.4f} ({where}) by more than {min_delta:g}"
    return False, f"{metric} {value:.4f} does not beat the champion's {best:.4f} ({where}) by more than {min_delta:g}"


HISTORY_TAG = "promotion.history"
HISTORY_LENGTH = 20


def _record(client, challenger, decision: PromotionDecision) -> None:
    """Tag the decision on the challenger: `promotion.<fact>` for the latest one (unless it
    is a no-op on the current champion, which must keep the facts of its promotion) and
    every decision in `promotion.history` (JSON, newest last)."""
    name, version = decision.model_name, challenger.version
    history = json.loads(challenger.tags.get(HISTORY_TAG) or "[]")[-(HISTORY_LENGTH - 1) :]
    client.set_model_version_tag(name, version, HISTORY_TAG, json_text([*history, decision.facts()], indent=None))
    if decision.previous_champion_version == str(version):
        return
    for key, value in decision.facts().items():
        text = "" if value is None else json_text(value, indent=None) if isinstance(value, dict) else str(value)
        client.set_model_version_tag(name, version, f"promotion.{key}", text)


def aliased_version(client, name: str, alias: str):
    """The version `alias` of registered model `name` points at, or None (no such model or alias)."""
    return unless_missing(client.get_model_version_by_alias, name, alias,
                           missing=MISSING | {"INVALID_PARAMETER_VALUE"})


def _version(client, name: str, version: str | int, category: str):
    """Version `version` of `name`; RunError naming the versions there are when it does not exist."""
    found = unless_missing(client.get_model_version, name, str(version), missing=STORE_ANSWERED)
    if found is not None:
        return found
    existing = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    if not existing:
        raise RunError(f"there is no registered model {name}, so no version {version}: register one with "
                       f"`dualstpm register --run RUN --category {category}`")
    raise RunError(f"{name} has no version {version}; its versions are {', '.join(map(str, existing))}. "
                   f"Pass one of them to --version, or leave --version out to judge @{CHALLENGER}.")


def promote(category: str, params: Params, metric: str = "image_auroc", min_delta: float = 0.0,
            *, store: Store, version: str | int | None = None, decided_by: str = "dualstpm.mlops.promote.promote",
            data_root: Path | str | None = None, evidence: dict | None = None) -> PromotionDecision:
    """Move `champion` to the challenger (or `version`) only if it beats the champion on the
    same evaluation data by more than `min_delta` on `metric` of the view each version decides
    with (`fused`, or an applied `chosen` fusion: its version tags); the first champion
    must reach `tracking.promotion_floor`. The decision is tagged on the challenger either way,
    with `evidence` (JSON-ready, e.g. `dualstpm.mlops.retraining.promotion_evidence`) when given.
    A champion tested on other data is compared by its re-test on the challenger's data
    (`RESCORED_TAG`), and is not comparable without one.

    The registered model is that of `category` in `data_root`, or without it the one
    `register` made for `category` (`registered_name`). A version whose registration did
    not complete is refused (RunError). The alias moves before the decision is tagged, so
    a crash in between never leaves a version tagged promoted that is not champion."""
    if metric not in PROMOTION_METRICS:
        raise ConfigError(f"--metric {metric!r} is not a promotion metric; choose one of {', '.join(PROMOTION_METRICS)}")
    if min_delta < 0:
        raise ConfigError(f"--min-delta {min_delta} must be >= 0")
    client = connect(store, create=False)
    name = registered_name(client, category, data_root)
    who = f"{decided_by} ({getpass.getuser()}@{socket.gethostname()})"
    with tracking_errors(client.tracking_uri, f"promoting {name}"), promotion_lock(client, name, who):
        if version is None:
            challenger = aliased_version(client, name, CHALLENGER)
            if challenger is None:
                raise RunError(f"{name} has no '{CHALLENGER}' version: register one with `dualstpm register --run RUN --category {category}`")
        else:
            challenger = _version(client, name, version, category)
        if challenger.tags.get(REGISTRATION_TAG) == INCOMPLETE:
            raise RunError(
                f"{name} version {challenger.version} is marked {REGISTRATION_TAG}={INCOMPLETE}: its registration "
                f"was interrupted. Register the run again (`dualstpm register --run "
                f"{challenger.tags.get(f'{TAG}run_dir', 'RUN')}`), which deletes it, then promote"
            )
        champion = aliased_version(client, name, CHAMPION)
        ours = Standing.of(challenger, metric)
        theirs = None if champion is None else Standing.of(champion, metric, on_data=ours.data_hash)
        promoted, reason = decide(ours, theirs, metric, min_delta, params.tracking.promotion_floor)
        previous = None if champion is None else str(champion.version)
        decision = PromotionDecision(
            promoted=promoted,
            reason=reason,
            model_name=name,
            metric=metric,
            challenger_version=str(challenger.version),
            challenger_value=ours.metrics.get(metric),
            champion_version=str(challenger.version) if promoted else previous,
            previous_champion_version=previous,
            champion_value=None if theirs is None else theirs.metrics.get(metric),
            data_hash=challenger.tags.get(f"{TAG}data_hash", ""),
            decided_by=who,
            decided_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            evidence=evidence,
        )
        if promoted:  # the alias first: it is what serving reads, and a crash after it loses only tags
            client.set_registered_model_alias(name, CHAMPION, challenger.version)
        _record(client, challenger, decision)
        if promoted and previous is not None:
            client.set_model_version_tag(name, previous, "promotion.replaced_by", str(challenger.version))
    return decision
