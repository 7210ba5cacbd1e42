"""The feature-matching distance shared by both branches (METHOD.md §2-3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def distance_map(teacher: Tensor, student: Tensor) -> Tensor:
    """0.5 * ||t/|t| - s/|s|||^2 per position, i.e. 1 - cosine similarity; shape (B, h, w).

    Computed as 1 - cos because it is the same number with one reduction less.
    """
    return 1.0 - F.cosine_similarity(teacher, student, dim=1, eps=1e-8)


def pyramid_loss(teachers: Sequence[Tensor], students: Sequence[Tensor]) -> Tensor:
    """Sum over levels of the mean distance over positions and batch."""
    return torch.stack([distance_map(t, s).mean() for t, s in zip(teachers, students, strict=True)]).sum()
