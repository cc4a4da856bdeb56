"""SSCD copy-detection descriptors (Pizzi et al., CVPR 2022) rebuilt in plain PyTorch.

The official weight files (``https://dl.fbaipublicfiles.com/sscd-copy-detection/<name>.<format>.pt``) load into
:class:`SSCDModel` with exact key matching, so no pickled code and no TorchScript program from a downloaded file is ever
run:

* ``.classy.pt`` / ``.torchvision.pt``: ``torch.load(weights_only=True)``;
* ``.safetensors``: ``safetensors.torch.load_file``;
* ``.torchscript.pt``: the archive's tensors are read by :func:`read_torchscript_tensors`, which walks the pickled
  module tree with :mod:`pickletools` (a disassembler: it never imports or calls anything) and copies the raw tensor
  bytes out of the zip. Only if that fails (an archive layout this reader does not know) and the caller passes
  ``allow_torchscript_execution=True`` is ``torch.jit.load`` used, and then only for its ``state_dict()``: loading an
  archive lets TorchScript code inside it run (e.g. ``__setstate__``), which is why that path is opt-in.

Model: trunk (ResNet50 v1.5 for the 512-d models, ResNeXt101-32x4d for ``sscd_disc_large``, 1024-d) -> GeM pooling
(p = 3) -> Linear(2048, d) -> L2 normalisation. Module names follow Classy Vision's, so ``state_dict()`` keys are the
``.classy.pt`` keys; ``.torchvision.pt`` keys are renamed on load.
"""
from __future__ import annotations

import os
import pickletools
import re
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import Embeddings

DOWNLOAD_PATTERN = "https://dl.fbaipublicfiles.com/sscd-copy-detection/<name>.<format>.pt"
DOWNLOAD_HINT = (
    f"download an official SSCD file from {DOWNLOAD_PATTERN} (e.g. sscd_disc_large.torchscript.pt, the paper's "
    "model, or sscd_disc_mixup.classy.pt) and place it in the SSCD models folder"
)
TRUNK_CHANNELS = 2048
GEM_POWER = 3.0


# ----------------------------------------------------------------------------------------------------- architecture
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


# ---------------------------------------------------------------------------------------------- state-dict layouts
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
        raise ValueError(f"not an SSCD state dict: key {missing} is missing ({DOWNLOAD_HINT})") from None
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


# --------------------------------------------------------------------------------------------- TorchScript archives
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class _Global:
    qualified_name: str


@dataclass
class _Object:
    """An instance of a class named in the pickle; we keep its name and state and never construct it."""

    cls: Any
    args: Any
    state: Any = None


