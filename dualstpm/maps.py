"""The six raw anomaly maps of a split, computed once and kept on disk.

`dualstpm test` scores every test image (and every validation image) once and stores
the six maps (2 branches x 3 levels) as float16 in `RUN/maps/{test,val}.npz`, and those of
the category's real validation defects (``validation/<defect_type>/``) in
`RUN/maps/val_defects.npz` (absent when it has none; the ablation then pastes synthetic ones). The
metrics of the test are computed from exactly these stored maps, so anything that
re-scores them later (the fusion-weight ablation, through `MapViews.stack` of
`dualstpm.model.inference`) reproduces the test's figures bit for bit without running a network.

float16 halves the disk and memory of float32. Maps are 0.5 * ||t - s||^2 of
L2-normalised features, so they lie in [0, 2], far from float16's range limit; the
rounding (relative 5e-4) moved AUROC/AUPRO by at most 4e-5 on magnetic_tile.

File format (`np.savez`, readable without pickle): `maps` float16 (N, 2, 3, H, W),
`memory` float16 (N, H, W) for a model with a memory bank (absent otherwise), `labels`
int8 (N,), `defect_types` and `paths` strings (N,), `masks` bits packed with
`np.packbits` over (N, H, W) (absent without ground truth), `meta` a JSON string.
In `val_defects.npz`, `meta["with_mask"]` says which defects have a mask (the others'
masks are all False and carry no pixel evidence).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dualstpm.data import Category, decode_images, split_train_val
from dualstpm.detector import Detector
from dualstpm.errors import RunError
from dualstpm.files import atomic_file, json_text
from dualstpm.model.inference import RawMaps
from dualstpm.progress import stage
from dualstpm.real_defects import RealDefects
from dualstpm.rundir import TEST_MAPS, VAL_DEFECT_MAPS, VAL_MAPS
from dualstpm.sizes import to_json

FORMAT_VERSION = 1


def weights_fingerprint(state: Mapping[str, Tensor]) -> str:
    """sha256 over a state dict's names, dtypes, shapes and values: which model made the maps."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def compute_raw_maps(detector: Detector, images: Tensor, batch_size: int,
                     description: str = "computing anomaly maps", with_memory: bool = True) -> RawMaps:
    """(N, 3, H, W) images -> float16 :class:`RawMaps`: six maps (N, 2, 3, H, W) and, for a
    model with a memory bank (unless `with_memory` is False), the memory map (N, H, W); one
    forward pass per batch (a progress stage named `description`, e.g. ``computing anomaly
    maps of test images``). Raises RunError for non-finite maps."""
    has_memory = with_memory and detector.inference.memory is not None
    six = np.empty((len(images), 2, 3, *images.shape[-2:]), dtype=np.float16)
    memory = np.empty((len(images), *images.shape[-2:]), dtype=np.float16) if has_memory else None
    with stage(description, len(images)) as progress:
        for start in range(0, len(images), batch_size):
            raw = detector.raw_maps(images[start : start + batch_size], with_memory=has_memory)
            six[start : start + batch_size] = raw.six.cpu().numpy()
            if memory is not None:
                memory[start : start + batch_size] = raw.memory.cpu().numpy()
            progress.advance(len(raw))
    if not np.isfinite(six).all() or (memory is not None and not np.isfinite(memory).all()):
        raise RunError("the model produced non-finite anomaly maps; the weights are broken: retrain the model")
    return RawMaps(six, memory)


