"""The dual student-teacher network: pure torch, no training or I/O logic.

Train mode returns the four feature pyramids the losses need; eval mode returns the six
anomaly maps at input size. Fusion and scoring live in `dualstpm.model.fusion`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dualstpm.model.backbone import FeaturePyramid, build_student, load_teacher
from dualstpm.model.loss import distance_map, distance_map_chunked, pyramid_loss
from dualstpm.model.recon import ReconstructionStudent

PYRAMID_STRIDES = (4, 8, 16)
DEEP_STRIDE = 32


@dataclass
class TeacherFeatures:
    """T1's pyramid (strides 4, 8, 16), T1's stride-32 map (branch B's input) and T2's pyramid."""

    t1_levels: list[Tensor]
    t1_deep: Tensor
    t2_levels: list[Tensor]

    def tensors(self) -> list[Tensor]:
        return [*self.t1_levels, self.t1_deep, *self.t2_levels]

    @classmethod
    def from_tensors(cls, tensors: list[Tensor]) -> TeacherFeatures:
        return cls(list(tensors[:3]), tensors[3], list(tensors[4:]))


@dataclass
class PyramidPairs:
    """Teacher and student pyramids of both branches for one batch."""

    teacher_a: list[Tensor]
    student_a: list[Tensor]
    teacher_b: list[Tensor]
    student_b: list[Tensor]

    def losses(self, scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """(branch A loss, branch B loss), each `scale` * sum over levels of mean (1 - cos)
        (`fit.loss_scale`, see `pyramid_loss`); each only reaches its own student's parameters."""
        return (pyramid_loss(self.teacher_a, self.student_a, scale),
                pyramid_loss(self.teacher_b, self.student_b, scale))

    def maps(self, size: tuple[int, int], chunked: bool = True) -> Tensor:
        """Six distance maps upsampled to `size`: shape (B, 2, 3, H, W).

        `chunked`: a few images at a time (faster in eager mode, same numbers); False gives
        one graph for any batch size (tracing and export)."""
        branches = [level_maps(self.teacher_a, self.student_a, size, chunked),
                    level_maps(self.teacher_b, self.student_b, size, chunked)]
        return torch.stack(branches, dim=1)


def level_maps(teachers: list[Tensor], students: list[Tensor], size: tuple[int, int], chunked: bool = True) -> Tensor:
    """One branch's distance maps (1 - cos) per level, bilinearly upsampled to `size`:
    (B, levels, H, W) float32. `chunked` as in `PyramidPairs.maps`."""
    distance = distance_map_chunked if chunked else distance_map
    levels = [distance(t, s)[:, None] for t, s in zip(teachers, students, strict=True)]
    return torch.cat([F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in levels], dim=1)


def _teacher(name: str, weights: str, strides: tuple[int, ...], pretrained: bool) -> FeaturePyramid:
    """A frozen teacher: with its `weights` (`load_teacher`), or bare for a saved model to fill."""
    if pretrained:
        return load_teacher(name, weights, strides)
    return FeaturePyramid(name, strides).freeze()


class DualStpmModel(nn.Module):
    """Branch A: T1 -> S1 (STPM). Branch B: T1's deepest map -> S2 decoder -> T2's pyramid."""

    def __init__(self, t1: FeaturePyramid, s1: FeaturePyramid, t2: FeaturePyramid, s2: ReconstructionStudent) -> None:
        super().__init__()
        if tuple(t1.strides) != (*PYRAMID_STRIDES, DEEP_STRIDE):
            raise ValueError(f"T1 must expose strides {PYRAMID_STRIDES + (DEEP_STRIDE,)}, got {t1.strides}")
        self.t1, self.s1, self.t2, self.s2 = t1, s1, t2, s2

    @classmethod
    def build(cls, t1: tuple[str, str], t2: tuple[str, str], *, attention: bool, decoder_width: str,
              gate_form: str, pretrained: bool = True) -> DualStpmModel:
        """The four networks from plain arguments (`dualstpm.detector.build_network` reads them
        from `params.model`). `t1`, `t2`: (timm name, weights source: hub | file:<path> |
        package | random, see `load_teacher`). Teachers get their weights when `pretrained`,
        else they are bare architectures whose weights a saved model fills in; students always
        start random. `decoder_width` (quarter | full) and `gate_form` (residual | method): see
        `ReconstructionStudent`."""
        t1_net = _teacher(*t1, (*PYRAMID_STRIDES, DEEP_STRIDE), pretrained)
        t2_net = _teacher(*t2, PYRAMID_STRIDES, pretrained)
        s1 = build_student(t1[0], PYRAMID_STRIDES)
        s2 = ReconstructionStudent(t1_net.channels[-1], t2_net.channels, attention=attention,
                                   width=decoder_width, gate_form=gate_form)
        return cls(t1_net, s1, t2_net, s2)

    def students(self) -> dict[str, nn.Module]:
        return {"stpm": self.s1, "recon": self.s2}

    def teacher_features(self, images: Tensor, t2: bool = True) -> TeacherFeatures:
        """What the frozen teachers say about a batch; never trained through, so no autograd.

        Training has no augmentation, so these are the same every epoch for an image: the
        feature cache (`dualstpm.feature_cache`) computes them once and reuses them.
        `t2` False skips T2 (its pyramid is then empty): what training branch A alone needs.
        """
        with torch.no_grad():
            *t1_levels, t1_deep = self.t1(images)
            return TeacherFeatures(t1_levels, t1_deep, self.t2(images) if t2 else [])

    def pyramids(self, images: Tensor, teachers: TeacherFeatures | None = None) -> PyramidPairs:
        """All four pyramids; `teachers` may come precomputed (cache), else they are computed."""
        teachers = teachers if teachers is not None else self.teacher_features(images)
        s1_levels = self.s1(images)
        s2_levels = self.s2(teachers.t1_deep, teachers.t2_levels)
        return PyramidPairs(teachers.t1_levels, s1_levels, teachers.t2_levels, s2_levels)

    def losses(self, images: Tensor, teachers: TeacherFeatures | None = None,
               branches: tuple[str, ...] = ("stpm", "recon"), scale: float = 1.0) -> dict[str, Tensor]:
        """The training losses of `branches` (`stpm`, `recon`) for a batch (B, 3, H, W): each a
        `pyramid_loss` (scalar, times `scale` = `fit.loss_scale`) reaching only its own student. `teachers` may come from the
        cache; else only the teachers these branches need run (T1, and T2 for `recon`)."""
        teachers = teachers if teachers is not None else self.teacher_features(images, t2="recon" in branches)
        losses = {}
        if "stpm" in branches:
            losses["stpm"] = pyramid_loss(teachers.t1_levels, self.s1(images), scale)
        if "recon" in branches:
            losses["recon"] = pyramid_loss(teachers.t2_levels, self.s2(teachers.t1_deep, teachers.t2_levels), scale)
        return losses

    def forward(self, images: Tensor) -> PyramidPairs | Tensor:
        """Train mode: the pyramids for the losses. Eval mode: six maps (B, 2, 3, H, W)."""
        pairs = self.pyramids(images)
        if self.training:
            return pairs
        return pairs.maps(images.shape[-2:])
