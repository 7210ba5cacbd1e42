"""The discriminative stage (issue 11, item 3; METHOD.md §5b): network, training, its
no-test-data guarantee, the saved model, evaluation rows, export and the decision view."""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_OVERRIDES

from dualstpm import disc_training
from dualstpm.ablation.defects import paste_defects
from dualstpm.compute import Compute
from dualstpm.config import DiscParams, load_params
from dualstpm.data import (
    decode_images,
    load_category,
    split_train_val,
    validation_parts,
)
from dualstpm.detector import Detector
from dualstpm.errors import ConfigError, RunError
from dualstpm.evaluation import evaluate_detector
from dualstpm.model.discriminator import LOG_EPS, Discriminator, pooled_log
from dualstpm.rundir import DISC_HISTORY_FILE, DISC_WEIGHTS_FILE
from dualstpm.training import training_signature

pytestmark = pytest.mark.filterwarnings("ignore")
DISC_OVERRIDES = [*TINY_OVERRIDES, "fit.epochs=1", "fit.discriminator=true", "disc.epochs=2", "fusion.view=disc"]


# --- the network ------------------------------------------------------------------------------

def test_shapes_and_the_stride_four_input():
    disc = Discriminator(width=8)
    maps = torch.rand(2, 2, 3, 64, 64)
    assert pooled_log(maps).shape == (2, 6, 16, 16)
    assert disc(maps).shape == (2, 64, 64)
    with pytest.raises(ValueError, match="multiples of 4"):
        disc(torch.rand(1, 2, 3, 62, 64))


def test_prepare_is_zero_where_every_map_is_at_its_scale():
    """x = avgpool(log(m + eps)) - log(s): maps equal to s give log(1 + eps / s) ~ eps / s."""
    scale = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    disc = Discriminator(width=4, map_scale=scale)
    maps = scale[None, :, :, None, None].expand(1, 2, 3, 8, 8)
    expected = torch.log1p(LOG_EPS / scale).reshape(1, 6, 1, 1).expand(1, 6, 2, 2)
    torch.testing.assert_close(disc.prepare(maps), expected, rtol=0, atol=1e-6)


def test_loss_by_hand():
    """logits 0 (p = 0.5), targets 0 on 4 cells: focal = 0.5^2 * ln 2 per cell; dice =
    1 - (0 + 1) / (4 * 0.5 + 0 + 1) = 2/3."""
    loss = disc_training._loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    assert loss.item() == pytest.approx(0.25 * math.log(2) + 2 / 3, rel=1e-6)


