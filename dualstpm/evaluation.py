"""Testing a trained detector on a category's test split (METHOD.md §6).

The test split is touched here and nowhere else. Metrics are computed per view: the
fused model and each branch alone, with the same fusion settings and the thresholds
calibrated on validation images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from dualstpm import metrics
from dualstpm.data import decode_images, decode_masks, load_category
from dualstpm.detector import Detector
from dualstpm.fusion import VIEWS

METRICS_FILE = "metrics.json"
IMAGE_ONLY_NOTE = "image-level only: the category has no ground_truth folder, so pixel metrics are null"


def evaluate_detector(detector: Detector, data_root: Path, category: str, batch_size: int | None = None) -> dict:
    """Score every test image and compute the metrics of each view."""
    dataset = load_category(Path(data_root), category)
    size = detector.params.image_size
    images = decode_images([s.path for s in dataset.test], size, f"decoding {len(dataset.test)} test images")
    masks = decode_masks(dataset.test, size).numpy() if dataset.has_ground_truth else None
    labels = np.array([s.label for s in dataset.test])
    defect_types = [s.defect_type for s in dataset.test]

    scores = {v: np.empty(len(images), dtype=np.float64) for v in VIEWS}
    maps = {v: np.empty((len(images), size, size), dtype=np.float32) for v in VIEWS} if masks is not None else None
    for part, scored in detector.batches(images, batch_size or detector.params.fit.batch_size):
        for view in VIEWS:
            scores[view][part] = scored.scores[view].cpu().numpy()
            if maps is not None:
                maps[view][part] = scored.maps[view].cpu().numpy()

    result: dict = {
        "category": category,
        "n_test_images": int(len(images)),
        "n_defective": int(labels.sum()),
        "image_level_only": masks is None,
    }
    if masks is None:
        result["note"] = IMAGE_ONLY_NOTE
    for view in VIEWS:
        result[view] = metrics.evaluate(
            labels,
            defect_types,
            scores[view],
            maps[view] if maps is not None else None,
            masks,
            detector.calibration.thresholds[view],
        )
    return result


def test_run(run_dir: Path, data_root: Path, category: str, device: torch.device | None = None) -> dict:
    """Load `run_dir/model`, evaluate it and write `run_dir/metrics.json`."""
    detector = Detector.load(run_dir, device)
    result = evaluate_detector(detector, data_root, category)
    (Path(run_dir) / METRICS_FILE).write_text(json.dumps(result, indent=2))
    return result


test_run.__test__ = False  # not a pytest test despite its name
