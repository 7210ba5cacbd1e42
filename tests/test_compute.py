"""Device and precision choice: explicit choices are kept, `auto` follows the hardware."""

import pytest
import torch

from dualstpm.compute import Compute, native_bfloat16, resolve_precision
from dualstpm.config import load_params
from dualstpm.errors import RunError
from dualstpm.model.loss import distance_map


def test_explicit_precision_is_kept_and_auto_follows_the_hardware():
    cpu = torch.device("cpu")
    assert resolve_precision("float32", cpu) == torch.float32
    assert resolve_precision("bfloat16", cpu) == torch.bfloat16
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if native_bfloat16(cpu) else torch.float32)


def test_cuda_without_a_gpu_is_an_error_not_a_fallback():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(RunError, match="fit.device=cuda"):
        Compute.resolve("cuda")


def test_bad_precision_names_the_key():
    with pytest.raises(Exception, match="precision"):
        load_params(None, ["fit.precision=half"])


def test_bfloat16_networks_still_give_float32_distances_close_to_float32_ones():
    """Under autocast the networks run in bfloat16; the distance is float32 and close."""
    torch.manual_seed(0)
    conv_t, conv_s = torch.nn.Conv2d(3, 32, 3), torch.nn.Conv2d(3, 32, 3)
    images = torch.rand(2, 3, 32, 32)
    exact = distance_map(conv_t(images), conv_s(images))
    low = Compute(torch.device("cpu"), torch.bfloat16)
    with torch.no_grad(), low.autocast():
        mixed = distance_map(conv_t(images), conv_s(images))
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=0.05, atol=0.02)
    assert not torch.equal(mixed, exact)  # autocast really ran in bfloat16
