"""A safetensors file's header, read alone: the 8-byte length and the JSON after it, never the tensors.

The safetensors layout: a little-endian u64 N, then N bytes of JSON ({"__metadata__": {str: str}, tensor name:
{"dtype", "shape", "data_offsets": [begin, end]}}), then the tensors' bytes. Reading N + 8 bytes gives every tensor's
name, dtype and shape and the trainer's metadata without touching the weights. Anything else (a pickled .ckpt, a
GGUF, an HTML error page saved under a model's name) is refused with a message that says what the file is.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .hashing import SAFETENSORS_MAX_HEADER


class EvidenceError(ValueError):
    """The file cannot be read as a safetensors model file; the message says why and what to do."""


@dataclass(frozen=True)
class Header:
    metadata: dict[str, str]  # the __metadata__ strings (entries that were not strings are left out, see problems)
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    header_bytes: int  # N: the JSON's length
    file_bytes: int
    data_bytes_needed: int  # the end of the last tensor's bytes, counted from the end of the header
    problems: tuple[tuple[str, str], ...]  # (source, what is wrong) found in the header itself

    @property
    def complete(self) -> bool:
        return self.file_bytes >= 8 + self.header_bytes + self.data_bytes_needed


def _what_else(head: bytes) -> str | None:
    """What a file that is not a safetensors file most likely is, from its first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return ("a PyTorch checkpoint (a zip archive with a pickle inside, as .ckpt/.pt/.bin files are). FineXtract "
                "never unpickles files, since a pickle can run code: use the model's .safetensors version, or convert "
                "it with a tool you trust")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return ("a pickle file (an old-style PyTorch checkpoint). FineXtract never unpickles files, since a pickle can "
                "run code: use the model's .safetensors version")
    if head.startswith(b"GGUF"):
        return "a GGUF file (quantised weights): FineXtract reads safetensors model files only"
    stripped = head.lstrip()
    if stripped[:1] in (b"<", b"{", b"[") or stripped[:9].lower().startswith(b"<!doctype"):
        return ("a text file (HTML or JSON), not a model: often the error page a download saved under the model's "
                "name. Download the model file again")
    return None


def read_header(path: str) -> Header:
    """The header of the safetensors file at ``path``; raises EvidenceError for anything else."""
    name = os.path.basename(path)
    if os.path.isdir(path):
        raise EvidenceError(f"{path} is a folder: pass the model files in it (for example {path}/*.safetensors)")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
            if len(head) < 9:
                raise EvidenceError(f"{name} is {size} bytes long: too short for a safetensors file (an empty or "
                                    "interrupted download?). Download or copy it again")
            header_length = int.from_bytes(head[:8], "little")
            if head[8:9] != b"{" or header_length > SAFETENSORS_MAX_HEADER:
                other = _what_else(head)
                raise EvidenceError(f"{name} is not a safetensors file" + (f": it is {other}" if other else
                                    " (its first bytes are no safetensors header)"))
            if 8 + header_length > size:
                raise EvidenceError(f"{name} is truncated: its header says {header_length} bytes of header but the "
                                    f"file has {size - 8} after the length (an interrupted download or copy?). "
                                    "Download or copy it again")
            f.seek(8)
            raw = f.read(header_length)
    except OSError as error:
        raise EvidenceError(f"{name} cannot be read ({error.strerror or error})") from error
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EvidenceError(f"{name} has a damaged header: it is not valid JSON ({error}). The file is corrupt or "
                            "not a safetensors file; download or copy it again") from error
    if not isinstance(parsed, dict):
        raise EvidenceError(f"{name} has a damaged header: a JSON {type(parsed).__name__}, not an object")
    return _parse(name, parsed, header_length, size)


def _parse(name: str, parsed: dict, header_length: int, size: int) -> Header:
    problems = []
    metadata: dict[str, str] = {}
    raw_metadata = parsed.pop("__metadata__", {})
    if not isinstance(raw_metadata, dict):
        problems.append(("__metadata__", f"is a JSON {type(raw_metadata).__name__}, not an object of strings: ignored"))
        raw_metadata = {}
    for key, value in raw_metadata.items():
        if isinstance(value, str):
            metadata[key] = value
        else:
            problems.append((key, f"is a JSON {type(value).__name__}, not a string as safetensors requires: ignored"))
    shapes, dtypes, data_end = {}, {}, 0
    for tensor, entry in parsed.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            valid = (isinstance(dtype, str) and isinstance(shape, list)
                     and all(type(d) is int and d >= 0 for d in shape)
                     and type(begin) is int and type(end) is int and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise EvidenceError(f"{name} has a damaged header: the entry of tensor '{tensor}' is not a safetensors "
                                "tensor entry (dtype, shape, data_offsets). Download or copy the file again")
        shapes[tensor], dtypes[tensor] = tuple(shape), dtype
        data_end = max(data_end, end)
    header = Header(metadata, shapes, dtypes, header_length, size, data_end, tuple(problems))
    if not header.complete:
        problems.append(("file", f"is truncated: its tensors need {8 + header_length + data_end} bytes, the file has "
                                 f"{size} (an interrupted download or copy?). The metadata is still read; the model "
                                 "cannot be loaded until the file is downloaded or copied again"))
        header = Header(metadata, shapes, dtypes, header_length, size, data_end, tuple(problems))
    return header
