"""Testing a trained detector on a category's test split (METHOD.md §6).

The test split is touched here and nowhere else. Metrics are computed per view: the
fused model (always `params.fusion`, with its trained threshold), each branch alone, the
discriminative stage (`disc`) on a model that has it, and `chosen` when `dualstpm ablate`
applied a fusion (its own row, named under `chosen_fusion`), each at its threshold
calibrated on validation images. `default` names the view the model decides with
(`fusion.view`, or `chosen` in place of `fused`). Each view also reports the false-alarm
rate observed on the good test images at its threshold, next to the target it was
calibrated for (`calibration.false_alarm_rate`). A model with a pixel threshold also gets
`regions` (`region_evaluation`): its decision view's defect regions, a region-based image
score and, under a region rule, the rule's false alarms and recall beside the plain score's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dualstpm import metrics
from dualstpm.compute import Compute
from dualstpm.data import decode_images, decode_masks, image_size_of, load_category
from dualstpm.detector import CHOSEN_VIEW, Detector, fusion_label
from dualstpm.figures import overlay_name, write_test_figures
from dualstpm.files import write_json
from dualstpm.maps import compute_raw_maps, store_test_and_val_maps
from dualstpm.model.fusion import DISC_VIEW, VIEWS
from dualstpm.model.regions import CONNECTIVITY, DEFECTIVE, RegionSpec
from dualstpm.progress import stage
from dualstpm.rundir import MAPS_DIR, METRICS_FILE, PLOTS_DIR

IMAGE_ONLY_NOTE = "image-level only: the category has no ground_truth folder, so pixel metrics are null"


def undefined_metrics_note(result: dict, has_ground_truth: bool) -> str | None:
    """Why the null metrics of a metrics.json `result` are null, one clause per cause (None
    when every metric is defined): no defective test images, no good ones, no ground truth,
    or nothing flagged at a view's threshold."""
    n_defective = result["n_defective"]
    reasons = []
    if n_defective == 0:
        reasons.append("the test set has no defective images, so image AUROC, image F1-max, pixel AUROC, AUPRO "
                       "and recall are undefined (null): each needs at least one defective image")
    elif not has_ground_truth:
        reasons.append(IMAGE_ONLY_NOTE)
    if n_defective == result["n_test_images"]:
        reasons.append("the test set has no good images, so image AUROC is undefined (null): it needs good images too")
    unflagged = [view for view in (*VIEWS, DISC_VIEW, CHOSEN_VIEW) if view in result and result[view]["precision"] is None]
    if unflagged:
        reasons.append(f"no test image scores above the threshold of {', '.join(unflagged)}, so precision is "
                       "undefined (null) there: nothing was flagged")
    return "; ".join(reasons) or None


def false_alarms(labels: np.ndarray, scores: np.ndarray, threshold: float, target: float) -> dict:
    """The good images (label 0) flagged at `threshold` (score > threshold, the decision
    rule): `false_alarm_rate` = flagged / good (None without good images), `false_alarms`
    the count, `false_alarm_target` the rate the threshold was calibrated for."""
    good = np.asarray(scores, dtype=np.float64)[np.asarray(labels) == 0]
    flagged = int(np.count_nonzero(good > threshold))
    return {"false_alarm_rate": flagged / good.size if good.size else None, "false_alarms": flagged,
            "false_alarm_target": float(target)}


