"""The feature-matching distance shared by both branches (METHOD.md §2-3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_EPS = 1e-16  # on squared norms: a zero vector gets distance 1 instead of a division by zero
CHUNK_ELEMENTS = 2**20  # feature values per chunk in inference: 4 MB as float32, about an L2/L3 share


def distance_map(teacher: Tensor, student: Tensor) -> Tensor:
    """0.5 * ||t/|t| - s/|s|||^2 per position, i.e. 1 - cosine similarity; shape (B, h, w).

    Always float32, whatever precision the networks ran in. Written as
    <t, s> / (|t| |s|) with the teacher's norm outside autograd (the teacher is never
    trained through) and without materialising normalised copies: three channel dot
    products, and a backward pass of two, about half the time of `F.cosine_similarity`
    on the large stride-4 maps, in training and inference alike.
    """
    with torch.autocast(teacher.device.type, enabled=False):  # autocast would run the dot products in bfloat16
        teacher, student = teacher.float(), student.float()
        with torch.no_grad():
            inv_teacher_norm = torch.rsqrt(torch.linalg.vecdot(teacher, teacher, dim=1).clamp_min(_EPS))
        inv_student_norm = torch.rsqrt(torch.linalg.vecdot(student, student, dim=1).clamp_min(_EPS))
        return 1.0 - torch.linalg.vecdot(teacher, student, dim=1) * inv_teacher_norm * inv_student_norm


def distance_map_chunked(teacher: Tensor, student: Tensor, elements: int = CHUNK_ELEMENTS) -> Tensor:
    """`distance_map` a few images at a time (no autograd): the same numbers, but each
    image's float32 copies stay in the CPU cache instead of streaming through memory,
    which makes these memory-bound passes several times faster on large batches."""
    per_image = teacher[0].numel()
    step = max(1, elements // max(per_image, 1))
    if step >= len(teacher):
        return distance_map(teacher, student)
    return torch.cat([distance_map(teacher[i : i + step], student[i : i + step]) for i in range(0, len(teacher), step)])


def pyramid_loss(teachers: Sequence[Tensor], students: Sequence[Tensor], scale: float = 1.0) -> Tensor:
    """`scale` times the sum over levels of the mean distance (1 - cos) over positions and batch.

    `scale` is `fit.loss_scale`: 1.0 is METHOD.md §2's 0.5 ||t^ - s^||^2; 2.0 is the released
    STPM code's channel *sum* of squared differences of L2-normalised features, 2 (1 - cos)
    (METHOD.md §5): the same minimum, gradients twice as large at the same learning rate.
    A training knob only: the maps stay 1 - cos.
    """
    if not scale > 0:
        raise ValueError(f"the loss scale must be > 0 (fit.loss_scale), got {scale}")
    total = torch.stack([distance_map(t, s).mean() for t, s in zip(teachers, students, strict=True)]).sum()
    return scale * total
