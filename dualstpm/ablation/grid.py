"""The configurations of the fusion-weight ablation, built from `params.ablation`.

Every configuration is a `FusionSpec`, so re-scoring uses the one fusion of
`dualstpm.model.fusion` and the configuration chosen can be handed to the detector as is.
The grid, for each normalisation in `ablation.normalizations`:

- named: `published` (per level add, across levels multiply, all weights 1),
  `branch_A` and `branch_B` alone (STPM's own rule: product over levels),
  `sum_all` (all six added) and `product_all` (all six multiplied);
- levels: each subset of `ablation.level_subsets` with both branches weighted 1,
  in each of `ablation.level_modes`;
- sweep: w_A = 1 - r, w_B = r on every level for r = 0, step, ..., 1, in each of
  `ablation.sweep_modes`.

On a model with a memory bank (`memory.enabled`) the grid ends with its two memory views,
`memory` and `fused_memory` (group ``memory``): they are not fusions of the six maps, so
such a configuration names the view instead (`Candidate`), and `MapViews.stack` scores
either kind.

`published` comes first, so that a tie in the selection score keeps the published fusion.
"""

from __future__ import annotations

from dataclasses import dataclass

from dualstpm.config import AblationParams, FusionMode
from dualstpm.model.fusion import MEMORY_VIEWS, FusionSpec

#: what a configuration scores stored maps with: a fusion of the six maps, or the name of one
#: of the model's views that is not one (a memory view: `MapViews.stack` takes either)
Candidate = FusionSpec | str
MEMORY_GROUP = "memory"
ONES = (1.0, 1.0, 1.0)
ZEROS = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Config:
    """One row of the ablation table."""

    name: str
    group: str  # named | levels | sweep | memory
    spec: Candidate

    @property
    def view(self) -> str | None:
        """The model view this configuration is (a memory view), or None for a fusion."""
        return self.spec if isinstance(self.spec, str) else None

    @property
    def branch_weight(self) -> float:
        """w_B / (w_A + w_B) summed over levels: 0 = branch A only, 1 = branch B only (NaN for a view)."""
        if self.view is not None:
            return float("nan")
        a, b = (sum(row) for row in self.spec.weights)
        return b / (a + b)

    @property
    def levels(self) -> str:
        """The levels with a weight > 0, e.g. "1,2,3" ("" for a view)."""
        if self.view is not None:
            return ""
        return ",".join(str(level + 1) for level in range(3) if any(row[level] > 0 for row in self.spec.weights))

    def row(self) -> dict:
        if self.view is not None:
            return {"name": self.name, "group": self.group, "mode": self.view, "normalize": "", "levels": "",
                    "branch_weight": self.branch_weight, "weights": ""}
        return {
            "name": self.name,
            "group": self.group,
            "mode": self.spec.mode,
            "normalize": self.spec.normalize,
            "levels": self.levels,
            "branch_weight": round(self.branch_weight, 10),
            "weights": str([list(row) for row in self.spec.weights]),
        }


def _named() -> list[tuple[str, str, FusionMode, tuple]]:
    return [
        ("published", "named", "product", (ONES, ONES)),
        ("branch_A", "named", "product", (ONES, ZEROS)),
        ("branch_B", "named", "product", (ZEROS, ONES)),
        ("sum_all", "named", "sum", (ONES, ONES)),
        ("product_all", "named", "product_all", (ONES, ONES)),
    ]


def _levels(params: AblationParams) -> list[tuple[str, str, FusionMode, tuple]]:
    rows = []
    for subset in params.level_subsets:
        row = tuple(1.0 if level + 1 in subset else 0.0 for level in range(3))
        for mode in params.level_modes:
            rows.append((f"levels_{''.join(map(str, sorted(subset)))}_{mode}", "levels", mode, (row, row)))
    return rows


def branch_weights(step: float) -> list[float]:
    """0, step, ..., 1 without float drift (step divides 1, checked by the params)."""
    n = round(1 / step)
    return [k / n for k in range(n + 1)]


def _sweep(params: AblationParams) -> list[tuple[str, str, FusionMode, tuple]]:
    return [
        (f"wB_{r:.3g}_{mode}", "sweep", mode, (tuple([round(1.0 - r, 12)] * 3), tuple([r] * 3)))
        for mode in params.sweep_modes
        for r in branch_weights(params.branch_weight_step)
    ]


def build_grid(params: AblationParams, sigma: float = 0.0, memory: bool = False) -> list[Config]:
    """All configurations in table order; `sigma` (the model's smoothing) is kept fixed.
    `memory`: the model has a memory bank, so its two memory views end the grid."""
    base = _named() + _levels(params) + _sweep(params)
    configs = []
    for normalize in params.normalizations:
        suffix = "" if normalize == "none" else f"+{normalize}"
        for name, group, mode, weights in base:
            configs.append(Config(name + suffix, group, FusionSpec(mode, weights, normalize, sigma)))
    return configs + ([Config(view, MEMORY_GROUP, view) for view in MEMORY_VIEWS] if memory else [])
