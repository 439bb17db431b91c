"""Verify-on-read: bytes are read once, hashed, and parsed only if they match; the read log is exact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from trainguard.provenance import ShardError, ShardReader, open_manifest


def test_reading_untouched_shards_logs_each_read_in_order(manifest: Path, key_pairs: Any) -> None:
    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice")))
    names = ["bob/shard-00.parquet", "alice/shard-00.parquet"]
    frames = dict(reader.frames(names))
    assert list(frames) == names
    assert len(frames["bob/shard-00.parquet"]) == 120
    assert [r.name for r in reader.log.records] == names
    for record in reader.log.records:
        assert record.sha256 == hashlib.sha256((manifest.parent / record.name).read_bytes()).hexdigest()
    lines = reader.log.to_json_lines().decode().splitlines()
    assert [json.loads(line)["name"] for line in lines] == names
    assert reader.log.digest() == hashlib.sha256(reader.log.to_json_lines()).hexdigest()


def test_shard_tampered_after_verification_is_refused_on_read(manifest: Path, key_pairs: Any) -> None:
    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice")))
    shard = manifest.parent / "alice" / "shard-01.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError) as caught:
        reader.read_frame("alice/shard-01.parquet")
    assert (caught.value.reason, caught.value.shard) == ("digest-mismatch", "alice/shard-01.parquet")
    assert reader.log.records == ()


@pytest.mark.parametrize(("name", "reason"), [("not-listed.parquet", "unlisted"), ("manifest.json", "unlisted")])
def test_only_listed_shards_can_be_read(manifest: Path, key_pairs: Any, name: str, reason: str) -> None:
    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice")))
    with pytest.raises(ShardError) as caught:
        reader.read_bytes(name)
    assert caught.value.reason == reason


def test_symlinked_shard_is_refused_on_read(manifest: Path, key_pairs: Any, tmp_path: Path) -> None:
    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice")))
    shard = manifest.parent / "raw.bin"
    (tmp_path / "copy").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(tmp_path / "copy")
    with pytest.raises(ShardError) as caught:
        reader.read_bytes("raw.bin")
    assert caught.value.reason == "symlink"


def test_large_shards_stream_and_seek_through_signed_chunks(tmp_path: Path, key_pairs: Any, signer: Any) -> None:
    root = tmp_path / "big"
    root.mkdir()
    data = np.random.default_rng(1).bytes(5 * 1024 * 1024 + 123)
    (root / "big.bin").write_bytes(data)
    manifest = signer(root, key_pairs.alice, tmp_path / "m.json", chunk_size=1024 * 1024)
    verified = open_manifest(manifest, key_pairs.trust("alice"), data_dir=root)
    assert len(verified.manifest.shards[0].chunks) == 6
    reader = ShardReader(verified)
    assert b"".join(reader.iter_chunks("big.bin")) == data
    assert reader.read_chunk("big.bin", 5) == data[5 * 1024 * 1024 :]
    tampered = bytearray(data)
    tampered[3 * 1024 * 1024 + 7] ^= 1
    (root / "big.bin").write_bytes(bytes(tampered))
    assert reader.read_chunk("big.bin", 2) == data[2 * 1024 * 1024 : 3 * 1024 * 1024]
    with pytest.raises(ShardError, match="chunk 3"):
        reader.read_chunk("big.bin", 3)
    with pytest.raises(ShardError, match="chunk 3"):
        list(reader.iter_chunks("big.bin"))
    assert len(reader.log.records) == 1


def test_npy_shards_load_without_pickle(tmp_path: Path, key_pairs: Any, signer: Any) -> None:
    root = tmp_path / "arrays"
    root.mkdir()
    np.save(root / "ok.npy", np.arange(12.0).reshape(3, 4))
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    manifest = signer(root, key_pairs.alice, tmp_path / "m.json")
    verified = open_manifest(manifest, key_pairs.trust("alice"), data_dir=root)
    assert {s.name: s.records for s in verified.manifest.shards} == {"objects.npy": 1, "ok.npy": 3}
    reader = ShardReader(verified)
    assert reader.read_array("ok.npy").shape == (3, 4)
    with pytest.raises(ShardError) as caught:
        reader.read_array("objects.npy")
    assert caught.value.reason == "format"