class _TorchScriptArchive:
    """Reads a TorchScript zip's ``data.pkl`` symbolically: a stack machine over pickletools opcodes."""

    def __init__(self, archive: zipfile.ZipFile):
        self.archive = archive
        names = archive.namelist()
        data_pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(data_pkl) != 1 or not any(n.endswith("/constants.pkl") for n in names):
            raise ValueError("not a TorchScript archive (no top-level data.pkl and constants.pkl)")
        self.prefix = data_pkl[0][: -len("data.pkl")]
        byteorder = self.prefix + "byteorder"
        if byteorder in names and archive.read(byteorder).decode().strip() != "little":
            raise ValueError("big-endian TorchScript archives are not supported")
        self.data_pkl = archive.read(data_pkl[0])

    def _tensor(self, storage: tuple, offset: int, size: tuple, stride: tuple) -> torch.Tensor:
        _, storage_type, key, _location, numel = storage
        dtype = _STORAGE_DTYPES[storage_type.qualified_name.rsplit(".", 1)[-1]]
        raw = self.archive.read(f"{self.prefix}data/{key}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if len(raw) < numel * itemsize:
            raise ValueError(f"tensor storage {key} is truncated")
        flat = torch.frombuffer(bytearray(raw[: numel * itemsize]), dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        return torch.as_strided(flat, size, stride, offset).clone()

    def _reduce(self, func: Any, args: tuple) -> Any:
        name = func.qualified_name if isinstance(func, _Global) else None
        if name == "torch._utils._rebuild_tensor_v2":
            return self._tensor(*args[:4])
        if name == "torch._utils._rebuild_parameter":
            return args[0]
        if name == "collections.OrderedDict":
            return OrderedDict()
        return _Object(func, args)

    def root(self) -> Any:
        stack: list[Any] = []
        marks: list[int] = []
        memo: dict[int, Any] = {}

        def pop_mark() -> list[Any]:
            start = marks.pop()
            items = stack[start:]
            del stack[start:]
            return items

        for opcode, arg, _ in pickletools.genops(self.data_pkl):
            name = opcode.name
            if name in ("PROTO", "FRAME"):
                continue
            if name == "STOP":
                return stack.pop()
            if name == "MARK":
                marks.append(len(stack))
            elif name == "GLOBAL":
                module, qualname = arg.split(" ", 1)
                stack.append(_Global(f"{module}.{qualname}"))
            elif name == "STACK_GLOBAL":
                qualname = stack.pop()
                stack.append(_Global(f"{stack.pop()}.{qualname}"))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo[arg])
            elif name in ("BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "BININT", "BININT1", "BININT2",
                          "LONG1", "BINFLOAT", "SHORT_BINSTRING", "BINSTRING", "BINBYTES", "SHORT_BINBYTES"):
                stack.append(arg)
            elif name == "NONE":
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(name[-1])
                items = tuple(stack[-count:])
                del stack[-count:]
                stack.append(items)
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name == "EMPTY_LIST":
                stack.append([])
            elif name == "APPEND":
                item = stack.pop()
                stack[-1].append(item)
            elif name == "APPENDS":
                items = pop_mark()
                stack[-1].extend(items)
            elif name == "EMPTY_DICT":
                stack.append({})
            elif name == "SETITEM":
                value, key = stack.pop(), stack.pop()
                stack[-1][key] = value
            elif name == "SETITEMS":
                items = pop_mark()
                stack[-1].update(zip(items[::2], items[1::2]))
            elif name == "BINPERSID":
                stack.append(stack.pop())  # the storage descriptor tuple; _tensor reads it
            elif name == "NEWOBJ":
                args = stack.pop()
                stack.append(_Object(stack.pop(), args))
            elif name == "REDUCE":
                args = stack.pop()
                stack.append(self._reduce(stack.pop(), args))
            elif name == "BUILD":
                state = stack.pop()
                if isinstance(stack[-1], _Object):
                    stack[-1].state = state
            else:
                raise ValueError(f"unsupported pickle opcode {name} in TorchScript data.pkl")
        raise ValueError("TorchScript data.pkl ended without STOP")


def _collect_tensors(node: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(node, torch.Tensor):
        out[prefix.rstrip(".")] = node
    elif isinstance(node, _Object) and isinstance(node.state, dict):
        for key, value in node.state.items():
            if isinstance(key, str):
                _collect_tensors(value, f"{prefix}{key}.", out)


def read_torchscript_tensors(path: str) -> dict[str, torch.Tensor]:
    """The named tensors (parameters and buffers) of a TorchScript archive, without loading or running it."""
    with zipfile.ZipFile(path) as archive:
        root = _TorchScriptArchive(archive).root()
        tensors: dict[str, torch.Tensor] = {}
        _collect_tensors(root, "", tensors)
    if not tensors:
        raise ValueError("the TorchScript archive has no named tensors (a frozen/optimised export?)")
    return tensors


def _is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") for n in archive.namelist())


# ---------------------------------------------------------------------------------------------------------- loading
_FORMAT_SUFFIXES = (".classy.pt", ".torchvision.pt", ".torchscript.pt", ".safetensors", ".pt", ".pth")


def model_id_from_path(path: str) -> str:
    """``.../sscd_disc_large.torchscript.pt`` -> ``sscd_disc_large`` (all formats of one model share the id)."""
    name = os.path.basename(path)
    for suffix in _FORMAT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_sscd_state_dict(path: str, allow_torchscript_execution: bool = False) -> dict[str, torch.Tensor]:
    """Read an SSCD weight file of any official format into a Classy-layout state dict (no code is run).

    Raises FileNotFoundError for a missing file and ValueError for an unreadable one; both name the download address.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SSCD model file not found: {path}: {DOWNLOAD_HINT}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state_dict = load_file(path, device="cpu")
        elif _is_torchscript_archive(path):
            state_dict = _read_torchscript_state_dict(path, allow_torchscript_execution)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as error:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise ValueError(
            f"could not read SSCD weights from {path} ({type(error).__name__}: {error}); the file may be incomplete "
            f"or not an SSCD model: {DOWNLOAD_HINT}"
        ) from error
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors: {DOWNLOAD_HINT}")
    return to_classy_layout(state_dict)


def _read_torchscript_state_dict(path: str, allow_torchscript_execution: bool) -> dict[str, torch.Tensor]:
    try:
        return read_torchscript_tensors(path)
    except ValueError:
        if not allow_torchscript_execution:
            raise
    # Opt-in fallback: deserialising lets the archive's TorchScript run; the scripted forward is still never called.
    return dict(torch.jit.load(path, map_location="cpu").state_dict())


def load_sscd_model(path: str, device: str | torch.device = "cpu", model_id: str | None = None,
                    allow_torchscript_execution: bool = False) -> SSCDModel:
    """Build the matching :class:`SSCDModel` for an SSCD weight file, load it strictly, and put it in eval mode.

    ``model_id`` defaults to the file name without its format suffix (``sscd_disc_large``).
    """
    state_dict = read_sscd_state_dict(path, allow_torchscript_execution)
    architecture = detect_architecture(state_dict)
    model = SSCDModel(architecture, model_id or model_id_from_path(path))
    load_state_dict_strict(model, state_dict)
    return model.eval().to(device)


# ---------------------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side (bilinear, antialiased), optionally centre-crop a square, then normalise."""

    name: str
    short_side: int
    center_crop: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


PRESETS = {
    # The memorisation papers' (DCR, FineXtract) transform: Resize(256) -> CenterCrop(224) -> Normalize(0.5, 0.5).
    "paper": Preprocessing("paper", 256, 224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # The SSCD README's: small edge 288, ImageNet statistics, no crop.
    "sscd": Preprocessing("sscd", 288, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DEFAULT_PRESET = "paper"


def check_image_batch(images: torch.Tensor) -> None:
    """Raise ValueError unless ``images`` is a ComfyUI IMAGE: float [N, H, W, 3] with N >= 1."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] < 1:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected an IMAGE batch of shape [N, H, W, 3], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"expected float images in 0..1, got dtype {images.dtype}")


def resize_short_side(images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """torchvision ``Resize(size)`` on [N, C, H, W]: short side to ``size``, long side truncated like torchvision."""
    height, width = images.shape[-2:]
    if min(height, width) == size:
        return images
    if height <= width:
        new_size = (size, int(size * width / height))
    else:
        new_size = (int(size * height / width), size)
    return F.interpolate(images, size=new_size, mode=mode, align_corners=False, antialias=True)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``CenterCrop(size)`` offsets (round half to even of (H - size) / 2) on [N, C, H, W]."""
    height, width = images.shape[-2:]
    if height < size or width < size:
        raise ValueError(f"cannot centre-crop {size}x{size} from {height}x{width}")
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return images[..., top: top + size, left: left + size]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def preprocess(images: torch.Tensor, preset: str = DEFAULT_PRESET) -> torch.Tensor:
    """ComfyUI IMAGE [N, H, W, 3] in 0..1 -> SSCD input [N, 3, h, w] (float32) for the named preset."""
    check_image_batch(images)
    if preset not in PRESETS:
        raise ValueError(f"unknown SSCD preset {preset!r}: choose one of {sorted(PRESETS)}")
    config = PRESETS[preset]
    x = images.permute(0, 3, 1, 2).float()
    x = resize_short_side(x, config.short_side)
    if config.center_crop is not None:
        x = center_crop(x, config.center_crop)
    return normalize(x, config.mean, config.std).contiguous()


# -------------------------------------------------------------------------------------------------------- embedding
def resolve_compute_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """float16 by default on CUDA, float32 elsewhere; half precision is refused off CUDA (slow or unsupported)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported compute dtype {dtype}: use float32, float16 or bfloat16")
    if dtype != torch.float32 and device.type != "cuda":
        raise ValueError(f"{dtype} is only used on CUDA devices; use float32 on {device.type}")
    return dtype


def embed_batches(model: nn.Module, images: torch.Tensor, prepare, batch_size: int, device: torch.device,
                  dtype: torch.dtype | None) -> np.ndarray:
    """Run ``model(prepare(chunk))`` over ``images`` in chunks; returns float32 unit rows as a numpy array.

    Shared by the SSCD and CLIP embedders: ``prepare`` maps an IMAGE chunk to the model's input tensor.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    compute_dtype = resolve_compute_dtype(device, dtype)
    rows = []
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            inputs = prepare(images[start: start + batch_size].to(device))  # resizing stays in float32
            with torch.autocast(device_type=device.type, dtype=compute_dtype,
                                enabled=compute_dtype != torch.float32):
                descriptors = model(inputs).float()
            rows.append(F.normalize(descriptors, dim=1).cpu())
    return torch.cat(rows).numpy()


def embed_images(model: SSCDModel, images: torch.Tensor, preset: str = DEFAULT_PRESET, *, batch_size: int = 32,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Embeddings:
    """Embed a ComfyUI IMAGE batch [N, H, W, 3] (0..1) with an SSCD model; row i describes image i.

    ``device`` defaults to the model's; the model is moved there. ``dtype`` None means float16 autocast on CUDA and
    float32 elsewhere (the pooling head always runs in float32).
    """
    check_image_batch(images)
    if preset not in PRESETS:
        raise ValueError(f"unknown SSCD preset {preset!r}: choose one of {sorted(PRESETS)}")
    target = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(target).eval()
    vectors = embed_batches(model, images, lambda chunk: preprocess(chunk, preset), batch_size, target, dtype)
    return Embeddings(vectors, model.model_id, preset)
