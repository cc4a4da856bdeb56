"""finextract_core.hashing: the three hashes against hashlib over the bytes they are defined on, and the on-disk cache
keyed by (path, size, mtime)."""

from __future__ import annotations

import hashlib
import os

from finextract_core.hashing import FileHashes
from fixtures import trainer_files as tf


def _model(tmp_path, name="model.safetensors", seed=0):
    """A safetensors file over 1.1 MiB, so the legacy hash's 64 KiB window at 1 MiB lies inside it."""
    return tf.write(tmp_path / name, tf.checkpoint_tensors(tf.SD1_CHECKPOINT_SHAPES, seed), {"ss_v2": "False"})


def test_digests_are_the_hashes_of_the_bytes_they_are_defined_on(tmp_path):
    path = _model(tmp_path)
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) > 0x110000
    header_end = 8 + int.from_bytes(data[:8], "little")
    digests = FileHashes(None).digests(path)
    assert digests.sha256 == hashlib.sha256(data).hexdigest()
    assert digests.tensor_sha256 == hashlib.sha256(data[header_end:]).hexdigest()
    assert digests.legacy == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert FileHashes(None).legacy(path) == digests.legacy  # the 64 KiB read alone gives the same


def test_tensor_hash_is_kohyas_sshs_model_hash_and_ignores_metadata_edits(tmp_path):
    tensors = tf.lora_tensors(tf.SD1_KOHYA_LAYERS, 4, "kohya", 3)
    metadata = {"ss_network_dim": "4", "modelspec.title": "first"}
    first = tf.write(tmp_path / "a.safetensors", tensors, metadata)
    edited = tf.write(tmp_path / "b.safetensors", tensors, {**metadata, "modelspec.title": "renamed by a user"})
    hashes = FileHashes(None)
    assert hashes.digests(first).tensor_sha256 == tf.kohya_sshs_hash(tensors, metadata)
    assert hashes.digests(edited).tensor_sha256 == hashes.digests(first).tensor_sha256
    assert hashes.sha256(edited) != hashes.sha256(first)


def test_a_non_safetensors_file_has_no_tensor_hash(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 10)
    digests = FileHashes(None).digests(str(path))
    assert digests.tensor_sha256 is None
    assert digests.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert digests.legacy == hashlib.sha256(b"").hexdigest()[:8]  # as AUTOMATIC1111's: the window past the end


def test_cache_is_keyed_by_path_size_and_mtime(tmp_path):
    path = _model(tmp_path)
    cache = str(tmp_path / "cache" / "hashes.jsonl")
    original = FileHashes(cache).digests(path)
    stat = os.stat(path)
    # Same size and mtime, other bytes: a new FileHashes reads the cache file and does not hash again
    with open(path, "r+b") as f:
        f.seek(stat.st_size - 16)
        f.write(b"\xff" * 16)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert FileHashes(cache).digests(path) == original
    # A new mtime: hashed again, and the new hash is what the cache remembers from then on
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    with open(path, "rb") as f:
        changed = hashlib.sha256(f.read()).hexdigest()
    assert FileHashes(cache).sha256(path) == changed != original.sha256
    assert FileHashes(cache).sha256(path) == changed
    # A link reaches the same entry
    link = tmp_path / "link.safetensors"
    os.symlink(path, link)
    assert FileHashes(cache).sha256(str(link)) == changed


def test_cache_survives_a_torn_line_and_compacts(tmp_path):
    paths = [_model(tmp_path, f"m{i}.safetensors", seed=i) for i in range(3)]
    cache = tmp_path / "hashes.jsonl"
    hashes = FileHashes(str(cache))
    expected = [hashes.sha256(p) for p in paths]
    with open(cache, "a") as f:
        f.write('{"path": "/cut sho')  # a kill in the middle of a write
    assert [FileHashes(str(cache)).sha256(p) for p in paths] == expected
    # Many superseded lines (a file touched again and again) are rewritten as one line per file
    for step in range(120):
        os.utime(paths[0], ns=(0, (step + 10) * 1_000_000_000))
        hashes.sha256(paths[0])
    lines = cache.read_text().splitlines()
    assert len(lines) < 120
    assert [FileHashes(str(cache)).sha256(p) for p in paths] == expected
