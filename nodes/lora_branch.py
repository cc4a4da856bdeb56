"""The LoRA side branch: model guidance on a base + LoRA in one forward of the shared base, as CFG runs.

A LoRA changes a layer's weight W to W + s * up @ down (LoCon: the same on convolutions, optionally with a Tucker
core between down and up). On the activations that is W x + s * up(down(x)): the base layer with a low-rank branch
beside it. Model guidance needs, at every step, the pretrained model (the base) on some rows of the batch and the
fine-tuned model (base + LoRA) on the others. So the base runs once over the whole batch, as CFG's single forward
does, and the branch adds the LoRA's contribution to the fine-tuned rows only. The alternative, ComfyUI's
conditioning hooks, runs the two groups of rows as two forwards and merges the LoRA into the weights and back out
between them (and on hosts with dynamic-VRAM patchers, loads a second, non-dynamic copy of the base for it).

Exact: W x + s up(down(x)) is (W + s up down) x, the weight ComfyUI would merge, up to float rounding.

Which rows are fine-tuned: ComfyUI batches the conds of one step in an order of its own (``calc_cond_batch`` reverses
it), so the branch reads the uuid of each chunk of the batch from the transformer options, in a wrapper around the
model's ``apply_model``, and compares it with the uuids of the fine-tuned branches' conds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import comfy.utils
import comfy.weight_adapter

WRAPPER_KEY = "finextract_lora_side_branch"
_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class NoLowRankForm(ValueError):
    """A patch whose contribution cannot be added to the activations by the side branch (the message says why)."""


@dataclass
class _LowRankTerm:
    """s * up @ down on the output features [start, stop) of a layer (all of them when ``out_slice`` is None)."""

    up: torch.Tensor  # (out, rank)
    down: torch.Tensor  # (rank, in) for linear layers, (rank, in, *kernel) after the Tucker core for convolutions
    mid: torch.Tensor | None  # LoCon's Tucker core (rank, rank, *kernel)
    scale: float
    out_slice: tuple[int, int] | None = None


@dataclass
class _LayerBranch:
    """Every low-rank term and bias difference the fine-tune adds to one Linear or Conv layer of the base."""

    module: torch.nn.Module
    terms: list[_LowRankTerm] = field(default_factory=list)
    bias_terms: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    _prepared: dict = field(default_factory=dict)

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, torch.nn.modules.conv._ConvNd)

    def prepare(self, device, dtype):
        """The terms as one (down, up) pair per output slice (their ranks stacked) and one bias, on ``device``."""
        key = (device, dtype)
        if key not in self._prepared:
            groups: dict = {}
            for term in self.terms:
                down = term.down.to(device=device, dtype=torch.float32)
                if term.mid is not None:
                    # down (b, in), core (a, b, *kernel) -> an effective (a, in, *kernel) convolution.
                    mid = term.mid.to(device=device, dtype=torch.float32)
                    down = torch.einsum("abk,bi->aik", mid.flatten(2), down.flatten(1)).reshape(
                        mid.shape[0], -1, *mid.shape[2:])
                up = term.up.to(device=device, dtype=torch.float32).flatten(1) * term.scale
                downs, ups = groups.setdefault(term.out_slice, ([], []))
                downs.append(down)
                ups.append(up)
            weight_shape = self.module.weight.shape
            branches = []
            for out_slice, (downs, ups) in groups.items():
                down = torch.cat([d.flatten(1) for d in downs])
                up = torch.cat(ups, dim=1)
                if self.is_conv:
                    down = down.reshape(down.shape[0], *weight_shape[1:])
                    up = up.reshape(*up.shape, *([1] * (len(weight_shape) - 2)))
                branches.append((out_slice, down.to(dtype), up.to(dtype)))
            bias = None
            if self.bias_terms:
                bias = sum(strength * diff.to(device=device, dtype=torch.float32) for strength, diff in self.bias_terms)
                bias = bias.to(dtype)
            self._prepared[key] = (branches, bias)
        return self._prepared[key]

    def release(self) -> None:
        self._prepared.clear()

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += the fine-tune's contribution for input x (rows of one chunk), in place."""
        branches, bias = self.prepare(x.device, x.dtype)
        if self.is_conv:
            module = self.module
            conv = _CONV_FUNCTIONS[x.ndim - 2]
            for out_slice, down, up in branches:
                hidden = conv(x, down, None, module.stride, module.padding, module.dilation)
                _narrow(out, 1, out_slice).add_(conv(hidden, up))
            if bias is not None:
                out.add_(bias.view(-1, *([1] * (out.ndim - 2))))
        else:
            for out_slice, down, up in branches:
                _narrow(out, -1, out_slice).add_(F.linear(F.linear(x, down), up))
            if bias is not None:
                out.add_(bias)


def _narrow(tensor: torch.Tensor, dim: int, out_slice: tuple[int, int] | None) -> torch.Tensor:
    return tensor if out_slice is None else tensor.narrow(dim, out_slice[0], out_slice[1] - out_slice[0])


