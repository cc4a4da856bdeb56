"""An on-disk bank of candidates: each candidate's final latent and the embedding of its decoded image.

The paper samples N = 50 x N0 candidates (6,900 for a LoRA trained on 138 images), far more than fit in memory as
images. A bank keeps them on disk as they are made, so memory stays flat in N, and so a cancelled or killed run
resumes where it stopped.

Layout of a bank folder::

    bank.json                                     the key: every setting that determines the candidates (JSON)
    candidates-<first index>-<count>.safetensors  one shard per finished batch: tensors "indices" (int64 [b]),
                                                  "latents" (float32 [b, C, H, W]) and "embeddings" (float32 [b, d],
                                                  unit rows); metadata "bank" = the key's id

Candidate i always starts from the same noise, whatever the batch it was generated in: ``candidate_noise`` draws it
from a generator seeded by (seed, i), and samplers that draw fresh noise during sampling get one generator (or one
Brownian tree) per candidate too (``CandidateStepNoise``). So a bank can be extended (raise N), split by index range across machines and
merged; a candidate's values do not depend on which shard holds it.

Every shard is written to a temporary file and renamed into place, so a killed process leaves either a whole shard
or none. Shards carry their bank's id, so shards copied between folders of different settings are refused, and the
same candidate in two shards (overlapping ranges) is read once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .embeddings import Embeddings

BANK_FORMAT = 1
MANIFEST = "bank.json"
SHARD_PREFIX = "candidates-"
SHARD_SUFFIX = ".safetensors"
TEMP_PREFIX = ".tmp-"
# A temporary file lives only while one shard is written (a second or so); an older one was left by a killed process.
STALE_TEMP_SECONDS = 600
# Evenly spaced elements per tensor in a fingerprint: any real fine-tune or LoRA moves all of a layer's elements.
FINGERPRINT_SAMPLES = 4096


class BankError(RuntimeError):
    """The bank folder cannot be used as asked; the message says what to do."""


# ----------------------------------------------------------------------------------------------------------- noise
def candidate_seed(seed: int, index: int, stream: str = "initial") -> int:
    """The 63-bit generator seed of candidate ``index`` of a run seeded ``seed``; ``stream`` separates the initial
    noise from the noise drawn during sampling. Hashed, so (seed, i) and (seed + 1, i - 1) do not share noise."""
    digest = hashlib.sha256(f"finextract-candidate:{seed}:{index}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)


def candidate_noise(seed: int, indices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Initial noise [len(indices), *shape] (float32, CPU): row j depends only on (seed, indices[j])."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(candidate_seed(seed, i)))
                        for i in indices])


class CandidateStepNoise:
    """A ``noise_sampler`` for samplers that draw independent noise at every step (ancestral ones, er_sde, ...): one
    generator per candidate, so each candidate's step noise does not depend on the batch. (Samplers that need a
    Brownian tree get one per candidate from the node, seeded with ``candidate_seed(seed, i, "steps")`` too.)"""

    def __init__(self, seed: int, indices: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"):
        self.shape = tuple(shape)
        self.device = device
        self.generators = [torch.Generator().manual_seed(candidate_seed(seed, i, "steps")) for i in indices]

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        rows = [torch.randn(self.shape, generator=generator) for generator in self.generators]
        return torch.stack(rows).to(self.device)


# ----------------------------------------------------------------------------------------------------- fingerprints
def fingerprint(value: Any) -> str:
    """A sha256 identity of nested tensors, numbers, strings, lists and dicts (model weights, LoRA patches,
    conditioning). Tensors contribute dtype, shape and FINGERPRINT_SAMPLES evenly spaced values, so hashing a
    multi-GB model stays fast; any other object contributes its type name (and its ``weights``, if it has some)."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().reshape(-1)
        if flat.numel() > FINGERPRINT_SAMPLES:
            flat = flat[torch.linspace(0, flat.numel() - 1, FINGERPRINT_SAMPLES, device=flat.device).long()]
        digest.update(f"tensor{tuple(value.shape)}{value.dtype}".encode())
        digest.update(flat.to(device="cpu", dtype=torch.float64).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=str):
            digest.update(repr(key).encode())
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    elif value is None or isinstance(value, (bool, int, float, str)):
        digest.update(repr(value).encode())
    else:  # adapters (LoRA, LoHa, ...) hold their tensors in .weights; functions and the like count by type
        digest.update(f"<{type(value).__module__}.{type(value).__qualname__}>".encode())
        if hasattr(value, "weights"):
            _feed(digest, value.weights)


