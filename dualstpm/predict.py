"""Scoring new images: a score, a good/defective label, a heat-map overlay, one CSV.

One unreadable file never costs the others: it gets a row with its `error` (and no score
or label), every other image is scored, and the caller decides how to fail afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from dualstpm.data import IMAGE_SUFFIXES, list_images, read_image, resize_image
from dualstpm.detector import Detector
from dualstpm.errors import DataError
from dualstpm.files import atomic_file, write_csv
from dualstpm.overlays import draw_overlay, overlay_scale

PREDICTIONS_FILE = "predictions.csv"
OVERLAY_COLUMN = "overlay"


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, folders searched recursively for images (skipping hidden files and
    hidden folders, as every reader does: `list_images`), in a stable order."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(list_images(path, recursive=True))
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{path} does not exist: pass image files or folders of images")
    if not found:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, paths))} "
                        "(hidden files and folders are skipped): pass image files or folders of images")
    return found


def _unique_name(stem: str, taken: set[str]) -> str:
    name, k = f"{stem}_overlay.png", 1
    while name in taken:
        name, k = f"{stem}_{k}_overlay.png", k + 1
    taken.add(name)
    return name


@dataclass
class ImagePrediction:
    """One image's answer: fused score, label at the threshold, branch scores, fused map at image size."""

    score: float
    label: str
    threshold: float
    stpm_score: float
    recon_score: float
    anomaly_map: np.ndarray

    def row(self) -> dict[str, float | str]:
        """The table columns: everything but the map."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "anomaly_map"}


def score_images(detector: Detector, originals: Sequence[np.ndarray], threshold: float | None = None) -> list[ImagePrediction]:
    """Score decoded images (float HxWx3 in [0, 1], any size): the one scoring path of
    `dualstpm predict` and the MLflow model, so both give the same numbers."""
    threshold = detector.threshold if threshold is None else float(threshold)
    size = detector.params.image_size
    batch_size = detector.params.fit.batch_size
    results = []
    for start in range(0, len(originals), batch_size):
        chunk = originals[start : start + batch_size]
        scored = detector.score(torch.stack([resize_image(o, size) for o in chunk]))
        for i, original in enumerate(chunk):
            fused = scored.maps["fused"][i : i + 1, None]
            full = F.interpolate(fused, size=original.shape[:2], mode="bilinear", align_corners=False)[0, 0]
            score = float(scored.scores["fused"][i])
            results.append(
                ImagePrediction(
                    score=score,
                    label="defective" if score > threshold else "good",
                    threshold=threshold,
                    stpm_score=float(scored.scores["stpm"][i]),
                    recon_score=float(scored.scores["recon"][i]),
                    anomaly_map=full.cpu().numpy(),
                )
            )
    return results


def _listed_overlays(out_dir: Path) -> set[str]:
    """The overlay files a previous `predictions.csv` in `out_dir` lists (empty without one).

    Raises DataError when `out_dir` holds a predictions.csv that is not ours."""
    table_path = out_dir / PREDICTIONS_FILE
    if not table_path.is_file():
        return set()
    try:
        listed = pd.read_csv(table_path, usecols=[OVERLAY_COLUMN])[OVERLAY_COLUMN]
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{table_path} is not a predictions.csv of `dualstpm predict` ({exc}): "
                        "choose another --out folder or remove that file") from None
    return {name for name in listed.dropna().astype(str) if name == Path(name).name}  # files in out_dir only


COLUMNS = ("path", *(f.name for f in fields(ImagePrediction) if f.name != "anomaly_map"), "overlay", "error")


def _read_each(chunk: Sequence[Path], max_pixels: int) -> list[np.ndarray | DataError]:
    """Decode each file on its own: its image, or the DataError that says why it cannot be read."""
    decoded: list[np.ndarray | DataError] = []
    for path in chunk:
        try:
            decoded.append(read_image(path, max_pixels))
        except DataError as exc:
            decoded.append(exc)
    return decoded


def predict(detector: Detector, paths: Sequence[Path], out_dir: Path, threshold: float | None = None,
            max_pixels: int | None = None) -> pd.DataFrame:
    """Score images, write an overlay per image and `predictions.csv` (atomically); return the table.

    Columns: `COLUMNS`, one row per image in input order. A file that cannot be read (not
    an image, truncated, above `max_pixels` pixels; None: the model's
    ``data.max_image_pixels``) gets its message in `error` and empty score, label and
    overlay; every other image is scored. Raises DataError only for paths that do not
    exist or hold no image at all (before anything is scored).

    Reusing `out_dir`: after the new table is written, the overlays the previous
    `predictions.csv` listed and the new one does not are deleted (nothing else in the
    folder is touched), so every overlay beside the table belongs to it.
    """
    images = collect_images(paths)
    max_pixels = detector.params.data.max_image_pixels if max_pixels is None else max_pixels
    threshold = detector.threshold if threshold is None else float(threshold)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _listed_overlays(out_dir)
    scale = overlay_scale(detector, threshold)
    rows, taken = [], set()
    batch_size = detector.params.fit.batch_size
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        decoded = _read_each(chunk, max_pixels)
        readable = [image for image in decoded if not isinstance(image, DataError)]
        results = iter(score_images(detector, readable, threshold))
        for path, image in zip(chunk, decoded, strict=True):
            if isinstance(image, DataError):
                rows.append({"path": str(path), "threshold": threshold, "error": str(image)})
                continue
            result, name = next(results), _unique_name(path.stem, taken)
            picture = draw_overlay(image, result.anomaly_map, scale, result.score, result.label, title=path.name)
            with atomic_file(out_dir / name) as tmp:
                picture.save(tmp)
            rows.append({"path": str(path), **result.row(), OVERLAY_COLUMN: name, "error": ""})
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    write_csv(out_dir / PREDICTIONS_FILE, table)
    for stale in previous - taken:
        (out_dir / stale).unlink(missing_ok=True)
    return table