class SideBranch:
    """The fine-tune's patches as branches beside the base layers, added to the rows of the fine-tuned conds."""

    def __init__(self, layers: dict[str, _LayerBranch]):
        self.layers = layers
        self.fine_tuned_uuids: frozenset = frozenset()
        self._rows: list[tuple[int, int]] | None = None
        self._batch = 0

    @contextlib.contextmanager
    def attached(self):
        """The branches hooked onto the base layers for one sampling run; removed (and their device copies freed) after."""
        handles = [layer.module.register_forward_hook(self._hook_for(layer)) for layer in self.layers.values()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for layer in self.layers.values():
                layer.release()
            self._rows = None

    def apply_model_wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
                            **kwargs):
        """Around ComfyUI's ``apply_model``: marks which rows of this batch belong to fine-tuned conds."""
        uuids = transformer_options.get("uuids") or []
        rows = []
        if uuids and x.shape[0] % len(uuids) == 0:
            chunk = x.shape[0] // len(uuids)
            for index, uuid in enumerate(uuids):
                if uuid not in self.fine_tuned_uuids:
                    continue
                if rows and rows[-1][1] == index * chunk:
                    rows[-1] = (rows[-1][0], (index + 1) * chunk)  # adjacent chunks: one slice
                else:
                    rows.append((index * chunk, (index + 1) * chunk))
        elif self.fine_tuned_uuids:
            raise RuntimeError(f"finextract: cannot tell the fine-tuned rows of a batch of {x.shape[0]} from the "
                               f"{len(uuids)} conds ComfyUI reports for it")
        self._rows, self._batch = rows, x.shape[0]
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self._rows = None

    def _hook_for(self, layer: _LayerBranch):
        def hook(module, args, output):
            rows = self._rows
            if not rows:
                return None
            x = args[0]
            if x.shape[0] != self._batch or output.shape[0] != self._batch:
                raise RuntimeError(f"finextract: a LoRA layer saw {x.shape[0]} rows in a batch of {self._batch}; "
                                   "this model family folds the batch, so its LoRA cannot ride as a side branch")
            for start, stop in rows:
                layer.add_to(x[start:stop], output[start:stop])  # in place: the base's output is this layer's own
            return None
        return hook


def side_branch_for(model: torch.nn.Module, patches: dict[str, list[tuple]]) -> SideBranch:
    """The side branch for the fine-tune's own weight patches (key -> ComfyUI patch entries) on ``model``.

    Raises NoLowRankForm, naming the first patch that has no low-rank forward form here (LoHa, LoKr, OFT, DoRA, full
    weight differences, reshaped or converted weights, grouped convolutions): such a fine-tune keeps the hook path.
    """
    layers: dict[str, _LayerBranch] = {}
    for key in sorted(patches):
        module_name, _, parameter = key.rpartition(".")
        module = comfy.utils.get_attr(model, module_name) if module_name else None
        if not isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)):
            raise NoLowRankForm(f"{key} is not the weight of a linear or convolution layer")
        if isinstance(module, torch.nn.modules.conv._ConvNd) and (module.groups != 1 or module.padding_mode != "zeros"):
            raise NoLowRankForm(f"{key} belongs to a grouped or padded-by-copy convolution")
        layer = layers.setdefault(module_name, _LayerBranch(module))
        for strength, value, strength_model, offset, function in patches[key]:
            if strength_model != 1.0 or function is not None:
                raise NoLowRankForm(f"{key} is scaled or converted by its patch")
            if parameter == "bias":
                layer.bias_terms.append((strength, _bias_difference(key, value, offset, module)))
            elif parameter == "weight":
                layer.terms.append(_low_rank_term(key, value, strength, offset, module))
            else:
                raise NoLowRankForm(f"{key} is not a weight or a bias")
    return SideBranch(layers)


def _bias_difference(key: str, value, offset, module) -> torch.Tensor:
    diff = value[1][0] if isinstance(value, tuple) and len(value) == 2 and value[0] == "diff" else None
    if offset is not None or diff is None or module.bias is None or diff.shape != module.bias.shape:
        raise NoLowRankForm(f"{key} is patched by something other than a plain bias difference")
    return diff


def _low_rank_term(key: str, value, strength: float, offset, module) -> _LowRankTerm:
    if not isinstance(value, comfy.weight_adapter.LoRAAdapter):
        name = getattr(value, "name", None) or (value[0] if isinstance(value, tuple) and value else type(value).__name__)
        raise NoLowRankForm(f"{key} is patched by a '{name}' adapter, which has no low-rank forward form here")
    up, down, alpha, mid, dora_scale, reshape = value.weights
    if dora_scale is not None or reshape is not None:
        raise NoLowRankForm(f"{key} is a DoRA or reshaped LoRA, whose delta depends on the merged weight")
    weight_shape = module.weight.shape
    out_slice = None
    if offset is not None:
        if offset[0] != 0 or isinstance(module, torch.nn.modules.conv._ConvNd):
            raise NoLowRankForm(f"{key} patches a slice of the weight other than a block of its outputs")
        out_slice = (offset[1], offset[1] + offset[2])
        weight_shape = (offset[2], *weight_shape[1:])
    kernel = weight_shape[2:]
    if mid is not None:
        if tuple(mid.shape[2:]) != tuple(kernel) or down.flatten(1).shape[1] != weight_shape[1]:
            raise NoLowRankForm(f"{key}: its LoCon core does not match the layer's kernel")
    elif down.numel() // down.shape[0] != torch.Size(weight_shape[1:]).numel():
        raise NoLowRankForm(f"{key}: its LoRA factors do not match the layer's shape")
    if up.shape[0] != weight_shape[0]:
        raise NoLowRankForm(f"{key}: its LoRA factors do not match the layer's shape")
    rank = down.shape[0]
    scale = strength * (float(alpha) / rank if alpha is not None else 1.0)
    return _LowRankTerm(up=up, down=down, mid=mid, scale=scale, out_slice=out_slice)