def key_id(key: dict) -> str:
    """A short stable id of a bank key (the fields, as canonical JSON)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------ files
def _write_atomically(folder: str, name: str, write) -> None:
    """``write(path)`` to a temporary file in ``folder``, flushed to disk, then renamed to ``name``: readers (and a
    resumed run) see the whole file or none of it."""
    temp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{name}")
    try:
        write(temp)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, os.path.join(folder, name))
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def _unwritable(folder: str, error: OSError) -> BankError:
    return BankError(f"Cannot write the candidate bank in '{folder}' ({type(error).__name__}: {error.strerror or error})."
                     " Choose a bank_folder on a disk you can write to, with free space (a relative path goes under "
                     "ComfyUI's output folder).")


def _describe_difference(found: dict, wanted: dict) -> str:
    fields = sorted(set(found) | set(wanted))
    changed = [f"{field}: {found.get(field)!r} there, {wanted.get(field)!r} now" for field in fields
               if found.get(field) != wanted.get(field)]
    return "; ".join(changed)


@dataclass(frozen=True)
class _Shard:
    path: str
    indices: tuple[int, ...]


class CandidateBank:
    """A bank folder for one key. ``open`` creates it or checks that the bank there has the same key."""

    def __init__(self, folder: str, key: dict, shards: list[_Shard]):
        self.folder = folder
        self.key = key
        self.id = key_id(key)
        self._shards = shards
        self._where: dict[int, _Shard] = {}
        for shard in shards:
            for index in shard.indices:
                self._where.setdefault(index, shard)

    @classmethod
    def open(cls, folder: str, key: dict) -> "CandidateBank":
        """The bank in ``folder`` with ``key`` (JSON-serialisable settings), created if the folder holds none.

        Raises BankError if the folder cannot be written or holds a bank with another key.
        """
        key = json.loads(json.dumps(key, sort_keys=True))  # canonical: what bank.json will hold
        manifest = {"format": BANK_FORMAT, "id": key_id(key), "key": key}
        try:
            os.makedirs(folder, exist_ok=True)
            if not os.path.exists(os.path.join(folder, MANIFEST)):
                _write_atomically(folder, MANIFEST, lambda path: _write_json(path, manifest))
            else:  # probe: a bank made by someone else may sit in a folder this process cannot write
                _write_atomically(folder, ".write-probe", lambda path: open(path, "w").close())
                os.remove(os.path.join(folder, ".write-probe"))
        except OSError as error:
            raise _unwritable(folder, error) from error
        found = read_manifest(folder)
        if found["id"] != manifest["id"]:
            raise BankError(
                f"'{folder}' already holds a candidate bank made with other settings ({_describe_difference(found['key'], key)}). "
                "Choose another bank_folder for these settings, or delete that folder to start over.")
        _remove_stale_temporaries(folder)
        return cls(folder, key, _scan_shards(folder, manifest["id"]))

    @classmethod
    def read(cls, folder: str) -> "CandidateBank":
        """The bank in ``folder`` whatever its key, for reading only."""
        manifest = read_manifest(folder)
        return cls(folder, manifest["key"], _scan_shards(folder, manifest["id"]))

    def __len__(self) -> int:
        return len(self._where)

    @property
    def stored_rows(self) -> int:
        """Rows in all shards: more than len(self) when shards overlap (the same candidate made twice)."""
        return sum(len(shard.indices) for shard in self._shards)

    @property
    def indices(self) -> set[int]:
        return set(self._where)

    def missing(self, wanted: Iterable[int]) -> list[int]:
        """The candidates of ``wanted`` that are not in the bank yet, ascending."""
        return sorted(set(wanted) - self._where.keys())

    def write(self, indices: Sequence[int], latents: torch.Tensor, embeddings: Embeddings) -> None:
        """Store one finished batch as a shard (atomically). Row j of both tensors is candidate indices[j]."""
        indices = [int(i) for i in indices]
        if not indices or len(set(indices)) != len(indices) or not (len(indices) == latents.shape[0] == len(embeddings)):
            raise ValueError("a shard needs distinct indices and one latent and one embedding per index")
        if embeddings.model_id != self.key.get("embedder") or embeddings.preset != self.key.get("preset"):
            raise ValueError(f"embeddings of {embeddings.space} do not belong in a bank of "
                             f"{self.key.get('embedder')}/preset {self.key.get('preset')}")
        tensors = {
            "indices": torch.tensor(indices, dtype=torch.int64),
            "latents": latents.detach().to("cpu", torch.float32).contiguous(),
            "embeddings": torch.tensor(embeddings.vectors),
        }
        name = f"{SHARD_PREFIX}{min(indices):08d}-{len(indices):04d}{SHARD_SUFFIX}"
        try:
            _write_atomically(self.folder, name, lambda path: save_file(tensors, path, metadata={"bank": self.id}))
        except OSError as error:
            raise _unwritable(self.folder, error) from error
        shard = _Shard(os.path.join(self.folder, name), tuple(indices))
        self._shards.append(shard)
        for index in indices:
            self._where.setdefault(index, shard)

    def embeddings(self, indices: Sequence[int]) -> Embeddings:
        """The stored embeddings of ``indices``, in that order."""
        vectors = self._gather("embeddings", indices)
        vectors.flags.writeable = False  # handed to Embeddings without a copy: N rows are held once
        return Embeddings(vectors, self.key["embedder"], self.key["preset"])

    def latents(self, indices: Sequence[int]) -> torch.Tensor:
        """The stored latents of ``indices``, in that order (only the shards that hold them are read)."""
        return torch.from_numpy(self._gather("latents", indices))

    def _gather(self, name: str, indices: Sequence[int]) -> np.ndarray:
        indices = list(indices)
        absent = [i for i in indices if i not in self._where]
        if absent:
            raise BankError(f"candidates {_ranges(absent)} are not in the bank at '{self.folder}': generate them "
                            "first (queue the Candidate Bank node for that range)")
        by_shard: dict[_Shard, tuple[list[int], list[int]]] = {}
        for row, index in enumerate(indices):
            shard = self._where[index]
            rows, positions = by_shard.setdefault(shard, ([], []))
            rows.append(row)
            positions.append(shard.indices.index(index))
        gathered = None  # filled in place, so reading N rows holds one copy of them, not one per shard too
        for shard, (rows, positions) in by_shard.items():
            with _open_shard(shard.path) as handle:
                stored = handle.get_tensor(name).numpy()
            if gathered is None:
                gathered = np.empty((len(indices), *stored.shape[1:]), dtype=stored.dtype)
            gathered[rows] = stored[positions]
        return gathered


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path) as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        raise BankError(f"'{folder}' holds no candidate bank (no {MANIFEST})") from None
    except (OSError, ValueError) as error:
        raise BankError(f"{path} is unreadable ({error}): delete the folder to start the bank over") from error
    if manifest.get("format") != BANK_FORMAT or manifest.get("id") != key_id(manifest.get("key", {})):
        raise BankError(f"{path} is not a format-{BANK_FORMAT} bank manifest: delete the folder to start over")
    return manifest


def _open_shard(path: str):
    try:
        return safe_open(path, framework="pt")
    except Exception as error:  # noqa: BLE001 - any parse failure means the same thing to the user
        raise BankError(f"The bank shard {path} is unreadable ({type(error).__name__}: {error}). Delete that file and "
                        "queue the run again: only its candidates are generated again.") from error


def _scan_shards(folder: str, bank_id: str) -> list[_Shard]:
    shards = []
    for name in sorted(os.listdir(folder)):
        if not (name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX)):
            continue
        path = os.path.join(folder, name)
        with _open_shard(path) as handle:
            owner = (handle.metadata() or {}).get("bank")
            indices = handle.get_tensor("indices").tolist() if "indices" in handle.keys() else None
        if owner != bank_id:
            raise BankError(f"The shard {path} belongs to another bank ({owner}, this one is {bank_id}): it was copied "
                            "from a run with other settings. Move it out of this folder.")
        if indices is None:
            raise BankError(f"The bank shard {path} has no 'indices' tensor: delete it and queue the run again.")
        shards.append(_Shard(path, tuple(int(i) for i in indices)))
    return shards


def _remove_stale_temporaries(folder: str) -> None:
    """Temporary files of a killed writer; fresh ones may belong to another process writing this bank right now."""
    now = time.time()
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.startswith(TEMP_PREFIX) and now - os.path.getmtime(path) > STALE_TEMP_SECONDS:
            os.remove(path)


def _ranges(indices: Iterable[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5' (short messages for large gaps)."""
    spans: list[list[int]] = []
    for index in sorted(indices):
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


