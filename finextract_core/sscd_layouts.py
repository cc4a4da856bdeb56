"""The key layouts of the official SSCD files: Classy Vision's (``.classy.pt``, TorchScript ``sscd_disc_large``) and
torchvision's (``.torchvision.pt``, the ResNet50 TorchScript files), which trunk a state dict holds, and strict loading.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from .sscd_network import KNOWN_TRUNKS, SSCDArchitecture, SSCDModel

_TORCHVISION_RENAMES = (
    (re.compile(r"^conv1\.(.*)$"), r"initial_block._module.0.\1"),
    (re.compile(r"^bn1\.(.*)$"), r"initial_block._module.1.\1"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv1\.(.*)$"), "blocks.{s}.block{s}-{j}.convolutional_block.0.{rest}"),
    (re.compile(r"^layer(\d)\.(\d+)\.bn1\.(.*)$"), "blocks.{s}.block{s}-{j}.convolutional_block.1.{rest}"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv2\.(.*)$"), "blocks.{s}.block{s}-{j}.convolutional_block.3.{rest}"),
    (re.compile(r"^layer(\d)\.(\d+)\.bn2\.(.*)$"), "blocks.{s}.block{s}-{j}.convolutional_block.4.{rest}"),
    (re.compile(r"^layer(\d)\.(\d+)\.conv3\.(.*)$"), "blocks.{s}.block{s}-{j}.convolutional_block.6.{rest}"),
    (re.compile(r"^layer(\d)\.(\d+)\.bn3\.(.*)$"), "blocks.{s}.block{s}-{j}.bn.{rest}"),
    (re.compile(r"^layer(\d)\.(\d+)\.downsample\.(.*)$"), "blocks.{s}.block{s}-{j}.downsample.{rest}"),
)


def _torchvision_trunk_key_to_classy(key: str) -> str:
    for pattern, replacement in _TORCHVISION_RENAMES:
        match = pattern.match(key)
        if match is None:
            continue
        if "{s}" in replacement:
            layer, block, rest = match.groups()
            return replacement.format(s=int(layer) - 1, j=block, rest=rest)
        return match.expand(replacement)
    raise KeyError(key)


def to_classy_layout(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return the state dict with Classy Vision key names (the names of :class:`SSCDModel`).

    Accepts the ``.classy.pt`` layout unchanged and the ``.torchvision.pt`` layout (torchvision ResNet keys under
    ``backbone.``, with the projection in ``backbone.fc``), with or without the ``backbone.`` prefix. Keys that fit
    neither layout are kept as they are, so strict loading reports them.
    """
    is_torchvision = any(key.endswith("layer1.0.conv1.weight") for key in state_dict)
    if not is_torchvision:
        return dict(state_dict)
    renamed = {}
    for key, tensor in state_dict.items():
        trunk_key = key[len("backbone."):] if key.startswith("backbone.") else key
        if trunk_key in ("fc.weight", "fc.bias"):
            renamed["embeddings.1." + trunk_key[3:]] = tensor
            continue
        try:
            renamed["backbone." + _torchvision_trunk_key_to_classy(trunk_key)] = tensor
        except KeyError:
            renamed[key] = tensor
    return renamed


def detect_architecture(state_dict: Mapping[str, torch.Tensor]) -> SSCDArchitecture:
    """Tell ResNet50 (512-d) from ResNeXt101-32x4d (1024-d) by the block counts, group width and head shape."""
    try:
        head = state_dict["embeddings.1.weight"]
        grouped_conv = state_dict["backbone.blocks.0.block0-0.convolutional_block.3.weight"]
    except KeyError as missing:
        raise ValueError(f"not an SSCD state dict: key {missing} is missing") from None
    block_counts = []
    for stage in range(4):
        pattern = re.compile(rf"^backbone\.blocks\.{stage}\.block{stage}-(\d+)\.")
        indices = {int(m.group(1)) for m in map(pattern.match, state_dict) if m}
        block_counts.append(len(indices))
    width = int(grouped_conv.shape[0])
    found = SSCDArchitecture(
        trunk="?",
        blocks_per_stage=tuple(block_counts),
        groups=width // int(grouped_conv.shape[1]),
        stage0_width=width,
        embedding_dim=int(head.shape[0]),
    )
    for known in KNOWN_TRUNKS:
        if (known.blocks_per_stage, known.groups, known.stage0_width) == (
                found.blocks_per_stage, found.groups, found.stage0_width):
            return SSCDArchitecture(known.trunk, known.blocks_per_stage, known.groups, known.stage0_width,
                                    found.embedding_dim)
    raise ValueError(
        f"unsupported SSCD trunk: blocks per stage {found.blocks_per_stage}, groups {found.groups}, "
        f"stage-0 width {found.stage0_width}; expected ResNet50 (3, 4, 6, 3) or ResNeXt101-32x4d (3, 4, 23, 3)"
    )


def load_state_dict_strict(model: SSCDModel, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load with exact key and shape matching; BatchNorm ``num_batches_tracked`` counters may be absent (unused)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"SSCD state dict does not match the {model.architecture.trunk} layout: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong_shape)} with another shape (e.g. {wrong_shape[:3]})"
        )
    complete = dict(expected)
    complete.update(state_dict)
    model.load_state_dict(complete, strict=True)
