"""Teacher features computed once per training image and reused every epoch.

The teachers are frozen and training has no augmentation, so T1's pyramid, T1's deepest
map and T2's pyramid of a training image never change: recomputing them each epoch is
pure waste (two of the four forward passes). They are kept in RAM when they fit
`fit.cache_ram_gb`, else in a memory-mapped file that is deleted after training.

Storage is 16-bit in the networks' channels_last layout, (N, H, W, C) in memory, so a
training batch is one gather and no transpose: bfloat16 when the teachers run in
bfloat16 (their outputs then fit exactly), else float16 (half of float32, relative
rounding 5e-4).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dualstpm.compute import Compute
from dualstpm.model.torch_model import DualStpmModel, TeacherFeatures
from dualstpm.progress import stage


def cache_dtype(compute: Compute) -> torch.dtype:
    """bfloat16 holds bfloat16 teacher outputs exactly; float16 rounds float32 ones least."""
    return torch.bfloat16 if compute.dtype == torch.bfloat16 else torch.float16


def _memmap(path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A tensor backed by a .npy file (numpy has no bfloat16: stored as its 16 raw bits)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16 if dtype == torch.float16 else np.uint16,
                                      shape=shape)
    return torch.from_numpy(array).view(dtype)


class TeacherFeatureCache:
    """Per-feature tensors of shape (N, C, H, W) in float16, indexed by training image."""

    def __init__(self, storage: list[Tensor], location: str, spill_dir: Path | None = None) -> None:
        self.storage = storage
        self.location = location
        self._spill_dir = spill_dir

    @classmethod
    def build(
        cls,
        model: DualStpmModel,
        images: Tensor,
        batch_size: int,
        compute: Compute,
        ram_budget_bytes: float,
        spill_parent: Path,
    ) -> TeacherFeatureCache:
        """Run the teachers over `images` once (in `compute`'s precision, as training would) and store what they return."""
        first = cls._teachers(model, images[:1], compute)
        dtype = cache_dtype(compute)
        shapes = [(len(images), t.shape[2], t.shape[3], t.shape[1]) for t in first]  # (N, H, W, C)
        total = sum(int(np.prod(s)) for s in shapes) * dtype.itemsize
        if total <= ram_budget_bytes:
            storage = [torch.empty(s, dtype=dtype) for s in shapes]
            location, spill_dir = "ram", None
        else:
            spill_dir = Path(tempfile.mkdtemp(prefix=".feature-cache-", dir=spill_parent))
            storage = [_memmap(spill_dir / f"{i}.npy", s, dtype) for i, s in enumerate(shapes)]
            location = "disk"
        with stage(f"caching teacher features ({total / 2**20:.0f} MiB, {location})", len(images)) as progress:
            for start in range(0, len(images), batch_size):
                features = cls._teachers(model, images[start : start + batch_size], compute)
                for store, feature in zip(storage, features, strict=True):
                    store[start : start + len(feature)] = feature.permute(0, 2, 3, 1).to("cpu", dtype)
                progress.advance(len(features[0]))
        return cls(storage, location, spill_dir)

    @staticmethod
    def _teachers(model: DualStpmModel, images: Tensor, compute: Compute) -> list[Tensor]:
        with compute.autocast():
            return model.teacher_features(compute.images(images)).tensors()

    def batch(self, indices: Tensor, compute: Compute) -> TeacherFeatures:
        """The cached features of `indices` on the device, (B, C, H, W) in channels_last."""
        return TeacherFeatures.from_tensors([compute.features(t[indices].permute(0, 3, 1, 2)) for t in self.storage])

    def close(self) -> None:
        """Drop the arrays and delete a disk spill; the cache is unusable afterwards."""
        self.storage = []
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
