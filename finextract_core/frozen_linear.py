"""Linear maps with fixed weights whose inputs need gradients, computed through oneDNN on the CPU.

Caption inversion differentiates a frozen text encoder with respect to its input embeddings at every search step, a
few rows at a time (restarts x prompt positions), and projects those embeddings onto the vocabulary. On the CPU,
``F.linear`` in float32 runs through the BLAS PyTorch was built with (MKL in the official wheels); on the project's
AMD EPYC machine that BLAS is 2-4x slower for such few-row products than oneDNN, the kernel library PyTorch also ships
(``torch.ops.mkldnn``, which its compiler uses for CPU linear layers). ``FrozenLinear`` reorders its weight once into
oneDNN's blocked layout and computes ``x W^T + b`` with it, and the input's gradient ``g W`` from the plain weight:
both in float32, the same sums in another order (results agree to float32 rounding). Nothing is computed for the
weight, which never gets a gradient.

Where oneDNN does not serve (a GPU, a PyTorch built without it or with ``torch.backends.mkldnn.enabled`` off when
the map is made, ARM builds whose oneDNN runs on ACL, weights or inputs that are not float32) it is ``F.linear``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _onednn_serves(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and not torch.ops.mkldnn._is_mkldnn_acl_supported()
    )


def _onednn_linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``inputs @ weight.T + bias`` by oneDNN; ``weight`` may be a plain ``[out, in]`` tensor, a view, or reordered."""
    return torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), weight, bias, "none", [], "")


class _OneDnnLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, weight, reordered_weight, bias):
        ctx.save_for_backward(weight)
        return _onednn_linear(inputs, reordered_weight, bias)

    @staticmethod
    def backward(ctx, output_gradient):
        (weight,) = ctx.saved_tensors
        # The gradient of x W^T + b with respect to x is g W: a linear map whose weight is W^T, read in place.
        return _onednn_linear(output_gradient, weight.T, None), None, None, None


class FrozenLinear:
    """``x W^T + b`` for a fixed ``weight [out, in]`` and optional ``bias [out]``, differentiable in ``x`` only.

    Off the oneDNN path the weights follow the input's device and dtype, as ``F.linear`` of ``weight.to(x)``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        # Autograd cannot save inference tensors (ComfyUI loads weights under inference mode) for the backward.
        self.weight = weight.detach().clone() if weight.is_inference() else weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.reordered_weight = (
            torch.ops.mkldnn._reorder_linear_weight(self.weight) if _onednn_serves(self.weight) else None
        )

    @property
    def uses_onednn(self) -> bool:
        return self.reordered_weight is not None

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.uses_onednn and inputs.dtype == torch.float32 and inputs.device.type == "cpu":
            return _OneDnnLinear.apply(inputs, self.weight, self.reordered_weight, self.bias)
        return F.linear(inputs, self.weight.to(inputs), None if self.bias is None else self.bias.to(inputs))