def _rate(flags: np.ndarray) -> float | None:
    """The share of true values; None for no values (0/0 is no measurement)."""
    return float(np.mean(flags)) if flags.size else None


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def region_evaluation(spec: RegionSpec, maps: np.ndarray, labels: np.ndarray,
                      image_shapes: list[tuple[int, int]], truth: metrics.PixelTruth | None = None) -> dict:
    """The defect regions' effect on the part decision, beside the plain image score (docs/regions.md).

    maps: (N, S, S) the decision view's test maps; labels: (N,) 1 = defective; image_shapes:
    each test image's (H, W), for areas in its pixels. Returns: the pixel threshold with its
    target and the share of the good test images' pixels above it (`pixel_fpr_good_test`);
    the region-based image score, the largest region's area in the rule's unit (0 without
    regions), with its image AUROC and F1-max; regions per good and defective image; and
    under a rule (`at_rule`) the parts it flags: false-alarm rate and count on the good
    images, recall, precision and F1 on the test set (None without a rule); with the ground
    truth `truth`, `small_region_recall` (`metrics.small_region_recall`; None without masks).
    Every rate is None (JSON null) when its denominator is 0.
    """
    found = [spec.find(m, shape) for m, shape in zip(maps, image_shapes, strict=True)]
    largest = np.array([spec.largest_area(f.regions) for f in found], dtype=np.float64)
    counts = np.array([len(f.regions) for f in found], dtype=np.float64)
    good, defective = labels == 0, labels == 1
    best = metrics.f1_max(labels, largest)
    result = {
        "pixel_threshold": spec.pixel_threshold,
        "pixel_fpr_target": spec.pixel_fpr,
        "pixel_fpr_good_test": _rate(maps[good] > spec.pixel_threshold),
        "connectivity": CONNECTIVITY,
        "mm_per_px": spec.mm_per_px,
        "region_score": f"largest region area ({spec.area_unit}; 0 without regions)",
        "image_auroc": metrics.image_auroc(labels, largest),
        "image_f1_max": None if best is None else best[0],
        "regions_per_good_image": float(counts[good].mean()) if good.any() else None,
        "regions_per_defective_image": float(counts[defective].mean()) if defective.any() else None,
        "rule": spec.rule_text(),
        "at_rule": None,
        "small_region_recall": None if truth is None else metrics.small_region_recall(truth, maps, spec.pixel_threshold),
    }
    if spec.has_rule:
        flagged = np.array([spec.verdict(f.regions) == DEFECTIVE for f in found])
        precision, recall = metrics.precision_recall_at(labels, flagged.astype(np.float64), 0.5)
        result["at_rule"] = {
            "min_defect_area_px": spec.min_area_px, "min_defect_area_mm2": spec.min_area_mm2,
            "false_alarm_rate": _rate(flagged[good]), "false_alarms": int(flagged[good].sum()),
            "recall": recall, "precision": precision,
            "f1": None if precision is None or recall is None else _f1(precision, recall),
        }
    return result


