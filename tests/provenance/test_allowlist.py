"""Verify once, train on exactly that: reads go through the verified statements and the allow-list, and the read
log must equal the list."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from trainguard.provenance import ShardReader, VerifiedDataModule, open_manifest
from trainguard.provenance.allowlist import AllowedShard, AllowList
from trainguard.provenance.errors import NotAllowedError, ReadLogMismatchError
from trainguard.provenance.reader import ReadLog

if TYPE_CHECKING:
    from conftest import Keys

ALICE = ("alice/shard-00.parquet", "alice/shard-01.parquet")


def _allow(verified: Any, names: tuple[str, ...]) -> AllowList:
    entries = {s.name: s for s in verified.manifest.shards}
    return AllowList.of(
        AllowedShard(verified.manifest_sha256, verified.manifest.dataset, name, entries[name].sha256) for name in names
    )


def test_a_verified_but_unaccepted_shard_is_not_allowed(manifest: Path, key_pairs: Keys, tmp_path: Path) -> None:
    verified = open_manifest(manifest, key_pairs.trust("alice"), state=tmp_path / "s.json")
    reader = ShardReader(verified, allow=_allow(verified, ALICE))
    assert len(reader.read_frame(ALICE[0])) == 120
    with pytest.raises(NotAllowedError, match="not on the allow-list") as refused:
        reader.read_bytes("bob/shard-00.parquet")
    assert (refused.value.reason, refused.value.shard) == ("not-allowed", "bob/shard-00.parquet")


def test_an_allow_list_entry_from_another_manifest_does_not_open_this_one(
    signer: Any, data_dir: Path, manifest: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    verified = open_manifest(manifest, key_pairs.trust("alice"), state=tmp_path / "s.json")
    newer = signer(data_dir, key_pairs.alice, tmp_path / "newer.json", dataset="digits", version=2)
    other = open_manifest(newer, key_pairs.trust("alice"), data_dir=data_dir, state=tmp_path / "s2.json")
    with pytest.raises(NotAllowedError):
        ShardReader(other, allow=_allow(verified, ALICE)).read_bytes(ALICE[0])


def test_the_data_module_trains_through_the_verified_statement_not_the_file_on_disk(
    signer: Any, data_dir: Path, manifest: Path, key_pairs: Keys, tmp_path: Path
) -> None:
    verified = open_manifest(manifest, key_pairs.trust("alice"), state=tmp_path / "s.json")
    allow = _allow(verified, (*ALICE, "holdout.parquet"))
    newer = signer(data_dir, key_pairs.alice, tmp_path / "newer.json", dataset="digits", version=2)
    manifest.write_bytes(newer.read_bytes())  # a newer, validly signed manifest put in place after screening
    module = VerifiedDataModule.from_verified([verified], allow, batch_size=32)
    module.setup("fit")
    assert len(module.train_set) == 240 and len(module.val_set) == 200
    read = {(r.manifest_sha256, r.name) for r in module.read_log.records}
    assert read == {(verified.manifest_sha256, name) for name in (*ALICE, "holdout.parquet")}
    allow.check_reads(module.read_log)


def test_a_read_log_with_a_stray_read_is_refused(manifest: Path, key_pairs: Keys, tmp_path: Path) -> None:
    verified = open_manifest(manifest, key_pairs.trust("alice"), state=tmp_path / "s.json")
    log = ReadLog()
    reader = ShardReader(verified, log)
    for name in (*ALICE, "bob/shard-00.parquet"):
        reader.read_bytes(name)
    with pytest.raises(ReadLogMismatchError, match=r"digits:bob/shard-00.parquet .* is not on the cycle's allow-list"):
        _allow(verified, ALICE).check_reads(log)


def test_an_accepted_shard_training_never_read_is_refused(manifest: Path, key_pairs: Keys, tmp_path: Path) -> None:
    verified = open_manifest(manifest, key_pairs.trust("alice"), state=tmp_path / "s.json")
    log = ReadLog()
    ShardReader(verified, log).read_bytes(ALICE[0])
    with pytest.raises(ReadLogMismatchError, match="training never read it"):
        _allow(verified, ALICE).check_reads(log)
