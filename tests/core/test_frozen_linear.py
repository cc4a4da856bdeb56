"""FrozenLinear against float64 F.linear and autograd (the independent reference), on the oneDNN path and off it."""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from finextract_core.frozen_linear import FrozenLinear
from fixtures.caption_trials import onednn_enabled

pytestmark = pytest.mark.usefixtures("one_torch_thread")

X86_WITH_ONEDNN = platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


def reference(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, probe: torch.Tensor):
    """Output and input gradient of ``(probe * linear(x)).sum()`` by F.linear and autograd in float64."""
    inputs = inputs.detach().double().requires_grad_(True)
    output = F.linear(inputs, weight.double(), None if bias is None else bias.double())
    (gradient,) = torch.autograd.grad((probe.double() * output).sum(), inputs)
    return output.detach(), gradient


def layouts(generator):
    """Inputs as the encoder makes them: batched rows, a transposed (non-contiguous) view, a 2-d matrix."""
    yield torch.randn(4, 5, 96, generator=generator, requires_grad=True)
    yield torch.randn(4, 96, 5, generator=generator, requires_grad=True).transpose(1, 2)
    yield torch.randn(7, 96, generator=generator, requires_grad=True)


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_output_and_input_gradient_equal_float64_linear(onednn, with_bias):
    generator = torch.Generator().manual_seed(int(onednn) * 2 + int(with_bias))
    weight = torch.randn(160, 96, generator=generator) / 10
    bias = torch.randn(160, generator=generator) if with_bias else None
    with onednn_enabled(onednn):
        linear = FrozenLinear(weight, bias)
    assert linear.uses_onednn == (onednn and X86_WITH_ONEDNN)
    for inputs in layouts(generator):
        probe = torch.randn(*inputs.shape[:-1], 160, generator=generator)
        expected_output, expected_gradient = reference(inputs, weight, bias, probe)
        output = linear(inputs)
        (gradient,) = torch.autograd.grad((probe * output).sum(), inputs)
        assert output.dtype == gradient.dtype == torch.float32
        for actual, expected in ((output, expected_output), (gradient, expected_gradient)):
            assert torch.allclose(actual.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_the_weight_never_gets_a_gradient_and_inference_weights_serve():
    generator = torch.Generator().manual_seed(5)
    with torch.inference_mode():  # as ComfyUI loads its models
        weight = torch.randn(32, 16, generator=generator)
    linear = FrozenLinear(weight)
    assert not linear.weight.requires_grad and not linear.weight.is_inference()
    rows = torch.randn(3, 16, generator=generator, requires_grad=True)
    linear(rows).square().sum().backward()
    assert rows.grad is not None and linear.weight.grad is None


def test_other_dtypes_take_f_linear_with_the_weights_converted():
    generator = torch.Generator().manual_seed(6)
    weight, bias = torch.randn(8, 4, generator=generator), torch.randn(8, generator=generator)
    rows = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    assert torch.equal(FrozenLinear(weight, bias)(rows), F.linear(rows, weight.double(), bias.double()))
    assert not FrozenLinear(weight.double()).uses_onednn
