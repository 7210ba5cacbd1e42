"""A computation's own randomness: seeded draws that no other thread can disturb.

`torch.manual_seed` seeds one process-wide generator. Two fits in threads (a Prefect flow
maps categories over a thread pool) that seed it and then build their students draw from
the same stream, so each one's initial weights depend on how the threads interleave. Inside
:func:`own_rng` every torch draw that names no generator of its own (``Tensor.uniform_``,
``nn.init.kaiming_uniform_``, ``torch.randn``, ...) is given a private generator seeded with
the block's seed instead. The redirection is a torch function mode, which torch keeps per
thread: other threads, and the global generator, are neither read nor changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Torch callables that draw random numbers and accept `generator=`: tensor methods, factory
# functions and the nn.init initialisers (which pass it on to the tensor methods).
_DRAWS = frozenset({
    "uniform_", "normal_", "bernoulli_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_",
    "rand", "randn", "randint", "randperm", "bernoulli", "multinomial", "normal", "poisson",
    "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
    "sparse_",
})


class _PrivateGenerators(TorchFunctionMode):
    """Hands a generator seeded with `seed` (one per device) to every draw that has none."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = dict(kwargs or {})
        if getattr(func, "__name__", None) in _DRAWS and kwargs.get("generator") is None:
            target = args[0] if args and isinstance(args[0], torch.Tensor) else None
            device = target.device if target is not None else torch.device(kwargs.get("device") or "cpu")
            kwargs["generator"] = self._generator(device)
        return func(*args, **kwargs)


@contextmanager
def own_rng(seed: int) -> Iterator[None]:
    """Within the block, in the calling thread only, torch draws come from generators
    seeded with `seed` (the same numbers `torch.manual_seed(seed)` would give a lone
    thread); the global generator is neither read nor advanced. Python's `random` and
    NumPy's global state are not touched either: code in the fit uses seeded
    `random.Random` / `np.random.default_rng` objects of its own.
    """
    with _PrivateGenerators(seed):
        yield