def evaluate_detector(detector: Detector, data_root: Path, category: str, batch_size: int | None = None,
                      plots_dir: Path | None = None, maps_dir: Path | None = None,
                      max_pixels: int | None = None) -> dict:
    """Score every test image and compute the metrics of each view (figures into `plots_dir`).

    The six raw maps are computed once, rounded to the float16 in which they are stored
    (into `maps_dir`, with the validation images' maps), and every view is fused from
    them: re-scoring the stored maps (the ablation) reproduces these metrics exactly.
    Masks are resized so that no defect region vanishes (`resize_mask`); what they hold
    (empty masks, merged regions) is reported under `ground_truth` and in `note`.
    `max_pixels` limits the images read (None: the model's ``data.max_image_pixels``).
    """
    dataset = load_category(Path(data_root), category)
    size = detector.frame_size  # the input size, or under tiling the frames' (scored tile by tile)
    max_pixels = detector.params.data.max_image_pixels if max_pixels is None else max_pixels
    images = decode_images([s.path for s in dataset.test], size, "decoding test images",
                           max_pixels)
    masks, truth_report = None, None
    if dataset.has_ground_truth:
        stack, truth_report = decode_masks(dataset.test, size, max_pixels)
        masks = stack.numpy()
    labels = np.array([s.label for s in dataset.test])
    defect_types = [s.defect_type for s in dataset.test]

    batch_size = batch_size or detector.params.fit.batch_size
    raw = compute_raw_maps(detector, images, batch_size, "computing anomaly maps of test images")
    scores: dict[str, np.ndarray] = {}
    maps: dict[str, np.ndarray] | None = {} if masks is not None else None
    decision_maps = None  # the decision view's maps, for its defect regions
    for view in detector.views:
        view_maps, scores[view] = detector.inference.views.stack(raw, view)
        if maps is not None:
            maps[view] = view_maps
        if view == detector.decision_view and detector.regions is not None:
            decision_maps = view_maps
    truth = metrics.PixelTruth(masks) if masks is not None else None  # regions labelled once for all views

    result: dict = {
        "category": category,
        "n_test_images": int(len(images)),
        "n_defective": int(labels.sum()),
        "image_level_only": masks is None,
        # the view the model decides with (predict, export, registry); `fused` is always params.fusion
        "default": detector.decision_view,
        "chosen_fusion": fusion_label(detector) if detector.chosen else None,
        "calibration": {"false_alarm_rate": detector.calibration.false_alarm_rate,
                        # the rate a new good part is flagged at, given the calibration images (None: not recorded)
                        "false_alarm_bound": detector.calibration.false_alarm_bound,
                        "validation_split": detector.calibration.validation_split,
                        "notes": detector.calibration.notes,
                        # what selected the epochs: good images only, or real validation defects (their AUROCs)
                        "validation_evidence": detector.calibration.validation_evidence,
                        # how the fit separated synthetic defects (dualstpm.fit_check); None: fitted before the check
                        "fit_check": detector.calibration.fit_check},
        # how maps became image scores: the model's calibrated reduction, not the params file's
        "score": detector.score_spec.to_json(),
    }
    if truth_report is not None:
        result["ground_truth"] = truth_report.to_dict()
    with stage("computing metrics", len(detector.views), "views") as progress:
        for view in detector.views:
            result[view] = {
                **metrics.evaluate(labels, defect_types, scores[view], maps[view] if maps is not None else None, truth,
                                   detector.thresholds[view]),
                **false_alarms(labels, scores[view], detector.thresholds[view], detector.calibration.false_alarm_rate),
            }
            progress.advance()
    if decision_maps is not None:  # the model has a pixel threshold: its regions' effect beside the plain score
        shapes = [image_size_of(s.path)[::-1] for s in dataset.test]
        result["regions"] = {"view": detector.decision_view,
                             **region_evaluation(detector.regions, decision_maps, labels, shapes, truth),
                             # what the calibration images promise a new good image (docs/regions.md)
                             "pixel_fpr_bound": detector.calibration.pixel_false_positive_bound}
    # what the ground truth holds (lossy or empty masks, merged regions), then why metrics are null
    notes = [note for note in (truth_report.note() if truth_report is not None else None,
                               undefined_metrics_note(result, has_ground_truth=masks is not None)) if note]
    if notes:
        result["note"] = "; ".join(notes)
    if plots_dir is not None:
        names = [overlay_name(s.defect_type, s.path) for s in dataset.test]
        with stage("drawing curves and overlays"):
            write_test_figures(plots_dir, detector, category, raw, [s.path for s in dataset.test], labels, scores,
                               names, maps, masks)
    if maps_dir is not None:
        store_test_and_val_maps(maps_dir, detector, dataset, raw, masks, batch_size, max_pixels)
    return result


def test_run(run_dir: Path, data_root: Path, category: str, compute: Compute | None = None,
             max_pixels: int | None = None, device: str = "auto", out_dir: Path | None = None) -> dict:
    """Load `run_dir/model` (on `compute`, else `device`: see `Detector.load`), evaluate it and
    write `metrics.json`, `plots/` and the six maps of the test and validation images into
    `maps/`, all in `out_dir` (default `run_dir`; an evaluation kept beside the run's first,
    `RUN/evaluations/<data hash>/`, is another). `max_pixels`: see `evaluate_detector`."""
    detector = Detector.load(run_dir, compute, device)
    out_dir = Path(run_dir if out_dir is None else out_dir)
    result = evaluate_detector(detector, data_root, category, plots_dir=out_dir / PLOTS_DIR,
                               maps_dir=out_dir / MAPS_DIR, max_pixels=max_pixels)
    write_json(out_dir / METRICS_FILE, result)
    return result


test_run.__test__ = False  # not a pytest test despite its name
