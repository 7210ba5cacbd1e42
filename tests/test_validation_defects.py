"""Real defects as validation evidence (``validation/<defect_type>/``, issue 22 item 4).

The folder is read as validation evidence only (never training or test data), it selects
the epoch and the ablation's fusion in place of good-image statistics and synthetic
defects, an absent folder changes nothing, and bad input is a clear error. Expected
values are derived by hand from hand-made scores and maps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_OVERRIDES
from PIL import Image

from dualstpm.data import load_category, split_train_val, validation_evidence
from dualstpm.errors import DataError

SIZE = 8


def _png(path: Path, value: int, size: tuple[int, int] = (SIZE, SIZE)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0]), value, np.uint8)).save(path)
    return path


def _category(root: Path, *, defects: bool = True) -> Path:
    """A tiny category: 4 train/good, test good + crack (with ground truth) and, with
    `defects`, validation/crack (2 images, one masked) and validation/dent (1, unmasked)."""
    category = root / "part"
    for i in range(4):
        _png(category / "train" / "good" / f"{i}.png", 100 + i)
    _png(category / "test" / "good" / "0.png", 100)
    _png(category / "test" / "crack" / "0.png", 200)
    _png(category / "ground_truth" / "crack" / "0_mask.png", 255)
    if defects:
        _png(category / "validation" / "crack" / "v0.png", 210)
        _png(category / "validation" / "crack" / "v1.png", 220)
        _png(category / "validation_ground_truth" / "crack" / "v0_mask.png", 255)
        _png(category / "validation" / "dent" / "d0.png", 230)
    return category


# --------------------------------------------------------------------------- the data layer


def test_real_defects_are_read_as_validation_evidence_and_in_no_split(tmp_path: Path) -> None:
    folder = _category(tmp_path)
    category = load_category(tmp_path, "part")

    real = {s.path: s for s in category.validation_defects}
    assert set(real) == {folder / "validation" / "crack" / "v0.png", folder / "validation" / "crack" / "v1.png",
                         folder / "validation" / "dent" / "d0.png"}
    assert real[folder / "validation" / "crack" / "v0.png"].mask_path == (
        folder / "validation_ground_truth" / "crack" / "v0_mask.png")
    assert real[folder / "validation" / "crack" / "v1.png"].mask_path is None  # image-level only
    assert {s.defect_type for s in real.values()} == {"crack", "dent"} and {s.label for s in real.values()} == {1}
    # never training, validation/good or test data
    train, validation = split_train_val(category, 0.25, seed=0)
    used = {*category.train, *train, *validation, *(s.path for s in category.test)}
    assert not used & set(real)
    assert category.validation is None  # validation/<defect> is not validation/good: train/good is held out
    assert len(train) == 3 and len(validation) == 1 and set(train) | set(validation) == set(category.train)
    assert validation_evidence(category, "synthetic") == "real: 3 images of 2 defect types"


def test_validation_good_beside_real_defects_stays_the_good_validation_set(tmp_path: Path) -> None:
    folder = _category(tmp_path)
    good = [_png(folder / "validation" / "good" / f"g{i}.png", 90) for i in range(2)]
    category = load_category(tmp_path, "part")
    assert category.validation == tuple(good)
    assert len(category.validation_defects) == 3
    train, validation = split_train_val(category, 0.25, seed=0)
    assert validation == good and train == list(category.train)


def test_without_the_folder_nothing_changes(tmp_path: Path) -> None:
    from dualstpm.training import data_signature

    _category(tmp_path, defects=False)
    category = load_category(tmp_path, "part")
    assert category.validation_defects == ()
    assert validation_evidence(category, "synthetic") == "synthetic"
    train, validation = split_train_val(category, 0.25, seed=0)
    assert set(data_signature(category, train, validation)) == {"category", "train", "validation"}


def _wrong_size_mask(folder: Path) -> tuple[Path, str]:
    return _png(folder / "validation_ground_truth" / "crack" / "v1_mask.png", 255, (SIZE + 1, SIZE)), "resize or replace"


def _orphan_mask(folder: Path) -> tuple[Path, str]:
    return _png(folder / "validation_ground_truth" / "crack" / "v9_mask.png", 255), "has no image"


def _mask_folder_without_images(folder: Path) -> tuple[Path, str]:
    return _png(folder / "validation_ground_truth" / "scuff" / "s0_mask.png", 255), "has no image"


def _empty_defect_folder(folder: Path) -> tuple[Path, str]:
    empty = folder / "validation" / "scratch"
    empty.mkdir(parents=True)
    return empty, "holds no images"


@pytest.mark.parametrize("break_it", [_wrong_size_mask, _orphan_mask, _mask_folder_without_images,
                                      _empty_defect_folder])
def test_bad_validation_defects_name_the_file_and_the_fix(tmp_path: Path, break_it) -> None:
    folder = _category(tmp_path)
    culprit, says = break_it(folder)
    with pytest.raises(DataError) as error:
        load_category(tmp_path, "part", require_test=False)
    message = str(error.value)
    assert str(culprit.absolute()) in message and says in message
    assert "remove" in message or "resize" in message  # the fix


def test_orphan_mask_says_where_its_image_belongs(tmp_path: Path) -> None:
    folder = _category(tmp_path)
    _png(folder / "validation_ground_truth" / "scuff" / "s0_mask.png", 255)
    with pytest.raises(DataError, match=r"expected .*validation/scuff/s0 with an image suffix"):
        load_category(tmp_path, "part")


# --------------------------------------------------------------------------- the evidence itself


def _real(has_mask: list[bool], masks: np.ndarray):
    from dualstpm.real_defects import RealDefects

    return RealDefects((), None, masks, np.asarray(has_mask))


def test_a_defect_without_a_mask_adds_image_evidence_only() -> None:
    good_maps = np.array([[[0.1, 0.2], [0.3, 0.4]]], np.float32)
    defect_maps = np.array([[[0.9, 0.1], [0.1, 0.1]],  # masked: its defect pixel is (0, 0)
                            [[5.0, 5.0], [5.0, 5.0]]], np.float32)  # unmasked: hot everywhere
    masks = np.zeros((2, 2, 2), bool)
    masks[0, 0, 0] = True
    real = _real([True, False], masks)
    figures = real.auroc(np.array([0.4]), good_maps, np.array([0.9, 5.0]), defect_maps)
    # image: both defects (0.9, 5.0) above the good image (0.4): 2 of 2 pairs
    # pixel: the one defect pixel (0.9) above all 7 other pixels of the good and the masked
    # image; the unmasked image's 5.0s would rank above it (7 / 11) if they counted as good pixels
    assert figures == {"image_auroc": 1.0, "pixel_auroc": 1.0}
    assert _real([False, False], masks).auroc(np.array([0.4]), good_maps, np.array([0.3, 5.0]), defect_maps) == {
        "image_auroc": 0.5}  # image-level only: 0.3 < 0.4 < 5.0


# --------------------------------------------------------------------------- epoch selection


def _stats(good: list[float], maps_size: int = 2) -> dict[str, np.ndarray]:
    scores = np.asarray(good, np.float32)
    maps = np.zeros((len(good), maps_size, maps_size), np.float32)
    return {"score": scores, "map_mean": scores / 2, "maps": maps}


#: (branch, epoch) -> (good image scores, real defect scores), made so that the good-image
#: rule (lowest mean good score) and the real defects choose different epochs per branch
EPOCHS = {
    ("stpm", 1): ([0.1, 0.2], [0.05, 0.15]),  # mean good 0.15; AUROC 1/4 (only 0.15 > 0.1)
    ("stpm", 2): ([0.4, 0.6], [0.7, 0.9]),  # mean good 0.50; AUROC 1
    ("recon", 1): ([0.4, 0.6], [0.7, 0.9]),  # mean good 0.50; AUROC 1
    ("recon", 2): ([0.1, 0.2], [0.0, 0.05]),  # mean good 0.15; AUROC 0
}


def _select_two_epochs(tiny_params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                       with_real: bool) -> tuple[dict[str, int], list[dict[str, float]]]:
    """Run `Trainer.select` after two epochs whose statistics are `EPOCHS` (the network's maps
    replaced by them); (the epoch each branch keeps, the two history records)."""
    import torch

    from dualstpm import training
    from dualstpm.compute import Compute
    from dualstpm.real_defects import RealDefects

    good_images, defect_images = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    real = RealDefects((), defect_images, np.zeros((2, 2, 2), bool), np.zeros(2, bool)) if with_real else None
    trainer = training.Trainer(tiny_params, tmp_path, Compute.resolve("cpu", "float32"), {}, real=real)

    def statistics(model, images, spec, batch_size, compute, keep_maps=False, tiling=None):
        which = 1 if images is defect_images else 0
        return {b: _stats(EPOCHS[(b, trainer.epochs_done)][which]) for b in ("stpm", "recon")}

    monkeypatch.setattr(training, "branch_statistics", statistics)
    records = []
    for epoch in (1, 2):
        trainer.epochs_done = epoch
        records.append(trainer.select(good_images))
    return {b: trainer.best[b]["epoch"] for b in ("stpm", "recon")}, records


def test_epoch_selection_follows_the_real_defects_where_good_images_disagree(
        tiny_params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kept, records = _select_two_epochs(tiny_params, tmp_path, monkeypatch, with_real=False)
    assert kept == {"stpm": 1, "recon": 2}  # the good-image rule: the lowest mean good score
    assert not any(k.startswith("val_real") for k in records[0])  # no real defects: the history as before

    kept, records = _select_two_epochs(tiny_params, tmp_path, monkeypatch, with_real=True)
    assert kept == {"stpm": 2, "recon": 1}  # the best image AUROC on the real defects
    assert records[0]["val_real_image_auroc_stpm"] == 0.25 and records[1]["val_real_image_auroc_stpm"] == 1.0
    assert records[1]["val_real_image_auroc_recon"] == 0.0
    assert "val_real_pixel_auroc_stpm" not in records[0]  # no mask: no pixel evidence


# --------------------------------------------------------------------------- the ablation's choice


def _mapsets(n_good: int = 4, n_defects: int = 4, size: int = 4):
    """Hand-made stored maps: good images with every map in [0.5, 1); synthetic copies hot
    (in [2, 3) at their masked pixel on all levels) in branch A and cold ([0.1, 0.2)) in
    branch B; real defects the other way round. Real defect 0 has no mask and is hot
    everywhere in branch B."""
    from dualstpm.maps import MapSet

    rng = np.random.default_rng(0)
    meta = {"category": "part", "image_size": size, "weights_sha256": "x"}

    def stack(n: int, hot_branch: int | None, cold_branch: int | None, masks: np.ndarray) -> np.ndarray:
        maps = rng.uniform(0.5, 1.0, (n, 2, 3, size, size)).astype(np.float16)
        if cold_branch is not None:
            maps[:, cold_branch] = rng.uniform(0.1, 0.2, (n, 3, size, size))
        for i in range(n):
            if hot_branch is not None:
                maps[i, hot_branch][:, masks[i]] = rng.uniform(2.0, 3.0, (3, int(masks[i].sum())))
        return maps

    masks = np.zeros((n_defects, size, size), bool)
    masks[:, 1, 2] = True
    good = MapSet(stack(n_good, None, None, np.zeros((n_good, size, size), bool)), np.zeros(n_good, np.int8),
                  np.full(n_good, "good"), np.array([f"g{i}.png" for i in range(n_good)]), None, {**meta, "split": "val"})
    synthetic = MapSet(stack(n_defects, 0, 1, masks), np.ones(n_defects, np.int8), np.full(n_defects, "cutpaste"),
                       np.array([f"g{i}.png" for i in range(n_defects)]), masks, {**meta, "split": "val_synthetic"})
    real_masks = masks.copy()
    real_masks[0] = False
    hot = masks.copy()
    hot[0] = True  # the unmasked defect: hot everywhere in branch B
    with_mask = [False] + [True] * (n_defects - 1)
    real = MapSet(stack(n_defects, 1, 0, hot), np.ones(n_defects, np.int8), np.full(n_defects, "crack"),
                  np.array([f"v{i}.png" for i in range(n_defects)]), real_masks,
                  {**meta, "split": "val_defects", "with_mask": with_mask})
    return good, synthetic, real


def test_the_ablation_chooses_and_adopts_on_real_defects_where_synthetic_ones_disagree() -> None:
    from dualstpm.ablation.evidence import real_evidence, synthetic_evidence
    from dualstpm.ablation.grid import Config
    from dualstpm.ablation.margin import pixel_auroc
    from dualstpm.ablation.rescore import score_grid
    from dualstpm.ablation.run import adoption_margin
    from dualstpm.ablation.selection import choose
    from dualstpm.config import AblationParams
    from dualstpm.model.fusion import MAX_SCORE, FusionSpec
    from dualstpm.model.inference import MapViews

    good, synthetic, real = _mapsets()
    a, b = FusionSpec("product", ((1.0,) * 3, (0.0,) * 3)), FusionSpec("product", ((0.0,) * 3, (1.0,) * 3))
    configs = [Config("branch_A", "named", a), Config("branch_B", "named", b)]
    views = MapViews(a, None, score=MAX_SCORE)
    params = AblationParams(bootstrap=200)

    on_synthetic, on_real = synthetic_evidence(good, synthetic), real_evidence(good, real)
    tables = {name: score_grid(configs, {"val": evidence.scorer(views)}, workers=1)
              for name, evidence in (("synthetic", on_synthetic), ("real", on_real))}
    # synthetic copies are hot in A, cold in B; real defects the other way round: product of
    # three levels, a hot pixel >= 8 and every good pixel < 1, a cold image < 0.008
    assert list(tables["synthetic"]["val_image_auroc"]) == [1.0, 0.0]
    assert list(tables["real"]["val_image_auroc"]) == [0.0, 1.0]
    assert choose(tables["synthetic"], "image_auroc") == 0 and choose(tables["real"], "image_auroc") == 1
    # pixel evidence from the masked real defects only: the unmasked one's hot pixels are not counted as good
    assert tables["real"]["val_pixel_auroc"].iloc[1] == 1.0
    assert pixel_auroc(on_real.contributions(views, b), np.ones(8)) == pytest.approx(1.0)
    # adoption: B over the default A on the real defects, with 8 units (>= 5) every resample favours B
    assert adoption_margin(on_real, views, a, b, params).adopted
    assert not adoption_margin(on_synthetic, views, a, b, params).adopted
    assert on_real.describe() == {"validation_evidence": "real: 4 images of 1 defect type",
                                  "normal_validation_images": 4, "real_defects": 4, "real_defects_with_masks": 3,
                                  "defect_types": {"crack": 4}}
    assert on_synthetic.describe() == {"validation_evidence": "synthetic", "normal_validation_images": 4,
                                       "synthetic_defects": 4}


# --------------------------------------------------------------------------- fit, test and ablate


def test_fit_test_and_ablate_record_the_real_evidence(synthetic_root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    """A category with real validation defects (taken from another category's test set, so
    they are not this one's test images): the epochs and the ablation's choice use them,
    and calibration.json, metrics.json and summary.json say so."""
    from dualstpm.ablation import ablate
    from dualstpm.config import load_params
    from dualstpm.evaluation import test_run
    from dualstpm.training import HISTORY_FILE, fit

    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "synth_texture", root / "synth_texture")
    donor = synthetic_root / "synth_object"
    kind = min(p.name for p in (donor / "test").iterdir() if p.name != "good")
    category = root / "synth_texture"
    (category / "validation" / "crack").mkdir(parents=True)
    (category / "validation_ground_truth" / "crack").mkdir(parents=True)
    for name in ("000", "001"):
        shutil.copy(donor / "test" / kind / f"{name}.png", category / "validation" / "crack" / f"{name}.png")
    shutil.copy(donor / "ground_truth" / kind / "000_mask.png", category / "validation_ground_truth" / "crack")
    small_grid = ["ablation.branch_weight_step=0.5", "ablation.panel_images=0", "ablation.normalizations=[none]",
                  "ablation.level_subsets=[[1]]", "ablation.level_modes=[sum]", "ablation.sweep_modes=[sum]",
                  "ablation.bootstrap=50"]
    params = load_params(None, [*TINY_OVERRIDES, *small_grid])
    run = tmp_path / "run"

    fit(params, root, "synth_texture", run)
    printed = capsys.readouterr()
    assert "validation AUROC on real defects (real: 2 images of 1 defect type" in printed.out + printed.err
    calibration = json.loads((run / "model" / "calibration.json").read_text())["validation_evidence"]
    assert calibration["evidence"] == "real: 2 images of 1 defect type" and calibration["with_masks"] == 1
    assert calibration["epoch_selection"] == "real defects: the best mean of image AUROC and pixel AUROC"
    assert set(calibration["views"]) == {"stpm", "recon", "fused"}
    assert set(calibration["views"]["fused"]) == {"image_auroc", "pixel_auroc"}
    header = (run / HISTORY_FILE).read_text().splitlines()[0].split(",")
    assert {"val_real_image_auroc_stpm", "val_real_pixel_auroc_recon"} <= set(header)

    result = test_run(run, root, "synth_texture", device="cpu")
    assert result["calibration"]["validation_evidence"]["evidence"] == "real: 2 images of 1 defect type"
    assert result["n_test_images"] == len(list((category / "test").glob("*/*.png")))  # the test split alone
    summary = ablate(run, params.ablation).summary
    assert summary["selection_set"]["validation_evidence"] == "real: 2 images of 1 defect type"
    assert summary["selection_set"]["real_defects"] == 2 and summary["selection_set"]["real_defects_with_masks"] == 1
    assert not (run / "maps" / "val_synthetic.npz").exists()  # nothing pasted: the real defects decided
    assert "real defects" in summary["fused_chosen"]["note"]

    # the folder removed and the run tested again: its stored real-defect maps go (the ablation then pastes)
    shutil.rmtree(category / "validation")
    shutil.rmtree(category / "validation_ground_truth")
    test_run(run, root, "synth_texture", device="cpu")
    assert not (run / "maps" / "val_defects.npz").exists()
