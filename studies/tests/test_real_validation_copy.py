"""The real-validation copy: every fifth defect image per type, by sorted name, with its mask."""

from __future__ import annotations

from pathlib import Path

import pytest

from studies.real_validation_copy import real_validation_copy


def _category(root: Path, defects: dict[str, int], goods: int = 3) -> None:
    for sub in ("train/good", "test/good"):
        (root / "cat" / sub).mkdir(parents=True)
        for i in range(goods):
            (root / "cat" / sub / f"{i:03d}.png").write_bytes(b"good")
    for defect, n in defects.items():
        (root / "cat" / "test" / defect).mkdir(parents=True)
        (root / "cat" / "ground_truth" / defect).mkdir(parents=True)
        for i in range(n):
            (root / "cat" / "test" / defect / f"{i:03d}.png").write_bytes(b"bad")
            (root / "cat" / "ground_truth" / defect / f"{i:03d}_mask.png").write_bytes(b"mask")


def test_every_fifth_defect_of_each_type_moves_to_validation_with_its_mask(tmp_path: Path):
    # 7 scratches: 000 and 005 to validation; 3 dents: 000 only; the rest (5 + 2) stay for the test
    _category(tmp_path / "src", {"scratch": 7, "dent": 3})
    counts = real_validation_copy(tmp_path / "src", tmp_path / "dst", "cat")
    assert counts == {"validation": 3, "test": 7}
    dst = tmp_path / "dst" / "cat"
    assert sorted(p.name for p in (dst / "validation" / "scratch").iterdir()) == ["000.png", "005.png"]
    assert sorted(p.name for p in (dst / "validation_ground_truth" / "scratch").iterdir()) == ["000_mask.png",
                                                                                              "005_mask.png"]
    assert sorted(p.name for p in (dst / "test" / "dent").iterdir()) == ["001.png", "002.png"]
    assert len(list((dst / "train" / "good").iterdir())) == 3 and (dst / "test" / "good" / "000.png").is_symlink()


def test_an_existing_target_is_refused_and_left_alone(tmp_path: Path):
    _category(tmp_path / "src", {"scratch": 2})
    (tmp_path / "dst" / "cat").mkdir(parents=True)
    (tmp_path / "dst" / "cat" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="choose another target"):
        real_validation_copy(tmp_path / "src", tmp_path / "dst", "cat")
    assert (tmp_path / "dst" / "cat" / "keep.txt").read_text() == "mine"
