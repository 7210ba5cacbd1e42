"""The leak test of branch B's attention gates (studies/leak.py, issue 11): with its own
guides it gives the inference maps, and its figures are the means and AUROCs of the maps
with own and with normal guides, recomputed here by hand."""

from __future__ import annotations

import pytest
import torch

from dualstpm.config import ModelParams
from dualstpm.detector import build_network
from dualstpm.model.torch_model import DualStpmModel
from studies.leak import leak_test, recon_maps_with_guides

pytestmark = pytest.mark.filterwarnings("ignore:teacher .* has RANDOM weights")


def tiny_model(**extra: str) -> DualStpmModel:
    """The dual network with random Lite0/Lite2 teachers (nothing to load), seeded; `extra`: model.* params."""
    torch.manual_seed(0)
    teachers = {"t1": {"name": "tf_efficientnet_lite0", "weights": "random"},
                "t2": {"name": "tf_efficientnet_lite2", "weights": "random"}}
    return build_network(ModelParams.model_validate({**teachers, **extra}))


@pytest.fixture(scope="module")
def leak_data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(4, 3, 64, 64, generator=generator)
    masks = torch.zeros(4, 64, 64, dtype=torch.bool)
    masks[0, 8:24, 8:24] = True
    masks[1, 30:50, 20:40] = True
    return {"images": images, "masks": masks, "normal": torch.rand(2, 3, 64, 64, generator=generator)}


def test_own_guides_give_the_inference_maps(leak_data):
    model = tiny_model().eval()
    images = leak_data["images"]
    with torch.no_grad():
        assert torch.equal(recon_maps_with_guides(model, images, images), model(images)[:, 1])
    with pytest.raises(ValueError, match="eval mode"):
        recon_maps_with_guides(model.train(), images, images)
    with pytest.raises(ValueError, match="shape of images"):
        recon_maps_with_guides(model.eval(), images, images[:1])


def test_leak_test_compares_own_and_normal_guides(leak_data):
    model = tiny_model().eval()
    images, masks, normal = leak_data["images"], leak_data["masks"], leak_data["normal"]
    result = leak_test(model, images, masks, normal, batch_size=3)
    assert (result["images"], result["defect_pixels"]) == (4, 16 * 16 + 20 * 20)
    # by hand: test image i is guided by normal image i mod 2
    own = recon_maps_with_guides(model, images, images)
    guided = recon_maps_with_guides(model, images, normal[[0, 1, 0, 1]])
    for level, name in enumerate(("stride4", "stride8", "stride16")):
        row = result["levels"][name]
        assert row["defect_mean_own"] == pytest.approx(own[:, level][masks].double().mean().item(), rel=1e-6)
        assert row["defect_mean_normal"] == pytest.approx(guided[:, level][masks].double().mean().item(), rel=1e-6)
        assert row["defect_mean_difference"] == row["defect_mean_normal"] - row["defect_mean_own"]
        assert row["good_mean_own"] == pytest.approx(own[:, level][~masks].double().mean().item(), rel=1e-6)
        assert row["good_mean_normal"] == pytest.approx(guided[:, level][~masks].double().mean().item(), rel=1e-6)
        assert row["contrast_difference"] == pytest.approx(
            (row["defect_mean_normal"] - row["good_mean_normal"]) - (row["defect_mean_own"] - row["good_mean_own"]))
        assert row["pixel_auroc_difference"] == row["pixel_auroc_normal"] - row["pixel_auroc_own"]
        assert 0 <= row["pixel_auroc_own"] <= 1
    stride16 = result["levels"]["stride16"]  # taken before the first gate: the guides cannot reach it
    assert stride16["defect_mean_difference"] == 0 and stride16["pixel_auroc_difference"] == 0
    assert stride16["contrast_difference"] == 0
    assert result["levels"]["stride4"]["defect_mean_difference"] != 0  # the gates do shape the finer levels


def test_without_attention_the_guides_change_nothing(leak_data):
    model = tiny_model(attention="none").eval()
    images, masks, normal = leak_data["images"], leak_data["masks"], leak_data["normal"]
    assert torch.equal(recon_maps_with_guides(model, images, images), recon_maps_with_guides(model, images, normal[[0, 1, 0, 1]]))
    for row in leak_test(model, images, masks, normal)["levels"].values():
        assert row["defect_mean_own"] == row["defect_mean_normal"] and row["pixel_auroc_own"] == row["pixel_auroc_normal"]
        assert row["contrast_difference"] == 0


def test_leak_test_refuses_masks_without_both_classes(leak_data):
    model = tiny_model().eval()
    with pytest.raises(ValueError, match="both defect and good pixels"):
        leak_test(model, leak_data["images"], torch.zeros(4, 64, 64, dtype=torch.bool), leak_data["normal"])
    with pytest.raises(ValueError, match=r"masks must be \(N, H, W\)"):
        leak_test(model, leak_data["images"], leak_data["masks"][:2], leak_data["normal"])
