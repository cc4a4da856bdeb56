"""Hashes of model files, kept in an on-disk cache keyed by (path, size, mtime) so a file is read once.

An audit looks files up many times (a LoRA's recorded base hash against every checkpoint the user has, a finished
model's key on every resumed run); hashing a few GB each time would dominate the run. One pass over a file gives the
three hashes the model world uses:

- ``sha256``: SHA-256 of the whole file (kohya's ``ss_new_sd_model_hash`` of a base, Civitai's "SHA256").
- ``tensor_sha256``: SHA-256 of a safetensors file's bytes after its header, i.e. of the tensors alone. This is
  what kohya sd-scripts and ai-toolkit record as ``sshs_model_hash`` (``addnet_hash_safetensors``): it does not
  change when someone edits the metadata, and it changes when the tensors are not the ones it was written for.
- ``legacy``: the first 8 hex digits of SHA-256 over 64 KiB at offset 1 MiB (AUTOMATIC1111's old model hash, kohya's
  ``ss_sd_model_hash``). It reads 64 KiB, so it can screen thousands of candidate files before any full hash.

The cache is a JSON-lines file: one line per hashed file, appended, the last line of a path winning (a line cut short
by a kill is skipped). Two processes may append at once; at worst one recomputes a hash the other just wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

CHUNK = 1 << 20
LEGACY_OFFSET, LEGACY_LENGTH = 0x100000, 0x10000  # AUTOMATIC1111's model_hash window
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the header length


def default_cache_file() -> str:
    """FINEXTRACT_HASH_CACHE, else file-hashes.jsonl in the user's cache folder ($XDG_CACHE_HOME or ~/.cache)."""
    if os.environ.get("FINEXTRACT_HASH_CACHE"):
        return os.environ["FINEXTRACT_HASH_CACHE"]
    cache_root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache_root, "finextract", "file-hashes.jsonl")


@dataclass(frozen=True)
class FileDigests:
    sha256: str
    tensor_sha256: str | None  # None: the file is not laid out as a safetensors file
    legacy: str


def safetensors_data_offset(head: bytes, size: int) -> int | None:
    """Where the tensors of a safetensors file begin (8 + header length), from its first 9 bytes; None if the bytes
    do not look like a safetensors file of this size."""
    if len(head) < 9 or head[8:9] != b"{":
        return None
    header_length = int.from_bytes(head[:8], "little")
    if header_length > SAFETENSORS_MAX_HEADER or 8 + header_length > size:
        return None
    return 8 + header_length


def _legacy_hash(window: bytes) -> str:
    return hashlib.sha256(window).hexdigest()[:8]


def _hash_file(path: str, size: int) -> FileDigests:
    whole, tensors = hashlib.sha256(), hashlib.sha256()
    with open(path, "rb") as f:
        data_offset = safetensors_data_offset(f.read(9), size)
        f.seek(0)
        position, window = 0, bytearray()
        for chunk in iter(lambda: f.read(CHUNK), b""):
            whole.update(chunk)
            if data_offset is not None and position + len(chunk) > data_offset:
                tensors.update(chunk[max(0, data_offset - position):])
            start, end = max(position, LEGACY_OFFSET), min(position + len(chunk), LEGACY_OFFSET + LEGACY_LENGTH)
            if start < end:
                window += chunk[start - position:end - position]
            position += len(chunk)
    return FileDigests(whole.hexdigest(), tensors.hexdigest() if data_offset is not None else None,
                       _legacy_hash(bytes(window)))


class FileHashes:
    """Hashes of files, computed once per (real path, size, mtime) and remembered in ``cache_file`` (None: in memory
    only, for this object's life)."""

    def __init__(self, cache_file: str | None):
        self.cache_file = cache_file
        self._entries: dict[str, dict] = {}
        self._lines_read = 0
        if cache_file and os.path.exists(cache_file):
            self._load()

    def _load(self) -> None:
        with open(self.cache_file, encoding="utf-8", errors="replace") as f:
            for line in f:
                self._lines_read += 1
                try:
                    entry = json.loads(line)
                    self._entries[entry["path"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a kill, or not ours: that file is hashed again when asked for

    def _entry(self, path: str) -> tuple[str, os.stat_result, dict | None]:
        real = os.path.realpath(path)
        stat = os.stat(real)
        entry = self._entries.get(real)
        if entry is not None and (entry.get("size"), entry.get("mtime_ns")) != (stat.st_size, stat.st_mtime_ns):
            entry = None  # the file changed since it was hashed
        return real, stat, entry

    def _remember(self, real: str, stat: os.stat_result, values: dict) -> dict:
        entry = {"path": real, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **values}
        self._entries[real] = entry
        if self.cache_file:
            os.makedirs(os.path.dirname(os.path.abspath(self.cache_file)), exist_ok=True)
            self._lines_read += 1
            if self._lines_read > 2 * len(self._entries) + 100:
                self._rewrite()
            else:
                with open(self.cache_file, "a+b") as f:
                    f.seek(0, os.SEEK_END)
                    if f.tell():  # start on a line of its own after a line a kill cut short
                        f.seek(-1, os.SEEK_END)
                        torn = f.read(1) != b"\n"
                    else:
                        torn = False
                    f.write((("\n" if torn else "") + json.dumps(entry, sort_keys=True) + "\n").encode("utf-8"))
        return entry

    def _rewrite(self) -> None:
        """Replace a cache file grown long with superseded lines by one line per file."""
        temporary = f"{self.cache_file}.{os.getpid()}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            for real in sorted(self._entries):
                f.write(json.dumps(self._entries[real], sort_keys=True) + "\n")
        os.replace(temporary, self.cache_file)
        self._lines_read = len(self._entries)

    def digests(self, path: str) -> FileDigests:
        """All three hashes of ``path``, reading the whole file only if this version of it was never hashed."""
        real, stat, entry = self._entry(path)
        if entry is None or "sha256" not in entry:
            digests = _hash_file(real, stat.st_size)
            entry = self._remember(real, stat, {"sha256": digests.sha256, "tensor_sha256": digests.tensor_sha256,
                                                "legacy": digests.legacy})
        return FileDigests(entry["sha256"], entry["tensor_sha256"], entry["legacy"])

    def sha256(self, path: str) -> str:
        return self.digests(path).sha256

    def legacy(self, path: str) -> str:
        """The old 8-digit hash, reading only its 64 KiB window when the file was never fully hashed."""
        real, stat, entry = self._entry(path)
        if entry is None:
            with open(real, "rb") as f:
                f.seek(LEGACY_OFFSET)
                entry = self._remember(real, stat, {"legacy": _legacy_hash(f.read(LEGACY_LENGTH))})
        return entry["legacy"]
