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
from rich.markup import escape

from dualstpm.config import DEFAULT_MAX_IMAGE_PIXELS
from dualstpm.data import IMAGE_SUFFIXES, list_images, resize_image, resize_map
from dualstpm.data.images import read_frame
from dualstpm.data.input_stats import INPUT_STATISTICS, image_statistics
from dualstpm.errors import DataError
from dualstpm.files import atomic_file, json_text, write_csv, write_text
from dualstpm.model.inference import Scorer, scale_images, score_frames
from dualstpm.model.regions import RegionMap, RegionSpec
from dualstpm.monitor import write_batch_summary
from dualstpm.overlays import RegionsShown, decision_label, draw_overlay, overlay_scale
from dualstpm.progress import say, stage
from dualstpm.rundir import LOG_FILE, OVERLAY_COLUMN, PREDICTIONS_FILE, REGIONS_FILE, review_dir
from dualstpm.sizes import aspect_change, hw, stretch_note


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
    """One image's answer: the score of the view the model decides with (`fused`, or what
    `fusion.view` / an applied ablation names), its normalised value (0.5 = the stored
    threshold, see `dualstpm.model.calibration`), label at the threshold, each branch's
    score, the discriminative stage's (NaN when the model has none) and the decision
    view's anomaly map at the image's size; with a pixel threshold, its defect regions
    (`dualstpm.model.regions`, None without), and with a region rule its `verdict`
    (`defective` / `good`; None without a rule: `label` decides)."""

    score: float
    normalized_score: float
    label: str
    threshold: float
    stpm_score: float
    recon_score: float
    disc_score: float
    anomaly_map: np.ndarray
    regions: RegionMap | None = None
    verdict: str | None = None

    def row(self) -> dict[str, float | str]:
        """The table columns (`COLUMNS`): everything but the map and the regions; with a region
        rule also `n_regions` (regions found) and `verdict` (`RULE_COLUMNS`)."""
        row = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_COLUMNS}
        if self.verdict is not None:
            row |= {"n_regions": len(self.regions.regions), "verdict": self.verdict}
        return row


_NOT_COLUMNS = ("anomaly_map", "regions", "verdict")
#: the columns a region rule adds to the predictions table (after `disc_score`)
RULE_COLUMNS = ("n_regions", "verdict")


#: frames of more tiles than this get a progress bar of their own in `predict`
TILE_PROGRESS_MIN = 64


def score_images(detector: Scorer, originals: Sequence[np.ndarray], threshold: float | None = None) -> list[ImagePrediction]:
    """Score decoded images (any size: `read_image`'s float HxWx3 in [0, 1], or `read_frame`'s
    8-bit pixels): the one scoring path of
    `dualstpm predict` and the MLflow model, whatever the backend (a `Detector` or an
    export, `dualstpm.backends`), so all give the same numbers. A `threshold` override
    changes the label only; the normalised score stays relative to the stored threshold."""
    threshold = detector.threshold if threshold is None else float(threshold)
    spec = detector.regions
    results = []
    for start in range(0, len(originals), detector.batch_size):
        chunk = originals[start : start + detector.batch_size]
        # resized to the input size, or under tiling to the frame size and scored tile by tile
        frames = [resize_image(o, detector.frame_size) for o in chunk]
        # one frame: a view, no copy (8-bit pixels stay uint8: scored a batch of tiles at a time)
        frames = frames[0][None] if len(frames) == 1 else torch.stack([scale_images(f) for f in frames])
        tiles = 0 if detector.tiling is None else detector.tiling.grid(hw(detector.frame_size)).count * len(chunk)
        if tiles > TILE_PROGRESS_MIN:  # a frame of many tiles gets its own bar
            with stage("scoring tiles", tiles, "tiles") as progress:
                out = score_frames(detector, frames, progress.advance)
        else:
            out = score_frames(detector, frames)
        for i, original in enumerate(chunk):
            score = float(out.score[i])
            # regions from the map at the model's resolution, in the original image's coordinates
            regions = None if spec is None else spec.find(out.anomaly_map[i].float().cpu().numpy(), original.shape[:2])
            results.append(
                ImagePrediction(
                    score=score,
                    normalized_score=float(out.normalized_score[i]),
                    label=decision_label(score, threshold),
                    threshold=threshold,
                    stpm_score=float(out.stpm_score[i]),
                    recon_score=float(out.recon_score[i]),
                    disc_score=float(out.disc_score[i]),
                    anomaly_map=resize_map(out.anomaly_map[i], original.shape[:2]),
                    regions=regions,
                    verdict=None if regions is None else spec.verdict(regions.regions),
                )
            )
    return results


