"""Scoring new images: a score, a good/defective label, a heat-map overlay, one CSV."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import matplotlib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from dualstpm.data import IMAGE_SUFFIXES, read_image, resize_image
from dualstpm.errors import DataError
from dualstpm.models.inference import InferenceOutput

PREDICTIONS_FILE = "predictions.csv"
OVERLAY_ALPHA = 0.6


class Scorer(Protocol):
    """What scores images: a `Detector` (PyTorch) or a loaded export (`dualstpm.backends`)."""

    image_size: int  # side of the square input, px
    batch_size: int
    threshold: float  # stored decision threshold, raw score units

    def infer(self, images: torch.Tensor) -> InferenceOutput:
        """(N, 3, S, S) float images in [0, 1] -> the inference module's outputs."""


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, folders searched recursively for images, in a stable order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path} does not exist: pass image files or folders of images")
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, paths))}")
    return found


def overlay(image: np.ndarray, anomaly_map: np.ndarray, threshold: float) -> Image.Image:
    """Blend a jet heat map over the image; opacity grows with the map up to the threshold.

    The colour scale is fixed by the threshold (0 -> transparent blue, threshold and above
    -> opaque red), so overlays of different images can be compared by eye.
    """
    low = min(0.0, float(anomaly_map.min()))
    level = np.clip((anomaly_map - low) / max(threshold - low, 1e-12), 0.0, 1.0)
    colours = matplotlib.colormaps["jet"](level)[..., :3]
    alpha = OVERLAY_ALPHA * level[..., None]
    blended = (1 - alpha) * image + alpha * colours
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def _unique_name(stem: str, taken: set[str]) -> str:
    name, k = f"{stem}_overlay.png", 1
    while name in taken:
        name, k = f"{stem}_{k}_overlay.png", k + 1
    taken.add(name)
    return name


@dataclass
class ImagePrediction:
    """One image's answer: fused score, its normalised value (0.5 = the stored threshold,
    see `dualstpm.models.anomaly_map`), label at the threshold, branch scores, fused map at image size."""

    score: float
    normalized_score: float
    label: str
    threshold: float
    stpm_score: float
    recon_score: float
    anomaly_map: np.ndarray

    def row(self) -> dict[str, float | str]:
        """The table columns: everything but the map."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "anomaly_map"}


def score_images(detector: Scorer, originals: Sequence[np.ndarray], threshold: float | None = None) -> list[ImagePrediction]:
    """Score decoded images (float HxWx3 in [0, 1], any size): the one scoring path of
    `dualstpm predict` and the MLflow model, whatever the backend (a `Detector` or an
    export, `dualstpm.backends`), so all give the same numbers. A `threshold` override
    changes the label only; the normalised score stays relative to the stored threshold."""
    threshold = detector.threshold if threshold is None else float(threshold)
    results = []
    for start in range(0, len(originals), detector.batch_size):
        chunk = originals[start : start + detector.batch_size]
        out = detector.infer(torch.stack([resize_image(o, detector.image_size) for o in chunk]))
        for i, original in enumerate(chunk):
            fused = out.anomaly_map[i : i + 1, None].float()
            full = F.interpolate(fused, size=original.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            score = float(out.score[i])
            results.append(
                ImagePrediction(
                    score=score,
                    normalized_score=float(out.normalized_score[i]),
                    label="defective" if score > threshold else "good",
                    threshold=threshold,
                    stpm_score=float(out.stpm_score[i]),
                    recon_score=float(out.recon_score[i]),
                    anomaly_map=full.cpu().numpy(),
                )
            )
    return results


def predict(detector: Scorer, paths: Sequence[Path], out_dir: Path, threshold: float | None = None) -> pd.DataFrame:
    """Score images, write an overlay per image and `predictions.csv`; return the table."""
    images = collect_images(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, taken = [], set()
    batch_size = detector.batch_size
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        originals = [read_image(p) for p in chunk]
        for path, original, result in zip(chunk, originals, score_images(detector, originals, threshold), strict=True):
            name = _unique_name(path.stem, taken)
            overlay(original, result.anomaly_map, result.threshold).save(out_dir / name)
            rows.append({"path": str(path), **result.row(), "overlay": name})
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / PREDICTIONS_FILE, index=False)
    return table
