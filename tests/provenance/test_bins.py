"""The binned manifest layout: each rank verifies only its own bins, and every bad bin is refused by its reason."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.provenance.conftest import Keys
from trainguard.provenance import MalformedError, TrustPolicy, VerificationReport, verify_dataset
from trainguard.provenance.bins import BIN_THRESHOLD, BinShare, bin_file, uses_bins
from trainguard.provenance.signing import build_manifest, write_signed

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _data(root: Path, count: int = 40) -> Path:
    for index in range(count):
        path = root / f"part-{index % 3}" / f"shard-{index:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(100 + index))
    return root


def _sign(data: Path, keys: Keys, out: Path, *, version: int = 1, role: str = "train") -> Path:
    manifest = build_manifest(data, source="a", role=role, version=version, now=NOW)
    return write_signed(manifest, keys.alice, out, layout="bins", bins=8)


def _verify(path: Path, data: Path, trust: TrustPolicy | Path, **options: Any) -> VerificationReport:
    return verify_dataset(path, trust, data_dir=data, state=path.parent / "s.json", record=False, now=NOW, **options)


@pytest.fixture
def signed(tmp_path: Path, key_pairs: Keys) -> tuple[Path, Path, TrustPolicy]:
    data = _data(tmp_path / "data")
    return _sign(data, key_pairs, tmp_path / "m.json"), data, TrustPolicy.of((key_pairs.alice.public,))


def test_the_shares_of_all_ranks_cover_every_shard_once_and_each_alone_verifies(signed: Any) -> None:
    path, data, trust = signed
    reports = [_verify(path, data, trust, share=(rank, 3)) for rank in range(3)]
    assert all(r.ok for r in reports)
    assert sum(r.shards for r in reports) == 40 == _verify(path, data, trust).shards
    assert all(0 < r.shards < 40 for r in reports)


def test_a_tampered_shard_fails_only_the_share_that_holds_it(signed: Any) -> None:
    path, data, trust = signed
    name = "part-0/shard-000.bin"
    (data / name).write_bytes(b"x" * 100)
    owner = next(rank for rank in range(3) if BinShare.of_rank(rank, 3, 8).holds(name))
    reports = [_verify(path, data, trust, share=(rank, 3)) for rank in range(3)]
    assert [(f.shard, f.reason) for f in reports[owner].failures] == [(name, "digest-mismatch")]
    assert all(r.ok for rank, r in enumerate(reports) if rank != owner)


def test_an_unlisted_file_is_reported_by_the_share_whose_bin_its_name_falls_in(signed: Any) -> None:
    path, data, trust = signed
    (data / "stray.bin").write_bytes(b"stray")
    failures = [f for rank in range(3) for f in _verify(path, data, trust, share=(rank, 3)).failures]
    assert [(f.shard, f.reason) for f in failures] == [("stray.bin", "unlisted")]


def test_a_tampered_bin_is_refused_as_bin_tampered(signed: Any) -> None:
    path, data, trust = signed
    bin_file(path, 3).write_bytes(bin_file(path, 3).read_bytes().replace(b'"size":', b'"size": '))
    assert _verify(path, data, trust).failures[0].reason == "bin-tampered"


def test_a_missing_bin_is_refused_as_bin_missing_but_other_shares_still_verify(signed: Any) -> None:
    path, data, trust = signed
    bin_file(path, 2).unlink()
    assert _verify(path, data, trust, share=(0, 2)).failures[0].reason == "bin-missing"
    assert _verify(path, data, trust, share=(1, 2)).ok


def test_one_bin_copied_over_another_is_refused_as_bin_swapped(signed: Any) -> None:
    path, data, trust = signed
    shutil.copyfile(bin_file(path, 1), bin_file(path, 0))
    assert _verify(path, data, trust).failures[0].reason == "bin-swapped"


def test_a_bin_of_an_older_version_is_refused_as_bin_rollback(tmp_path: Path, key_pairs: Keys) -> None:
    data = _data(tmp_path / "data")
    old = _sign(data, key_pairs, tmp_path / "old" / "m.json", version=1)
    (data / "part-0" / "shard-000.bin").write_bytes(b"changed")
    new = _sign(data, key_pairs, tmp_path / "m.json", version=2)
    trust = TrustPolicy.of((key_pairs.alice.public,))
    changed = next(i for i in range(8) if bin_file(old, i).read_bytes() != bin_file(new, i).read_bytes())
    shutil.copyfile(bin_file(old, changed), bin_file(new, changed))
    assert _verify(new, data, trust).failures[0].reason == "bin-rollback"


def test_a_role_the_key_set_may_not_grant_is_refused_from_the_top_level_statement(
    tmp_path: Path, key_pairs: Keys
) -> None:
    data = _data(tmp_path / "data")
    path = _sign(data, key_pairs, tmp_path / "m.json", role="holdout")
    for number in range(8):
        bin_file(path, number).unlink()  # refused before any bin is read
    report = _verify(path, data, TrustPolicy.of((key_pairs.alice.public,)))
    assert report.failures[0].reason == "unauthorized-role"


def test_a_single_file_manifest_has_no_shares(tmp_path: Path, key_pairs: Keys) -> None:
    data = _data(tmp_path / "data")
    manifest = build_manifest(data, source="a", now=NOW)
    path = write_signed(manifest, key_pairs.alice, tmp_path / "m.json", layout="single")
    with pytest.raises(MalformedError, match="no shares"):
        _verify(path, data, TrustPolicy.of((key_pairs.alice.public,)), share=(0, 2))


def test_the_auto_layout_writes_bins_only_above_the_threshold() -> None:
    assert not uses_bins(BIN_THRESHOLD, "auto")
    assert uses_bins(BIN_THRESHOLD + 1, "auto")
    assert uses_bins(1, "bins") and not uses_bins(10**7, "single")


def test_a_binned_manifest_is_co_signed_and_re_signing_it_grows_its_version(tmp_path: Path, key_pairs: Keys) -> None:
    from trainguard.provenance import cosign_manifest
    from trainguard.provenance.signing import previous_version

    data = _data(tmp_path / "data")
    path = _sign(data, key_pairs, tmp_path / "m.json", version=4)
    cosign_manifest(path, key_pairs.bob)
    both = TrustPolicy.of((key_pairs.alice.public, key_pairs.bob.public), threshold=2)
    assert _verify(path, data, both).ok
    assert previous_version(path) == 4


def test_a_rank_outside_the_world_is_refused() -> None:
    with pytest.raises(MalformedError, match="rank 3"):
        BinShare.of_rank(3, 3, 8)


def test_re_signing_a_folder_that_holds_its_binned_manifest_signs_none_of_the_manifests_own_files(
    tmp_path: Path, key_pairs: Keys
) -> None:
    """The bins folder (unsigned, rewritten at each signing) is the manifest's, as its bundle is: never a shard."""
    data = _data(tmp_path / "data")
    path = data / "m.json"
    first = build_manifest(data, source="a", now=NOW, exclude=(path,))
    write_signed(first, key_pairs.alice, path, layout="bins", bins=8)
    assert (data / "m.json.bins").is_dir() and (data / "m.sigstore.json").is_file()
    second = build_manifest(data, source="a", version=2, now=NOW, exclude=(path,))
    assert [s.name for s in second.shards] == [s.name for s in first.shards]
    write_signed(second, key_pairs.alice, path, layout="bins", bins=8)
    assert _verify(path, data, TrustPolicy.of((key_pairs.alice.public,))).ok
