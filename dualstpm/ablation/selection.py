"""Choosing a configuration without peeking: validation images plus synthetic defects.

The selection set is the normal validation images (their maps stored by `dualstpm test`
in `RUN/maps/val.npz`) plus defective copies of them made by `defects.paste_defects`.
The copies need one forward pass of the model; their maps (with the memory maps, on a
model with a memory bank) are kept in `RUN/maps/val_synthetic.npz` and reused while the
model and the synthetic-defect params are unchanged. Nothing here reads the test split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from dualstpm.ablation.defects import paste_defects
from dualstpm.config import AblationParams
from dualstpm.data import decode_images
from dualstpm.detector import Detector
from dualstpm.errors import RunError
from dualstpm.maps import MapSet, compute_raw_maps, weights_fingerprint
from dualstpm.rundir import MAPS_DIR, MODEL_SUBDIR, SYNTHETIC_MAPS, RunDir, read_weights
from dualstpm.sizes import from_json

METRICS = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max")
SELECTION_METRICS = {"mean": ("image_auroc", "pixel_auroc", "aupro"), **{m: (m,) for m in METRICS}}


def check_same_model(run_dir: Path, *sets: MapSet) -> str:
    """The fingerprint of RUN/model's weights; RunError when stored maps came from another model."""
    fingerprint = weights_fingerprint(read_weights(RunDir(run_dir).weights))
    for stored in sets:
        if stored.meta.get("weights_sha256") != fingerprint:
            raise RunError(
                f"the {stored.meta.get('split')} maps in {Path(run_dir) / MAPS_DIR} were computed by another model "
                f"than {Path(run_dir) / MODEL_SUBDIR} (retrained since?): re-run `dualstpm test --run {run_dir} ...`"
            )
    return fingerprint


def _synthetic_meta(val: MapSet, params: AblationParams) -> dict:
    return {
        "memory": val.memory is not None,  # the memory maps too (a model with a memory bank)
        "split": "val_synthetic",
        "category": val.meta["category"],
        "image_size": val.meta["image_size"],
        "frame_size": val.meta.get("frame_size"),
        "weights_sha256": val.meta["weights_sha256"],
        "val_paths": [str(p) for p in val.paths],
        "kinds": list(params.synthetic_kinds),
        "per_image": params.synthetic_per_image,
        "seed": params.synthetic_seed,
    }


def synthetic_maps(run_dir: Path, val: MapSet, params: AblationParams) -> MapSet:
    """Maps of the synthetic defective copies of the validation images (cached)."""
    path = Path(run_dir) / MAPS_DIR / SYNTHETIC_MAPS
    meta = _synthetic_meta(val, params)
    if path.is_file():
        cached = MapSet.load(path)
        if {k: cached.meta.get(k) for k in meta} == json.loads(json.dumps(meta)):
            return cached
    detector = Detector.load(run_dir)
    size = from_json(val.meta.get("frame_size", val.meta["image_size"]))  # the maps' size (frames under tiling)
    images = decode_images([Path(p) for p in val.paths], size, "decoding validation images",
                           detector.params.data.max_image_pixels)
    defective, masks, kinds = paste_defects(images, list(params.synthetic_kinds), params.synthetic_per_image,
                                            params.synthetic_seed)
    sources = np.repeat(np.asarray(val.paths), params.synthetic_per_image)
    maps = compute_raw_maps(detector, defective, detector.params.fit.batch_size,
                            "computing anomaly maps of synthetic defects", with_memory=val.memory is not None)
    synthetic = MapSet(maps.six, np.ones(len(maps), np.int8), np.asarray(kinds), sources, masks, meta, maps.memory)
    synthetic.save(path)
    return synthetic


def subset(stored: MapSet, indices: np.ndarray) -> MapSet:
    """The images `indices` of a map set, in that order (their memory maps too, when stored)."""
    masks = None if stored.masks is None else stored.masks[indices]
    memory = None if stored.memory is None else stored.memory[indices]
    return MapSet(stored.maps[indices], stored.labels[indices], np.asarray(stored.defect_types)[indices],
                  np.asarray(stored.paths)[indices], masks, dict(stored.meta), memory)


def selection_part(val: MapSet, synthetic: MapSet, indices: np.ndarray) -> tuple[MapSet, MapSet]:
    """The validation images `indices` and the defective copies pasted on them (copies follow
    their base image's order: `synthetic_maps` makes `per_image` copies of each in turn)."""
    keep = set(np.asarray(val.paths, dtype=str)[indices])
    copies = np.flatnonzero([str(p) in keep for p in synthetic.paths])
    return subset(val, indices), subset(synthetic, copies)


def source_units(selection: MapSet) -> tuple[np.ndarray, int]:
    """The bootstrap's resampling unit of each image of a `selection_set`: the index of its
    source validation image (a defective copy shares its base image's unit), and the count."""
    paths = np.asarray(selection.paths, dtype=str)
    names, units = np.unique(paths, return_inverse=True)
    return units.astype(np.int64), len(names)


def selection_set(val: MapSet, synthetic: MapSet) -> MapSet:
    """Normal validation images (label 0, empty masks) followed by their defective copies (with
    the memory maps when both sets have them)."""
    shape = val.maps.shape[-2:]  # (H, W) of the maps
    memory = (None if val.memory is None or synthetic.memory is None
              else np.concatenate([val.memory, synthetic.memory]))
    return MapSet(
        np.concatenate([val.maps, synthetic.maps]),
        np.concatenate([np.zeros(len(val), np.int8), np.ones(len(synthetic), np.int8)]),
        np.concatenate([np.asarray(val.defect_types, dtype=str), np.asarray(synthetic.defect_types, dtype=str)]),
        np.concatenate([np.asarray(val.paths, dtype=str), np.asarray(synthetic.paths, dtype=str)]),
        np.concatenate([np.zeros((len(val), *shape), bool), synthetic.masks]),
        {**synthetic.meta, "split": "selection"},
        memory,
    )


def mean_score(table: pd.DataFrame, columns: list[str]) -> pd.Series:
    """Per row, the mean of `columns` over the defined (non-NaN) ones."""
    return table[columns].astype(float).mean(axis=1, skipna=True)


def combined_score(table: pd.DataFrame, metric: str, prefix: str) -> pd.Series:
    """The selection metric from the `prefix`-ed metric columns (mean over the defined ones)."""
    return mean_score(table, [f"{prefix}{m}" for m in SELECTION_METRICS[metric]])


def best_row(score: pd.Series) -> int:
    """Row position of the highest score, NaN ignored; ties go to the earliest row (`published` first)."""
    return int(np.nanargmax(score.to_numpy()))


def choose(table: pd.DataFrame, metric: str) -> int:
    """Row position of the best validation score (:func:`best_row`).

    Reads only the `val_*` columns: the test columns cannot influence the choice.
    """
    score = combined_score(table, metric, "val_")
    if score.isna().all():
        raise RunError(f"no configuration has a validation {metric}: the selection set has no defective image")
    return best_row(score)