def test_texture_defects_change_only_their_mask_and_are_seeded():
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out, masks, kinds = paste_defects(images, ["texture"], 2, seed=5)
    assert out.shape == (6, 3, 64, 64) and masks.shape == (6, 64, 64) and kinds == ["texture"] * 6
    for k in range(6):
        source = images[k // 2]
        outside = torch.from_numpy(~masks[k])
        assert torch.equal(out[k][:, outside], source[:, outside])
        assert 0.015 <= masks[k].mean() <= 0.16  # the blob's 2-15 % (quantile of a continuous field)
        assert not torch.equal(out[k], source)
    again, masks_again, _ = paste_defects(images, ["texture"], 2, seed=5)
    assert torch.equal(again, out) and np.array_equal(masks_again, masks)


# --- training ---------------------------------------------------------------------------------

def _fake_maps(images: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the frozen model: each map = |image - 0.5| averaged over channels."""
    level = (images - 0.5).abs().mean(dim=1)
    return level[:, None, None].expand(-1, 2, 3, -1, -1).contiguous()


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    images = torch.rand(10, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    params = DiscParams(epochs=2, width=8, batch_size=4)
    state = torch.random.get_rng_state()
    first = disc_training.train_discriminator(_fake_maps, images[:8], images[8:], params, seed=3, batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = disc_training.train_discriminator(_fake_maps, images[:8], images[8:], params, seed=3, batch_size=4)
    for name, value in first.module.state_dict().items():
        assert torch.equal(value, second.module.state_dict()[name]), name
    assert [h["loss"] for h in first.history] == [h["loss"] for h in second.history]
    assert 1 <= first.selected_epoch <= 2 and first.seconds > 0
    # the scale s is the mean of the clean training images' maps
    expected = _fake_maps(images[:8]).double().mean(dim=(0, 3, 4)).float()
    torch.testing.assert_close(first.module.map_scale, expected)


# --- a fit with the stage ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def disc_fit(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path):
    """A fit with fit.discriminator=true deciding with `disc`, recording every image file read
    during the whole fit and during the discriminative stage, and the tensors the stage got."""
    from dualstpm import training
    from dualstpm.data import tensors

    params = load_params(None, DISC_OVERRIDES)
    run_dir = tmp_path_factory.mktemp("disc") / "synth_texture"
    read: list[Path] = []
    during_disc: list[Path] = []
    received: dict[str, torch.Tensor] = {}
    real_read, real_train = tensors.read_image, training.train_discriminator
    in_stage = []

    def recording_read(path, *args, **kwargs):
        (during_disc if in_stage else read).append(Path(path))
        return real_read(path, *args, **kwargs)

    def recording_train(maps_of, train_images, val_images, *args, **kwargs):
        received.update(train=train_images, val=val_images)
        in_stage.append(True)
        try:
            return real_train(maps_of, train_images, val_images, *args, **kwargs)
        finally:
            in_stage.clear()

    said = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stderr(said):
        patch.setattr(tensors, "read_image", recording_read)
        patch.setattr(training, "train_discriminator", recording_train)
        result = training.fit(params, synthetic_root, "synth_texture", run_dir)
    return {"params": params, "run_dir": run_dir, "result": result, "read": read, "during_disc": during_disc,
            "received": received, "said": " ".join(said.getvalue().split())}


def test_the_stage_never_sees_test_or_validation_defects(disc_fit, synthetic_root: Path):
    """The stage reads no file at all (it gets tensors); what it trains on is exactly the
    decoded training split, what selects it exactly the good validation split; the whole
    fit never opens a test image or a mask."""
    assert disc_fit["during_disc"] == []
    assert disc_fit["read"], "the instrumentation saw no read at all"
    category_root = synthetic_root / "synth_texture"
    for path in disc_fit["read"]:
        parts = path.resolve().relative_to(category_root.resolve()).parts
        assert parts[0] in ("train", "validation") and parts[1] == "good", path
        assert "test" not in parts and "ground_truth" not in parts, path
    params = disc_fit["params"]
    train_paths, val_paths = split_train_val(load_category(synthetic_root, "synth_texture"), params.fit.val_fraction,
                                             params.seed)
    assert torch.equal(disc_fit["received"]["train"], decode_images(train_paths, params.image_size))
    selection = validation_parts(len(val_paths), params.calibration.split, params.seed).selection  # never the calibration part
    assert torch.equal(disc_fit["received"]["val"], decode_images(val_paths, params.image_size)[selection])
    assert not set(train_paths) & set(val_paths)


def test_fit_records_the_stage_and_evaluation_reports_it(disc_fit, synthetic_root: Path):
    run_dir, result = disc_fit["run_dir"], disc_fit["result"]
    assert (run_dir / "model" / DISC_WEIGHTS_FILE).is_file() and (run_dir / DISC_HISTORY_FILE).is_file()
    assert result.disc_seconds is not None and result.disc_seconds > 0
    assert "disc" in result.thresholds
    # the fit's last line names the view the model decides with and that view's threshold, not fused's
    disc_threshold, fused_threshold = f"{result.thresholds['disc']:.5g}", f"{result.thresholds['fused']:.5g}"
    assert disc_threshold != fused_threshold
    assert f"decides with `disc`, threshold {disc_threshold})" in disc_fit["said"]
    detector = Detector.load(run_dir, Compute.resolve("cpu", "float32"))
    assert detector.calibration.discriminator["train_seconds"] == pytest.approx(result.disc_seconds)
    assert detector.views == ("fused", "stpm", "recon", "disc") and detector.decision_view == "disc"
    metrics = evaluate_detector(detector, synthetic_root, "synth_texture")
    assert metrics["default"] == "disc"
    for view in ("fused", "stpm", "recon", "disc"):
        assert metrics[view]["image_auroc"] is not None and metrics[view]["threshold"] == detector.thresholds[view]


def test_the_decision_view_is_what_the_model_outputs(disc_fit, synthetic_root: Path):
    detector = Detector.load(disc_fit["run_dir"], Compute.resolve("cpu", "float32"))
    images = decode_images([s.path for s in load_category(synthetic_root, "synth_texture").test][:4], 64)
    out = detector.infer(images)
    views = detector.score(images, detector.views)
    assert torch.equal(out.score, views.scores["disc"]) and torch.equal(out.disc_score, views.scores["disc"])
    assert torch.equal(out.anomaly_map, views.maps["disc"]) and torch.equal(out.stpm_score, views.scores["stpm"])
    assert detector.threshold == detector.thresholds["disc"]
    assert torch.equal(out.label, out.score > detector.threshold)


def test_predictions_csv_has_the_stage_score(disc_fit, synthetic_root: Path, tmp_path: Path):
    from dualstpm.predict import predict
    from dualstpm.rundir import PREDICTIONS_FILE

    detector = Detector.load(disc_fit["run_dir"], Compute.resolve("cpu", "float32"))
    paths = [s.path for s in load_category(synthetic_root, "synth_texture").test][:3]
    predict(detector, paths, tmp_path / "pred")
    written = pd.read_csv(tmp_path / "pred" / PREDICTIONS_FILE)
    assert written["disc_score"].notna().all()
    np.testing.assert_array_equal(written["disc_score"], written["score"])  # the model decides with `disc`
    assert not np.array_equal(written["disc_score"], written["stpm_score"])


def test_onnx_export_of_a_model_with_the_stage(disc_fit, synthetic_root: Path, tmp_path: Path):
    pytest.importorskip("onnxruntime")
    from dualstpm.backends import ExportedModel
    from dualstpm.export import export_run

    export_run(disc_fit["run_dir"], "onnx", "fp32", tmp_path / "onnx")
    exported = ExportedModel(tmp_path / "onnx", "onnxruntime")
    assert exported.decision_view == "disc"
    detector = Detector.load(disc_fit["run_dir"], Compute.resolve("cpu", "float32"))
    images = decode_images([s.path for s in load_category(synthetic_root, "synth_texture").test][:4], 64)
    got, want = exported.infer(images), detector.infer(images)
    for name in ("score", "disc_score", "stpm_score", "recon_score"):
        np.testing.assert_allclose(getattr(got, name).numpy(), getattr(want, name).numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=name)
    np.testing.assert_allclose(got.anomaly_map.numpy(), want.anomaly_map.numpy(), rtol=0, atol=1e-3)
    assert torch.equal(got.label.bool(), want.label.bool())
    assert exported.typical_level() == pytest.approx(detector.typical_level())


def test_a_model_without_the_stage_has_no_disc_view(trained_run: Path):
    detector = Detector.load(trained_run, Compute.resolve("cpu", "float32"))
    assert detector.views == ("fused", "stpm", "recon") and detector.decision_view == "fused"
    assert torch.isnan(detector.infer(torch.rand(1, 3, 64, 64)).disc_score).all()
    with pytest.raises(RunError, match="no view 'disc'.*fit.discriminator=true"):
        detector.score(torch.rand(1, 3, 64, 64), ("disc",))


# --- params -------------------------------------------------------------------------------------

def test_fusion_view_disc_without_the_stage_is_refused():
    with pytest.raises(ConfigError, match="fit.discriminator=true"):
        load_params(None, ["fusion.view=disc"])
    assert load_params(None, ["fusion.view=disc", "fit.discriminator=true"]).fusion.view == "disc"
    with pytest.raises(ConfigError, match="disc.kinds"):
        load_params(None, ["disc.kinds=[blur]"])
    with pytest.raises(ConfigError, match="disc.epochs"):
        load_params(None, ["disc.epochs=0"])


def test_the_stage_does_not_change_what_the_branch_epochs_compute():
    """A fit may be resumed with the stage switched on or its knobs changed: it runs after the epochs."""
    base = load_params(None, TINY_OVERRIDES)
    changed = load_params(None, [*TINY_OVERRIDES, "fit.discriminator=true", "disc.epochs=5", "disc.width=8"])
    assert training_signature(base) == training_signature(changed)
