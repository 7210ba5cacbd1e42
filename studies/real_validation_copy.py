"""A real-validation copy of an MVTec-layout category (docs/frames.md, the side-by-side tables).

Every fifth test image of each defect type (by sorted file name, starting with the first)
moves to ``validation/<type>/`` with its mask in ``validation_ground_truth/<type>/``; the
other test images, the masks and the good images stay where they were. Files are symbolic
links to the source, so the copy costs no disk space. A fit on the copy selects its epochs
on those real defects (docs/your-own-data.md), and the test scores only the rest.

    python -m studies.real_validation_copy ../shared/data /tmp/kolv kolektor
"""

from __future__ import annotations

import argparse
from pathlib import Path


def real_validation_copy(source_root: Path, target_root: Path, category: str, every: int = 5) -> dict[str, int]:
    """Write the copy of `source_root/category` under `target_root/category`; returns the
    number of test and validation defect images. Raises FileExistsError when the target
    exists (nothing is overwritten) and KeyError naming a defect image without a mask."""
    src, dst = Path(source_root) / category, Path(target_root) / category
    if dst.exists():
        raise FileExistsError(f"{dst} exists: choose another target or remove it")
    for sub in ("train/good", "test/good"):
        (dst / sub).mkdir(parents=True)
        for path in sorted((src / sub).iterdir()):
            (dst / sub / path.name).symlink_to(path.resolve())
    counts = {"test": 0, "validation": 0}
    for defect in sorted(p for p in (src / "test").iterdir() if p.is_dir() and p.name != "good"):
        masks = {m.stem.removesuffix("_mask"): m for m in (src / "ground_truth" / defect.name).iterdir()}
        for i, path in enumerate(sorted(defect.iterdir())):
            split = "validation" if i % every == 0 else "test"
            truth = "validation_ground_truth" if split == "validation" else "ground_truth"
            if path.stem not in masks:
                raise KeyError(f"{path} has no mask in {src / 'ground_truth' / defect.name}")
            for folder, file in ((dst / split / defect.name, path), (dst / truth / defect.name, masks[path.stem])):
                folder.mkdir(parents=True, exist_ok=True)
                (folder / file.name).symlink_to(file.resolve())
            counts[split] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source_root", type=Path)
    parser.add_argument("target_root", type=Path)
    parser.add_argument("category")
    args = parser.parse_args()
    counts = real_validation_copy(args.source_root, args.target_root, args.category)
    print(f"{args.category}: {counts['validation']} defect images to validation, {counts['test']} kept for the test")


if __name__ == "__main__":
    main()