def region_records(regions: RegionMap, spec: RegionSpec) -> list[dict]:
    """An image's regions as records (docs/regions.md): `Region.to_json`'s keys, then `defect`,
    whether the region alone meets the rule (None without one)."""
    return [{**region.to_json(), "defect": spec.is_defect(region)} for region in regions.regions]


def region_lines(image: str, regions: RegionMap, spec: RegionSpec) -> list[str]:
    """One `regions.jsonl` line per region of an image: `image` (the path as predictions.csv
    gives it), then `region_records`'s keys; strict JSON (no NaN)."""
    return [json_text({"image": image, **record}, indent=None) for record in region_records(regions, spec)]


@dataclass(frozen=True)
class EarlierBatch:
    """What an earlier `dualstpm predict` left in an --out folder: the number of rows
    (images) of its predictions.csv and the overlay files it lists. A folder whose batch
    was reviewed (``review/verdicts.jsonl``) is never reused: the verdicts belong to that batch."""

    out_dir: Path
    rows: int
    overlays: frozenset[str]

    @classmethod
    def read(cls, out_dir: Path) -> EarlierBatch | None:
        """The batch `out_dir/predictions.csv` describes; None without one. Raises DataError
        when `out_dir` holds a predictions.csv that is not ours, or a review log (a new
        batch there would make the review page, `monitor` and `feedback apply` take that
        batch's verdicts for this one's)."""
        log = review_dir(out_dir) / LOG_FILE
        if log.exists():
            raise DataError(f"{Path(out_dir)} holds the review log {log} of the batch predicted there: a new batch "
                            "in this folder would inherit its verdicts. Choose a new --out folder (the verdicts are "
                            "kept where they are)")
        table_path = Path(out_dir) / PREDICTIONS_FILE
        if not table_path.is_file():
            return None
        try:
            listed = pd.read_csv(table_path, usecols=[OVERLAY_COLUMN])[OVERLAY_COLUMN]
        except (ValueError, pd.errors.ParserError) as exc:
            raise DataError(f"{table_path} is not a predictions.csv of `dualstpm predict` ({exc}): "
                            "choose another --out folder or remove that file") from None
        names = {name for name in listed.dropna().astype(str) if name == Path(name).name}  # files in out_dir only
        return cls(Path(out_dir), len(listed), frozenset(names))

    def replaced_by(self, table: pd.DataFrame, shown: int = 5) -> str:
        """One line saying what the new batch `table` (`predict`'s result, written to the
        same folder) replaced: the earlier rows, and which earlier overlays it overwrote
        (same name) or `predict` deleted (named, the first `shown` of them)."""
        new = set(table[OVERLAY_COLUMN].dropna().astype(str))
        deleted, overwritten = sorted(self.overlays - new), len(self.overlays & new)
        names = ", ".join(deleted[:shown]) + (f" and {len(deleted) - shown} more" if len(deleted) > shown else "")
        return (f"{self.out_dir} held an earlier batch: its {PREDICTIONS_FILE} of {self.rows} image(s) is replaced by "
                f"this one of {len(table)}; of its {len(self.overlays)} overlay(s), {overwritten} were overwritten by "
                f"this batch's of the same name and {len(deleted)} deleted" + (f" ({names})" if deleted else ""))


#: each image's input statistics (`dualstpm.data.input_stats`), which `dualstpm monitor` compares with the training images'
COLUMNS = ("path", *(f.name for f in fields(ImagePrediction) if f.name not in _NOT_COLUMNS), *INPUT_STATISTICS,
           "overlay", "error")


def table_columns(spec: RegionSpec | None) -> list[str]:
    """The predictions table's columns: `COLUMNS`, with `RULE_COLUMNS` before `overlay` under a region rule."""
    if spec is None or not spec.has_rule:
        return list(COLUMNS)
    return [*COLUMNS[:-2], *RULE_COLUMNS, *COLUMNS[-2:]]