@dataclass(frozen=True)
class MapSet:
    """The six maps of one split with what is needed to score them."""

    maps: np.ndarray  # float16 (N, 2, 3, H, W)
    labels: np.ndarray  # int8 (N,), 1 = defective
    defect_types: np.ndarray  # str (N,), "good" or the defect type
    paths: np.ndarray  # str (N,), the image files
    masks: np.ndarray | None  # bool (N, H, W); None without ground truth
    meta: dict  # split, category, image_size, weights_sha256, format
    memory: np.ndarray | None = None  # float16 (N, H, W): the memory maps of a model with a memory bank

    def __len__(self) -> int:
        return len(self.maps)

    @property
    def raw(self) -> RawMaps:
        """The stored maps as :class:`RawMaps` (what every view, the memory views too, is scored from)."""
        return RawMaps(self.maps, self.memory)

    def save(self, path: Path) -> Path:
        """Write atomically (temp file, then rename): a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {
            "maps": self.maps,
            "labels": self.labels.astype(np.int8),
            "defect_types": np.asarray(self.defect_types, dtype=str),
            "paths": np.asarray(self.paths, dtype=str),
            "meta": np.asarray(json_text({**self.meta, "format": FORMAT_VERSION}, indent=None)),
        }
        if self.masks is not None:
            arrays["masks"] = np.packbits(self.masks.reshape(-1))
        if self.memory is not None:
            arrays["memory"] = self.memory
        with atomic_file(path) as tmp:
            np.savez(tmp, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> MapSet:
        path = Path(path)
        if not path.is_file():
            raise RunError(f"{path} not found: run `dualstpm test --run {path.parent.parent} ...` to store the maps")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("format") != FORMAT_VERSION:
                    raise RunError(f"{path} has maps format {meta.get('format')}, this dualstpm reads "
                                   f"{FORMAT_VERSION}: re-run `dualstpm test` to store them again")
                maps = data["maps"]
                masks = None
                if "masks" in data:
                    count = int(np.prod((len(maps), *maps.shape[-2:])))
                    masks = np.unpackbits(data["masks"], count=count).astype(bool).reshape(len(maps), *maps.shape[-2:])
                memory = data["memory"] if "memory" in data else None
                return cls(maps, data["labels"], data["defect_types"], data["paths"], masks, meta, memory)
        except (OSError, ValueError, KeyError) as exc:
            raise RunError(f"{path} is not a readable maps file ({exc}): re-run `dualstpm test` to write it again") from None


def store_test_and_val_maps(maps_dir: Path, detector: Detector, dataset: Category, test_maps: RawMaps,
                            masks: np.ndarray | None, batch_size: int, max_pixels: int) -> tuple[Path, Path]:
    """Write `test.npz` from the maps the test already computed, and `val.npz` for the
    validation images (the same seeded split as the fit, recomputed: it is deterministic;
    images above `max_pixels` pixels are refused); `val_defects.npz` for the category's real
    validation defects, or none (an earlier one removed) when it has none."""
    params = detector.params
    meta = {
        "category": dataset.name,
        "image_size": to_json(params.image_size),
        **({"frame_size": to_json(params.frame_size)} if params.tiling.enabled else {}),  # the maps' size under tiling
        "weights_sha256": weights_fingerprint(detector.model.state_dict()),
    }
    test = MapSet(
        test_maps.six,
        np.array([s.label for s in dataset.test], dtype=np.int8),
        np.array([s.defect_type for s in dataset.test], dtype=str),
        np.array([str(s.path.resolve()) for s in dataset.test], dtype=str),
        masks,
        {**meta, "split": "test"},
        test_maps.memory,
    )
    _, val_paths = split_train_val(dataset, params.fit.val_fraction, params.seed)
    val_images = decode_images(val_paths, params.frame_size, "decoding validation images",
                               max_pixels)
    val_maps = compute_raw_maps(detector, val_images, batch_size, "computing anomaly maps of validation images")
    val = MapSet(
        val_maps.six,
        np.zeros(len(val_paths), dtype=np.int8),
        np.full(len(val_paths), "good"),
        np.array([str(p.resolve()) for p in val_paths], dtype=str),
        None,
        {**meta, "split": "val"},
        val_maps.memory,
    )
    real_path = Path(maps_dir) / VAL_DEFECT_MAPS
    real = RealDefects.decode(dataset.validation_defects, params.frame_size, max_pixels)
    if real is None:
        real_path.unlink(missing_ok=True)  # maps of defects no longer in the data must not be chosen on
    else:
        real_maps = compute_raw_maps(detector, real.images, batch_size, "computing anomaly maps of real validation defects")
        MapSet(
            real_maps.six,
            np.ones(len(real.samples), dtype=np.int8),
            np.array([s.defect_type for s in real.samples], dtype=str),
            np.array([str(s.path.resolve()) for s in real.samples], dtype=str),
            real.masks,
            {**meta, "split": "val_defects", "with_mask": real.has_mask.tolist()},
            real_maps.memory,
        ).save(real_path)
    return test.save(Path(maps_dir) / TEST_MAPS), val.save(Path(maps_dir) / VAL_MAPS)
