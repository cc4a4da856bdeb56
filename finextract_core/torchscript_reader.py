"""A safe reader of TorchScript archives: the named tensors of a ``.torchscript.pt`` file, read without running it.

Loading an archive with ``torch.jit.load`` lets TorchScript code inside it run (``__setstate__`` and the like). Here
the pickled module tree (``data.pkl``) is walked with :mod:`pickletools`, a disassembler that never imports or calls
anything, as a small stack machine that keeps each object's class name and state without constructing it; tensor
bytes are copied out of the zip's storage records.
"""
from __future__ import annotations

import pickletools
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

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
        flat = (torch.frombuffer(bytearray(raw[: numel * itemsize]), dtype=dtype) if numel
                else torch.empty(0, dtype=dtype))
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


def is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") for n in archive.namelist())
