"""The parts a review covers (the rows of a ``predictions.csv``) and the order they are shown in.

Review order (:func:`review_order`), what needs a look first:

1. parts with no verdict yet before parts already reviewed;
2. within each group, by the margin ``|score - threshold|`` ascending: the raw score's
   distance to the threshold the model's label used (the row's own ``threshold``
   column), so the least certain decisions come first, whichever side they fall on;
3. on equal margins, alarms (label ``defective``) before ``good``;
4. then by the path as listed, for a stable order.

The margin is taken on the raw score, not on ``normalized_score``: the normalised score is
clipped to [0, 1] (every clear alarm is 1.0, so it cannot rank them) and its 0.5 is the
model's stored threshold, not a ``predict --threshold`` override the labels may use.

Rows ``predict`` could not score (an ``error``, no score) have nothing to review: they
are counted and listed apart (:attr:`Predictions.unreadable`), never ordered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dualstpm.data.images import IMAGE_SUFFIXES
from dualstpm.errors import DataError
from dualstpm.review.log import image_key
from dualstpm.rundir import OVERLAY_COLUMN, PREDICTIONS_FILE

NEEDED_COLUMNS = ("path", "score", "normalized_score", "label", "threshold", OVERLAY_COLUMN, "error")


@dataclass(frozen=True)
class Part:
    """One scored image: its row `id` (0-based row of predictions.csv), the path as listed
    and resolved (`image`, absolute), the model's figures (raw score units; normalised
    score in [0, 1], 0.5 = stored threshold) and its overlay file name in the folder."""

    id: int
    listed_path: str
    image: str
    score: float
    normalized_score: float
    label: str
    threshold: float
    overlay: str

    @property
    def margin(self) -> float:
        """|score - threshold|, raw score units: how close the decision was."""
        return abs(self.score - self.threshold)


@dataclass(frozen=True)
class Predictions:
    """A predictions folder read for review: the scored `parts` (in file order) and the
    `unreadable` rows (listed path, predict's error message)."""

    folder: Path
    table: Path
    parts: list[Part]
    unreadable: list[tuple[str, str]]


def numeric_columns(table: pd.DataFrame, columns: tuple[str, ...], path: Path) -> pd.DataFrame:
    """`table` with each of `columns` it has as floats: an empty cell (an image predict could
    not score) is NaN; any other text that is not a number raises DataError naming `path`,
    the data row (1-based, the header not counted) and the column. Shared by the review and
    `dualstpm.monitor`, the two readers of a predictions.csv."""
    table = table.copy()
    for column in (c for c in columns if c in table.columns):
        raw = table[column]
        numbers = pd.to_numeric(raw, errors="coerce")
        empty = raw.isna() | (raw.astype(str).str.strip() == "")
        bad = numbers.isna() & ~empty
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"{path}, data row {row + 1}, column {column}: {raw.iloc[row]!r} is not a number; "
                            "the table was edited or is not a predictions.csv of `dualstpm predict`: fix that cell "
                            "(leave it empty for an image that was not scored) or run predict again")
        table[column] = numbers.astype(float)
    return table


def load_predictions(folder: Path | str, base: Path | str | None = None) -> Predictions:
    """Read ``folder/predictions.csv`` as `dualstpm predict --out folder` wrote it.

    Relative image paths are taken relative to `base` (default: the current folder, as
    predict wrote them relative to where it ran). Raises DataError naming the file when
    there is no table, it lacks a column, a score is not a number (`numeric_columns`), a
    scored row's image or overlay is not an image file by its suffix (the server would send
    it) or has no overlay file, and when
    none of the listed images exists (the wrong folder: the fix is named).
    """
    folder = Path(folder)
    table_path = folder / PREDICTIONS_FILE
    if not table_path.is_file():
        raise DataError(f"no {PREDICTIONS_FILE} in {folder.absolute()}: review the folder that "
                        f"`dualstpm predict IMAGES --out {folder}` wrote")
    try:
        table = pd.read_csv(table_path, dtype={"path": str, "label": str, OVERLAY_COLUMN: str, "error": str},
                            keep_default_na=False, na_values={c: [""] for c in ("score", "normalized_score", "threshold")})
    except (ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"{table_path} cannot be read as a predictions table ({exc}): run `dualstpm predict` again") from None
    missing = [c for c in NEEDED_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{table_path} lacks the columns {', '.join(missing)}: it is not a predictions.csv of "
                        "`dualstpm predict` (or of an older version); run predict again into this folder")
    table = numeric_columns(table, ("score", "normalized_score", "threshold"), table_path)
    base = Path.cwd() if base is None else Path(base)
    parts, unreadable = [], []
    for row_id, row in enumerate(table.to_dict(orient="records")):
        listed = str(row["path"])
        if row["error"] or math.isnan(row["score"]):
            unreadable.append((listed, row["error"] or "no score"))
            continue
        overlay = str(row[OVERLAY_COLUMN])
        for what, name in (("image", listed), ("overlay", overlay)):  # the server sends these files: images only
            if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"{table_path}, data row {row_id + 1}: the {what} {name!r} is not an image file (its "
                                f"name does not end in {', '.join(IMAGE_SUFFIXES)}); the review serves images only: "
                                "run `dualstpm predict` into a new folder instead of editing its table")
        if not overlay or overlay != Path(overlay).name or not (folder / overlay).is_file():
            raise DataError(f"{table_path}, data row {row_id + 1} ({listed}): overlay {overlay!r} is not a file in "
                            f"{folder.absolute()}; the folder is incomplete: run `dualstpm predict` into it again")
        parts.append(Part(id=row_id, listed_path=listed, image=image_key(base / listed),
                          score=float(row["score"]), normalized_score=float(row["normalized_score"]),
                          label=str(row["label"]), threshold=float(row["threshold"]), overlay=overlay))
    if parts and not any(Path(p.image).is_file() for p in parts):
        raise DataError(f"none of the {len(parts)} images {table_path} lists exists (the first: {parts[0].image}): "
                        f"relative paths are read from {base.absolute()}; start the review from the folder "
                        "`dualstpm predict` ran in, or pass --base that folder")
    return Predictions(folder=folder, table=table_path, parts=parts, unreadable=unreadable)


def review_order(parts: list[Part], verdicts: Mapping[str, Any]) -> list[int]:
    """Part ids in review order (the module docstring's rule); `verdicts` maps an image
    key to its current verdict (any value; only the key's presence counts)."""
    ranked = sorted(parts, key=lambda p: (p.image in verdicts, p.margin, p.label != "defective", p.listed_path))
    return [p.id for p in ranked]