# ------------------------------------------------------------------------------------------------------------ merge
def merge_banks(target: str, sources: Sequence[str]) -> int:
    """Copy into the bank at ``target`` every candidate of the ``sources`` banks it lacks; returns how many.

    All banks must have the same key (the same models, caption, settings, seed and embedder): shards made on other
    machines for other index ranges of one run. ``target`` is created with the sources' key if needed.
    """
    if not sources:
        raise ValueError("merge_banks needs at least one source bank")
    manifests = [read_manifest(source) for source in sources]
    for source, manifest in zip(sources[1:], manifests[1:]):
        if manifest["id"] != manifests[0]["id"]:
            raise BankError(f"'{source}' and '{sources[0]}' are banks of different settings "
                            f"({_describe_difference(manifest['key'], manifests[0]['key'])}): only shards of one run merge")
    bank = CandidateBank.open(target, manifests[0]["key"])
    copied = 0
    for source in sources:
        for shard in _scan_shards(source, bank.id):
            new = bank.missing(shard.indices)
            if not new:
                continue
            with _open_shard(shard.path) as handle:
                rows = [shard.indices.index(i) for i in new]
                latents, vectors = handle.get_tensor("latents")[rows], handle.get_tensor("embeddings")[rows]
            bank.write(new, latents, Embeddings(vectors.numpy(), bank.key["embedder"], bank.key["preset"]))
            copied += len(new)
    return copied


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finextract_core.bank",
                                     description="Merge candidate banks made by shards of one run (index ranges).")
    sub = parser.add_subparsers(dest="command", required=True)
    merge = sub.add_parser("merge", help="copy the candidates of SOURCE banks into TARGET")
    merge.add_argument("target")
    merge.add_argument("sources", nargs="+")
    show = sub.add_parser("show", help="the key and the candidate ranges of a bank")
    show.add_argument("folder")
    args = parser.parse_args(argv)
    try:
        if args.command == "merge":
            copied = merge_banks(args.target, args.sources)
            print(f"copied {copied} candidates into {args.target}")
        bank = CandidateBank.read(args.target if args.command == "merge" else args.folder)
    except BankError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{bank.folder}: {len(bank)} candidates ({_ranges(bank.indices) or 'none'})")
    if args.command == "show":
        print(json.dumps(bank.key, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
