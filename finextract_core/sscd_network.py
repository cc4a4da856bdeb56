"""The SSCD descriptor network (Pizzi et al., CVPR 2022) in plain PyTorch, with Classy Vision's module names.

trunk (ResNet50 v1.5 for the 512-d models, ResNeXt101-32x4d for ``sscd_disc_large``, 1024-d) -> GeM pooling (p = 3)
-> Linear(2048, d) -> L2 normalisation. Because the module names follow Classy Vision's, ``state_dict()`` keys are the
``.classy.pt`` keys (sscd_layouts.py maps the other official layouts onto them).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TRUNK_CHANNELS = 2048
GEM_POWER = 3.0


@dataclass(frozen=True)
class SSCDArchitecture:
    """Which bottleneck trunk and descriptor size a weight file holds."""

    trunk: str
    blocks_per_stage: tuple[int, int, int, int]
    groups: int
    stage0_width: int  # channels of the grouped 3x3 conv in stage 0; doubles at every stage
    embedding_dim: int


RESNET50 = SSCDArchitecture("resnet50", (3, 4, 6, 3), groups=1, stage0_width=64, embedding_dim=512)
RESNEXT101_32X4D = SSCDArchitecture("resnext101_32x4d", (3, 4, 23, 3), groups=32, stage0_width=128,
                                    embedding_dim=1024)
KNOWN_TRUNKS = (RESNET50, RESNEXT101_32X4D)


class _Bottleneck(nn.Module):
    """v1.5 bottleneck (stride on the 3x3 conv), laid out like Classy Vision's BottleneckLayer."""

    def __init__(self, in_channels: int, width: int, out_channels: int, stride: int, groups: int):
        super().__init__()
        self.convolutional_block = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1, bias=False),
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn(self.convolutional_block(x)) + shortcut)


class _InitialBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self._module = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._module(x)


class _Trunk(nn.Module):
    def __init__(self, architecture: SSCDArchitecture):
        super().__init__()
        self.initial_block = _InitialBlock()
        stages = []
        in_channels = 64
        for stage, block_count in enumerate(architecture.blocks_per_stage):
            width = architecture.stage0_width * 2 ** stage
            out_channels = 256 * 2 ** stage
            blocks = OrderedDict()
            for index in range(block_count):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks[f"block{stage}-{index}"] = _Bottleneck(in_channels, width, out_channels, stride,
                                                              architecture.groups)
                in_channels = out_channels
            stages.append(nn.Sequential(blocks))
        self.blocks = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.initial_block(x))


class GeMPool(nn.Module):
    """Generalised mean pooling over all positions; computed in float32 because x**3 overflows fp16 above ~40."""

    def __init__(self, power: float = GEM_POWER):
        super().__init__()
        self.power = power

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().flatten(2).clamp(min=1e-6).pow(self.power).mean(dim=2)
        return x.pow(1.0 / self.power)


class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


class SSCDModel(nn.Module):
    """SSCD descriptor network. Input: normalised float [N, 3, H, W] (any H, W); output: float32 [N, d], unit rows.

    ``model_id`` travels into the :class:`Embeddings` this model produces.
    """

    def __init__(self, architecture: SSCDArchitecture, model_id: str = "sscd"):
        super().__init__()
        self.architecture = architecture
        self.model_id = model_id
        self.backbone = _Trunk(architecture)
        self.embeddings = nn.Sequential(GeMPool(), nn.Linear(TRUNK_CHANNELS, architecture.embedding_dim),
                                        L2Normalize())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        # The head runs in float32 even inside an fp16 autocast region: GeM's cube and the final norm need the range.
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.embeddings(features.float())
