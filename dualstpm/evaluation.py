"""Testing a trained detector on a category's test split (METHOD.md §6).

The test split is touched here and nowhere else. Metrics are computed per view: the
fused model and each branch alone, with the same fusion settings and the thresholds
calibrated on validation images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dualstpm import metrics
from dualstpm.compute import Compute
from dualstpm.data import decode_images, decode_masks, load_category
from dualstpm.detector import Detector
from dualstpm.figures import PLOTS_DIR, overlay_name, write_test_figures
from dualstpm.fusion import VIEWS
from dualstpm.maps import MAPS_DIR, compute_six_maps, fused_and_scores, store_test_and_val_maps
from dualstpm.overlays import fusion_label

METRICS_FILE = "metrics.json"
IMAGE_ONLY_NOTE = "image-level only: the category has no ground_truth folder, so pixel metrics are null"


def evaluate_detector(detector: Detector, data_root: Path, category: str, batch_size: int | None = None,
                      plots_dir: Path | None = None, maps_dir: Path | None = None) -> dict:
    """Score every test image and compute the metrics of each view (figures into `plots_dir`).

    The six raw maps are computed once, rounded to the float16 in which they are stored
    (into `maps_dir`, with the validation images' maps), and every view is fused from
    them: re-scoring the stored maps (the ablation) reproduces these metrics exactly.
    """
    dataset = load_category(Path(data_root), category)
    size = detector.params.image_size
    images = decode_images([s.path for s in dataset.test], size, f"decoding {len(dataset.test)} test images")
    masks = decode_masks(dataset.test, size).numpy() if dataset.has_ground_truth else None
    labels = np.array([s.label for s in dataset.test])
    defect_types = [s.defect_type for s in dataset.test]

    batch_size = batch_size or detector.params.fit.batch_size
    six = compute_six_maps(detector, images, batch_size)
    scores: dict[str, np.ndarray] = {}
    maps: dict[str, np.ndarray] | None = {} if masks is not None else None
    for view in VIEWS:
        fused, scores[view] = fused_and_scores(six, detector.view_spec(view), detector.calibration.map_stats)
        if maps is not None:
            maps[view] = fused
    truth = metrics.PixelTruth(masks) if masks is not None else None  # regions labelled once for all views

    result: dict = {
        "category": category,
        "n_test_images": int(len(images)),
        "n_defective": int(labels.sum()),
        "image_level_only": masks is None,
        # which fusion the fused view used: the trained params, or the ablation's choice
        "fusion": fusion_label(detector),
    }
    if masks is None:
        result["note"] = IMAGE_ONLY_NOTE
    for view in VIEWS:
        result[view] = metrics.evaluate(
            labels,
            defect_types,
            scores[view],
            maps[view] if maps is not None else None,
            truth,
            detector.thresholds[view],
        )
    if plots_dir is not None:
        names = [overlay_name(s.defect_type, s.path) for s in dataset.test]
        write_test_figures(plots_dir, detector, [s.path for s in dataset.test], labels, scores, names, maps, masks)
    if maps_dir is not None:
        store_test_and_val_maps(maps_dir, detector, dataset, six, masks, batch_size)
    return result


def test_run(run_dir: Path, data_root: Path, category: str, compute: Compute | None = None) -> dict:
    """Load `run_dir/model`, evaluate it and write `run_dir/metrics.json`, `run_dir/plots/`
    and the six maps of the test and validation images into `run_dir/maps/`."""
    detector = Detector.load(run_dir, compute)
    result = evaluate_detector(detector, data_root, category, plots_dir=Path(run_dir) / PLOTS_DIR,
                               maps_dir=Path(run_dir) / MAPS_DIR)
    (Path(run_dir) / METRICS_FILE).write_text(json.dumps(result, indent=2))
    return result


test_run.__test__ = False  # not a pytest test despite its name
