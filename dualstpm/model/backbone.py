"""Feature pyramids of timm CNNs: the teachers, and the students of branch A (METHOD §2–3).

A :class:`FeaturePyramid` takes images in [0, 1] and applies the normalisation the
network was *pretrained* with (timm's ``pretrained_cfg``: ImageNet mean/std for ResNets,
0.5/0.5 for the TF-ported EfficientNet-Lites). Normalising inside the module rather than
in the data pipeline is what lets two teachers with different normalisations (T1, T2)
read the same batch, and keeps a student on exactly its teacher's input statistics.

Levels are chosen by *stride* (4, 8, 16, 32), not by timm's ``out_indices``: strides
are what the method talks about and what the decoder of branch B must match, and they
mean the same across architectures, whereas indices do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from dualstpm.errors import ConfigError, WeightsError
from dualstpm.model.weights import check_state_dict, create_timm_model, pretrained_state_dict, warn_random

__all__ = ["FeaturePyramid", "PyramidSpec", "build_student", "feature_channels", "load_teacher", "pyramid_spec"]


@dataclass(frozen=True)
class PyramidSpec:
    """Which of a timm model's feature levels give the requested strides, and what they hold."""

    name: str
    strides: tuple[int, ...]
    out_indices: tuple[int, ...]
    channels: tuple[int, ...]
    module_names: tuple[str, ...]  # e.g. ("layer1", "layer2", "layer3") for ResNets, for logs and errors


@lru_cache(maxsize=64)
def _pyramid_spec(name: str, strides: tuple[int, ...]) -> PyramidSpec:
    if not strides or any(s <= 0 for s in strides) or list(strides) != sorted(set(strides)):
        raise ConfigError(f"strides for '{name}' must be positive and strictly increasing, got {list(strides)}")
    try:
        info = create_timm_model(name, meta=True, features_only=True).feature_info
    except ConfigError:
        raise
    except Exception as exc:  # e.g. a model timm cannot wrap as features_only
        raise ConfigError(f"timm model '{name}' has no feature pyramid (features_only failed: {exc})") from exc
    reductions = info.reduction()
    # The deepest level wins when two levels share a stride (the later one has seen more context).
    index_of = {r: i for i, r in enumerate(reductions)}
    unavailable = [s for s in strides if s not in index_of]
    if unavailable:
        raise ConfigError(
            f"timm model '{name}' has no feature map at stride(s) {unavailable}; "
            f"available strides: {sorted(index_of)}"
        )
    out_indices = tuple(index_of[s] for s in strides)
    return PyramidSpec(
        name=name,
        strides=strides,
        out_indices=out_indices,
        channels=tuple(info.channels()[i] for i in out_indices),
        module_names=tuple(info.module_name()[i] for i in out_indices),
    )


def pyramid_spec(name: str, strides: Sequence[int]) -> PyramidSpec:
    """The :class:`PyramidSpec` of ``name`` at ``strides``, read from a meta-device model (no weights, no RNG)."""
    return _pyramid_spec(name, tuple(int(s) for s in strides))


def feature_channels(name: str, strides: Sequence[int] = (4, 8, 16)) -> tuple[int, ...]:
    """Channels of ``name``'s feature maps at ``strides``, without building real weights."""
    return pyramid_spec(name, strides).channels


class FeaturePyramid(nn.Module):
    """A timm CNN that returns feature maps at chosen strides from images in [0, 1].

    Attributes mirror timm's ``feature_info``: ``strides``, ``channels`` and
    ``module_names`` hold one entry per returned level, in stride order. The buffers
    ``mean`` and ``std`` (1, 3, 1, 1) are the network's own pretraining normalisation;
    they are not persistent (not in ``state_dict()``) because they follow from ``name``,
    so checkpoints hold only learnt weights.

    A pyramid made with :meth:`freeze` (a teacher) stays in eval mode whatever
    ``train()`` is called with — BatchNorm statistics of a pretrained teacher must
    never move — and computes its features without an autograd graph, since they are
    only ever targets or inputs, never trained through.
    """

    mean: Tensor
    std: Tensor

    def __init__(self, name: str, strides: Sequence[int], state_dict: dict[str, Tensor] | None = None) -> None:
        super().__init__()
        self._frozen = False
        spec = pyramid_spec(name, strides)
        self.name = name
        self.strides = spec.strides
        self.channels = spec.channels
        self.module_names = spec.module_names
        self.body = create_timm_model(name, features_only=True, out_indices=spec.out_indices)
        cfg = getattr(self.body, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", IMAGENET_DEFAULT_MEAN), cfg.get("std", IMAGENET_DEFAULT_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        if state_dict is not None:
            self.load_pretrained(state_dict)

    def load_pretrained(self, state_dict: dict[str, Tensor], source: str = "the given state dict") -> None:
        """Load a *full-classifier* state dict (timm naming) into the feature body.

        First proves the weights fit the full classifier (strict keys and shapes), so a
        wrong architecture fails loudly; then loads non-strictly into the features-only
        body, where the only keys left over may be those timm drops when wrapping it
        (the classifier head, and for ResNets the stages past the deepest stride asked).
        """
        check_state_dict(self.name, state_dict, source)
        result = self.body.load_state_dict(state_dict, strict=False)
        full_keys = create_timm_model(self.name, meta=True).state_dict().keys()
        dropped = set(full_keys) - set(self.body.state_dict())
        stray = sorted(set(result.unexpected_keys) - dropped)
        if result.missing_keys or stray:
            raise WeightsError(
                f"weights from {source} fit timm's '{self.name}' classifier but not its feature pyramid: "
                f"missing {result.missing_keys[:8]}, unexpected {stray[:8]}"
            )

    def freeze(self) -> FeaturePyramid:
        """Make this pyramid a fixed teacher: no gradients, eval mode for good. Returns self."""
        self.requires_grad_(False)
        self._frozen = True
        return self.train(False)

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` was called (then ``train()`` cannot leave eval mode)."""
        return self._frozen

    def train(self, mode: bool = True) -> FeaturePyramid:
        """Switch train/eval, except that a frozen pyramid always stays in eval."""
        return super().train(mode and not self._frozen)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Feature maps, one per stride in stride order, of images (B, 3, H, W) with values in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name} expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._frozen):
            return list(self.body((images - self.mean) / self.std))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, strides={self.strides}, channels={self.channels}, frozen={self._frozen}"


def load_teacher(name: str, weights: str, strides: Sequence[int] = (4, 8, 16)) -> FeaturePyramid:
    """A pretrained, frozen, eval-mode teacher pyramid; weights from ``weights`` (see :mod:`.weights`).

    ``weights="random"`` gives a random teacher (tests only) and warns.
    """
    pyramid_spec(name, strides)  # a bad name or stride fails before any weights are fetched
    state_dict = pretrained_state_dict(name, weights)
    if state_dict is None:
        warn_random(name)
    pyramid = FeaturePyramid(name, strides)
    if state_dict is not None:
        pyramid.load_pretrained(state_dict, source=f"weights={weights}")
    return pyramid.freeze()


def build_student(name: str, strides: Sequence[int] = (4, 8, 16)) -> FeaturePyramid:
    """A trainable student: the teacher's architecture and normalisation, randomly initialised.

    The init draws from the current torch RNG, so callers seed it for reproducibility.
    """
    return FeaturePyramid(name, strides)