def _read_each(chunk: Sequence[Path], max_pixels: int) -> list[np.ndarray | DataError]:
    """Decode each file on its own: its image, or the DataError that says why it cannot be read."""
    decoded: list[np.ndarray | DataError] = []
    for path in chunk:
        try:
            decoded.append(read_frame(path, max_pixels))  # 8-bit pixels stay bytes (large frames)
        except DataError as exc:
            decoded.append(exc)
    return decoded


def predict(detector: Scorer, paths: Sequence[Path], out_dir: Path, threshold: float | None = None,
            max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> pd.DataFrame:
    """Score images, write an overlay per image and `predictions.csv` (atomically); return the table.
    With a pixel threshold (`detector.regions`), `regions.jsonl` beside it holds one line per
    defect region (`region_lines`, docs/regions.md) and the overlays outline the regions.

    Columns: `table_columns` (`COLUMNS`, plus `n_regions` and `verdict` under a region rule),
    one row per image in input order. Raises DataError, before
    anything is scored, when `out_dir` holds a review log (`EarlierBatch.read`). A file that cannot be read (not
    an image, truncated, above `max_pixels` pixels: ``data.max_image_pixels``) gets its message in `error` and empty score, label and
    overlay; every other image is scored. A value that does not exist (those, and
    `disc_score` without the discriminative stage) is an empty cell, never the text ``nan``. Raises DataError only for paths that do not
    exist or hold no image at all (before anything is scored).

    Reusing `out_dir`: after the new table is written, the overlays the previous
    `predictions.csv` listed and the new one does not are deleted (nothing else in the
    folder is touched), so every overlay beside the table belongs to it
    (`EarlierBatch.replaced_by` says what was replaced). Last, the batch's score
    distribution goes to `out_dir/monitor/batch.json` (`dualstpm.monitor`).
    """
    images = collect_images(paths)
    threshold = detector.threshold if threshold is None else float(threshold)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = EarlierBatch.read(out_dir)
    previous = set(earlier.overlays) if earlier is not None else set()
    scale = overlay_scale(detector, threshold)
    spec = detector.regions
    rows, taken, region_rows, stretches = [], set(), [], []
    batch_size = detector.batch_size if detector.tiling is None else 1  # tiled: one frame (a batch of tiles) at a time
    with stage("scoring images", len(images)) as progress:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            decoded = _read_each(chunk, max_pixels)
            readable = [image for image in decoded if not isinstance(image, DataError)]
            # the input statistics first: their working buffer is gone before the maps exist (large frames)
            statistics = iter([image_statistics(image) for image in readable])
            results = iter(score_images(detector, readable, threshold))
            for path, image in zip(chunk, decoded, strict=True):
                if isinstance(image, DataError):
                    rows.append({"path": str(path), "threshold": threshold, "error": str(image)})
                    continue
                result, name = next(results), _unique_name(path.stem, taken)
                picture = draw_overlay(image, result.anomaly_map, scale, result.score, result.label, title=path.name,
                                       regions=None if spec is None else RegionsShown(result.regions, spec))
                if result.regions is not None:
                    region_rows.extend(region_lines(str(path), result.regions, spec))
                with atomic_file(out_dir / name) as tmp:
                    picture.save(tmp)
                rows.append({"path": str(path), **result.row(), **next(statistics), OVERLAY_COLUMN: name,
                             "error": ""})
                stretches.append(aspect_change((image.shape[1], image.shape[0]), detector.frame_size))
            progress.advance(len(chunk))
    table = pd.DataFrame(rows, columns=table_columns(spec))
    write_csv(out_dir / PREDICTIONS_FILE, table)
    if spec is not None:
        write_text(out_dir / REGIONS_FILE, "".join(line + "\n" for line in region_rows))
    else:  # a model without regions: no file of an earlier batch's is left beside this table
        (out_dir / REGIONS_FILE).unlink(missing_ok=True)
    for stale in previous - taken:
        (out_dir / stale).unlink(missing_ok=True)
    write_batch_summary(out_dir, table, {"decision_view": detector.decision_view, "threshold": detector.threshold})
    if (note := stretch_note(stretches, detector.frame_size, detector.tiling is not None)) is not None:  # a squash is never silent
        say(f"[bold yellow]warning:[/] {escape(note)}")
    return table
