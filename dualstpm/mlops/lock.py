"""The promotion lock: promotions of one registered model run one after the other.

The lock is a registered model in the registry itself, `<name>.promotion-lock`: creating
a registered model is atomic in every MLflow store (a second creation fails), so whoever
creates it holds the lock, across processes and machines, and deleting it releases it. A
holder older than `LOCK_STALE_S` crashed; its lock is taken over by creating
`<lock>.takeover-<its token>`, which again only one contender can do.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from dualstpm.errors import TrackingError
from dualstpm.mlops.tracking import unless_missing

LOCK_SUFFIX = ".promotion-lock"
LOCK_WAIT_S = 120.0
LOCK_STALE_S = 600.0  # a lock older than this was left by a crashed promotion
_JITTER = random.Random()  # the waits' own draws: no global random state is used up


def _try_create(client, model: str, holder: str, token: str, description: str) -> bool:
    """Create the registered model `model` (atomic in every MLflow store): True if we did,
    False if it exists already."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(model, tags={"holder": holder, "token": token}, description=description)
        return True
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return False


def _get(client, model: str):
    """The registered model `model`, or None when it does not exist."""
    return unless_missing(client.get_registered_model, model)


def _takeover(lock: str, token: str) -> str:
    """The registered model whose creation takes over the hold of `token` on `lock`."""
    return f"{lock}.takeover-{token}"


def _token(held) -> str:
    """The token of a lock or takeover model (a lock made before tokens: its creation time)."""
    return held.tags.get("token") or f"created-{held.creation_timestamp}"


def _current_holder(client, lock: str):
    """The registered model that holds `lock` now: the lock itself, or the last takeover of
    it (each takeover is named after the token of the holder it replaced); None when free."""
    held = _get(client, lock)
    while held is not None:
        taken = _get(client, _takeover(lock, _token(held)))
        if taken is None:
            return held
        held = taken
    return None


@contextmanager
def promotion_lock(client, name: str, holder: str) -> Iterator[None]:
    """Mutual exclusion across processes and machines: a registered model `<name>.promotion-lock`
    exists while a promotion of `name` runs (creation fails for everyone else).

    A holder older than LOCK_STALE_S crashed. Taking its lock over is a compare-and-set in
    the store: creating `<lock>.takeover-<its token>`, which only one contender can do; the
    winner holds the lock (the lock model stays) until it deletes the lock. Takeover models
    are never deleted (their names are unique), so a late contender cannot win one twice.
    """
    lock = name + LOCK_SUFFIX
    token = uuid.uuid4().hex
    note = f"held while {holder} promotes {name}; delete {lock} only if no promotion is running"
    deadline = time.monotonic() + LOCK_WAIT_S
    while not _try_create(client, lock, holder, token, note):
        held = _current_holder(client, lock)
        if held is None:
            continue  # released meanwhile: try again at once
        if time.time() - held.creation_timestamp / 1000 > LOCK_STALE_S:
            if _try_create(client, _takeover(lock, _token(held)), holder, token, note):
                break
            continue  # another contender won this takeover: look again
        if time.monotonic() > deadline:
            raise TrackingError(
                f"another promotion of {name} holds the lock {lock} ({held.tags.get('holder', '?')}); "
                f"if none is running, delete the registered model {lock} and try again"
            )
        time.sleep(0.1 + 0.2 * _JITTER.random())
    try:
        yield
    finally:
        _release(client, lock, token)


def _release(client, lock: str, token: str) -> None:
    """Delete `lock` unless our hold was taken over meanwhile (then the taker deletes it)."""
    from mlflow.exceptions import MlflowException

    try:
        if _get(client, _takeover(lock, token)) is None:
            client.delete_registered_model(lock)
    except MlflowException:
        pass  # becomes stale and is taken over after LOCK_STALE_S
