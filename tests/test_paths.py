"""Paths checked before heavy imports: quoted glob patterns, missing paths."""

from pathlib import Path

import pytest

from dualstpm.errors import DataError
from dualstpm.paths import expand_paths


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    for name in ("a.png", "b.png", "c.jpg", "sub/d.png", "x[1].png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    return tmp_path


def test_patterns_expand_in_sorted_order(images: Path):
    assert expand_paths([images / "*.jpg", images / "[ab].png"]) == [images / "c.jpg", images / "a.png", images / "b.png"]
    assert expand_paths([str(images / "**" / "d.png")]) == [images / "sub" / "d.png"]


def test_an_existing_path_is_taken_literally_even_with_pattern_characters(images: Path):
    # as a pattern, x[1].png would mean x1.png, which does not exist
    assert expand_paths([images / "x[1].png", images / "sub"]) == [images / "x[1].png", images / "sub"]


def test_a_pattern_matching_nothing_and_a_missing_path_are_named(images: Path):
    with pytest.raises(DataError, match=r"'.*\*\.bmp' matches no file"):
        expand_paths([images / "a.png", images / "*.bmp"])
    with pytest.raises(DataError, match="nope.png does not exist"):
        expand_paths([images / "nope.png"])
