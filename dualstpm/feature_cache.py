"""Teacher features computed once per training image and reused every epoch.

The teachers are frozen and training has no augmentation, so T1's pyramid, T1's deepest
map and T2's pyramid of a training image never change: recomputing them each epoch is
pure waste (two of the four forward passes). They are kept as float16, in RAM when they
fit `fit.cache_ram_gb`, else in a memory-mapped file that is deleted after training.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dualstpm.models.torch_model import DualStpmModel, TeacherFeatures
from dualstpm.progress import progress_bar

CACHE_DTYPE = torch.float16


class TeacherFeatureCache:
    """Per-feature tensors of shape (N, C, H, W) in float16, indexed by training image."""

    def __init__(self, storage: list[Tensor], location: str, spill_dir: Path | None = None) -> None:
        self.storage = storage
        self.location = location
        self._spill_dir = spill_dir

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.storage)

    @classmethod
    def build(
        cls,
        model: DualStpmModel,
        images: Tensor,
        batch_size: int,
        device: torch.device,
        ram_budget_bytes: float,
        spill_parent: Path,
    ) -> TeacherFeatureCache:
        """Run the teachers over `images` once and store what they return."""
        first = model.teacher_features(images[:1].to(device)).tensors()
        shapes = [(len(images), *t.shape[1:]) for t in first]
        total = sum(int(np.prod(s)) for s in shapes) * torch.finfo(CACHE_DTYPE).bits // 8
        if total <= ram_budget_bytes:
            storage = [torch.empty(s, dtype=CACHE_DTYPE) for s in shapes]
            location, spill_dir = "ram", None
        else:
            spill_dir = Path(tempfile.mkdtemp(prefix=".feature-cache-", dir=spill_parent))
            storage = [
                torch.from_numpy(np.lib.format.open_memmap(spill_dir / f"{i}.npy", mode="w+", dtype=np.float16, shape=s))
                for i, s in enumerate(shapes)
            ]
            location = "disk"
        with progress_bar() as progress:
            task = progress.add_task(f"caching teacher features ({total / 2**20:.0f} MiB, {location})", total=len(images))
            for start in range(0, len(images), batch_size):
                features = model.teacher_features(images[start : start + batch_size].to(device)).tensors()
                for store, feature in zip(storage, features, strict=True):
                    store[start : start + len(feature)] = feature.to("cpu", CACHE_DTYPE)
                progress.advance(task, len(features[0]))
        return cls(storage, location, spill_dir)

    def batch(self, indices: Tensor, device: torch.device) -> TeacherFeatures:
        """The cached features of `indices`, as float32 on `device`."""
        return TeacherFeatures.from_tensors([t[indices].to(device, torch.float32) for t in self.storage])

    def close(self) -> None:
        """Drop the arrays and delete a disk spill; the cache is unusable afterwards."""
        self.storage = []
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
