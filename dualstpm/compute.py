"""Where and in what number format the networks run: device, precision, memory layout.

One place, so that training, inference, the benchmark's floor and the anomalib
comparison all run the networks the same way.

- **Device**: `fit.device=auto` picks the GPU when there is one; `cuda` without one is an
  error, not a fallback. Inference chooses its own (`--device`, default `auto`): a model
  trained on a GPU is tested and served on a CPU-only machine.
- **Precision**: `fit.precision=auto` runs the convolutions in bfloat16 (autocast) on a
  GPU and on a CPU with native bfloat16 units (AVX512-BF16 or AMX, as oneDNN reports),
  where it is about twice as fast; elsewhere float32, because emulated bfloat16 is slower
  than float32. The anomaly distances are computed in float32 either way
  (`dualstpm.model.loss.distance_map`). Only *training* runs in it: calibration (map
  statistics, thresholds, the normalised score's validation minimum) and PyTorch inference
  run in float32 (:data:`INFERENCE_PRECISION`), the precision of the float32 ONNX/OpenVINO
  exports, so one stored threshold decides the same way on every backend.
- **Layout**: channels_last, which oneDNN and tensor cores both run faster (1.7x for an
  EfficientNet student's training step on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dualstpm.config import Precision
from dualstpm.errors import ConfigError, RunError

MEMORY_FORMAT = torch.channels_last


DEVICES = ("auto", "cpu", "cuda")
#: The precision of calibration and of PyTorch inference (test, predict, the pyfunc, ablation):
#: a stored threshold is valid for the precision its validation scores were computed in.
INFERENCE_PRECISION = "float32"


def resolve_device(choice: str) -> torch.device:
    """`auto` picks the GPU when there is one; `cuda` without one is an error, not a fallback.
    Raises ConfigError for a name other than auto, cpu or cuda, RunError for cuda without one."""
    if choice not in DEVICES:
        raise ConfigError(f"device {choice!r} is not one of {', '.join(DEVICES)}: choose one of them.")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise RunError("fit.device=cuda (or --device cuda) asks for a GPU, but no CUDA device is visible; "
                       "use auto or cpu")
    return torch.device(choice)


def native_bfloat16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 in hardware (else autocast would only emulate it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(choice: Precision, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the hardware has it, else float32; an explicit choice is kept."""
    if choice == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return torch.bfloat16 if choice == "bfloat16" else torch.float32


@dataclass(frozen=True)
class Compute:
    """A device and the precision the networks run in there."""

    device: torch.device
    dtype: torch.dtype = torch.float32

    @classmethod
    def resolve(cls, device: str = "auto", precision: Precision = "auto") -> Compute:
        where = resolve_device(device)
        return cls(where, resolve_precision(precision, where))

    @property
    def precision(self) -> str:
        """`float32` or `bfloat16`, as in params and result files."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def label(self) -> str:
        return f"{self.device.type}, {self.precision}"

    def for_inference(self) -> Compute:
        """The same device in :data:`INFERENCE_PRECISION`: what calibration and serving run in."""
        return Compute(self.device, resolve_precision(INFERENCE_PRECISION, self.device))

    def autocast(self) -> torch.autocast:
        """Mixed precision for the networks' forward passes (a no-op in float32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def images(self, images: Tensor) -> Tensor:
        """A batch on the device, in the networks' memory layout."""
        return images.to(self.device, non_blocking=True).contiguous(memory_format=MEMORY_FORMAT)

    def features(self, feature: Tensor) -> Tensor:
        """A stored (cached) feature map on the device, in the networks' precision and layout:
        what the teachers would have returned."""
        return feature.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=MEMORY_FORMAT)

    def module(self, module: nn.Module) -> nn.Module:
        """Move a network to the device, in the networks' layout (in place; returns it)."""
        return module.to(self.device, memory_format=MEMORY_FORMAT)

    def sync(self) -> None:
        """Wait for queued GPU work, so that a timer measures it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
