"""Signing a DVC-tracked data dir and cross-checking it against DVC's md5 record, in a real DVC repository.

DVC runs through its Python API in this process (`dvc.repo.Repo`, what the `dvc` command calls): what these tests
check is what DVC writes (its .dvc files, dvc.lock and cache), and each `dvc` process would spend a second on its
imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainguard.provenance import DvcMismatchError, dvc_tracked_md5, load_signing_key, verify_dataset


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A fresh git + DVC repository, as tests/conftest.py's (`git init`, `dvc init`, analytics off), with DVC's
    init in this process."""
    from dvc.repo import Repo

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "config", "user.email", "ci@trainguard.invalid")
    _git(repo, "config", "user.name", "trainguard tests")
    with Repo.init(str(repo)) as dvc, dvc.config.edit() as config:
        config["core"]["analytics"] = False
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "init")
    return repo


def _dvc_add(repo: Path, target: Path) -> None:
    """`dvc add target`."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc:
        dvc.add(str(target))


def test_dvc_tracked_dir_is_signed_and_cross_checked(
    dvc_repo: Path, data_dir: Path, key_pairs: Any, signer: Any
) -> None:
    data = dvc_repo / "data"
    shutil.copytree(data_dir, data)
    _dvc_add(dvc_repo, data)
    tracked = dvc_tracked_md5(data)
    assert set(tracked) == {
        "alice/shard-00.parquet",
        "alice/shard-01.parquet",
        "bob/shard-00.parquet",
        "holdout.parquet",
        "raw.bin",
    }
    manifest = signer(
        data, load_signing_key(key_pairs.private("alice")), dvc_repo / "data.manifest.json", dvc_md5=tracked
    )
    assert verify_dataset(manifest, key_pairs.trust("alice"), data_dir=data, dvc=True).ok

    (data / "raw.bin").write_bytes(b"changed after dvc add")
    with pytest.raises(DvcMismatchError, match=r"raw\.bin"):
        signer(data, key_pairs.alice, dvc_repo / "again.json", dvc_md5=dvc_tracked_md5(data))
    _dvc_add(dvc_repo, data)
    resigned = signer(
        data,
        key_pairs.alice,
        dvc_repo / "data.manifest.json",
        dvc_md5=dvc_tracked_md5(data),
        previous=dvc_repo / "data.manifest.json",
    )
    report = verify_dataset(resigned, key_pairs.trust("alice"), data_dir=data, dvc=True)
    assert report.ok and report.version == 2

    (data / "alice" / "shard-00.parquet").write_bytes(b"tampered")
    report = verify_dataset(resigned, key_pairs.trust("alice"), data_dir=data, dvc=True)
    assert {f.shard: f.reason for f in report.failures} == {"alice/shard-00.parquet": "truncated"}


def test_dvc_lock_outs_are_cross_checked(dvc_repo: Path, data_dir: Path, key_pairs: Any, signer: Any) -> None:
    (dvc_repo / "dvc.yaml").write_text(
        f"stages:\n  copy:\n    cmd: {sys.executable} -c \"import shutil; shutil.copytree('{data_dir}', 'data')\"\n"
        "    outs:\n      - data\n"
    )
    from dvc.repo import Repo

    with Repo(str(dvc_repo)) as dvc:  # `dvc repro` in the repository (a target names its dvc.yaml, not ours here)
        dvc.reproduce(str(dvc_repo / "dvc.yaml"))
    tracked = dvc_tracked_md5(dvc_repo / "data")
    manifest = signer(dvc_repo / "data", key_pairs.alice, dvc_repo / "m.json", dvc_md5=tracked)
    assert verify_dataset(manifest, key_pairs.trust("alice"), data_dir=dvc_repo / "data", dvc=True).ok
    extra = dvc_repo / "data" / "late.bin"
    extra.write_bytes(b"late")
    report = verify_dataset(manifest, key_pairs.trust("alice"), data_dir=dvc_repo / "data", dvc=True, allow_extra=True)
    assert report.ok


def _fake_repo(tmp_path: Path, listing: bytes) -> Path:
    """A DVC repository built by hand whose data dir's cache listing is `listing` (stored under its own md5)."""
    import hashlib

    digest = hashlib.md5(listing, usedforsecurity=False).hexdigest()
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "data.dvc").write_text(f"outs:\n- path: data\n  md5: {digest}.dir\n  hash: md5\n")
    cached = tmp_path / ".dvc" / "cache" / "files" / "md5" / digest[:2] / f"{digest[2:]}.dir"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(listing)
    return tmp_path / "data"


@pytest.mark.parametrize(
    ("listing", "error", "complaint"),
    [
        (b'{"relpath": "a", "md5": "00000000000000000000000000000000"}', "DataDirError", "cannot load its listing"),
        (b'["a"]', "DataDirError", "cannot load its listing"),
        (b'[{"relpath": "a"}]', "DataDirError", "no listing"),
        (b'[{"relpath": "a", "md5": "not-hex"}]', "MalformedError", "has md5 'not-hex'"),
        (b'[{"relpath": "../escape", "md5": "00000000000000000000000000000000"}]', "DataDirError", "cannot read"),
        (b'[{"relpath": "a\\nb", "md5": "00000000000000000000000000000000"}]', "MalformedError", "unsafe"),
        (b"[" * 10_000, "DataDirError", "cannot load its listing"),
    ],
    ids=["object", "string-entry", "no-md5", "non-hex-md5", "dotdot", "newline", "deep"],
)
def test_a_malformed_dvc_cache_listing_is_one_line_of_bad_input(
    tmp_path: Path, listing: bytes, error: str, complaint: str
) -> None:
    """DVC parses its listing; what it cannot load, or loads with an unsafe name or a malformed md5, is refused."""
    from trainguard import provenance

    data = _fake_repo(tmp_path, listing)
    with pytest.raises(getattr(provenance, error)) as caught:
        dvc_tracked_md5(data)
    assert complaint in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.exit_code == 2


def test_a_well_formed_hand_made_listing_is_read(tmp_path: Path) -> None:
    data = _fake_repo(tmp_path, b'[{"relpath": "a/b.bin", "md5": "0123456789abcdef0123456789abcdef"}]')
    assert dvc_tracked_md5(data) == {"a/b.bin": "0123456789abcdef0123456789abcdef"}


def test_a_fifo_dvc_file_is_refused_without_hanging(tmp_path: Path) -> None:
    import os

    from trainguard.provenance import DataDirError

    data = _fake_repo(tmp_path, b"[]")
    (tmp_path / "data.dvc").unlink()
    os.mkfifo(tmp_path / "data.dvc")
    with pytest.raises(DataDirError) as caught:
        dvc_tracked_md5(data)
    assert caught.value.exit_code == 2


def test_a_listing_only_the_remote_holds_is_read_with_the_global_config_and_the_record_names_the_remote(
    dvc_repo: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DVC reads the listing wherever its whole config says: a cache dir set in the user's global config, then the
    default remote once the cache is gone; `dvc_record` names that remote and the URL of the data's listing."""
    from dvc.repo import Repo

    from trainguard.provenance.dvc import dvc_record

    global_dir, cache, remote = tmp_path / "global", tmp_path / "cache", tmp_path / "remote"
    global_dir.mkdir()
    (global_dir / "config").write_text(f"[cache]\n    dir = {cache}\n")
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", str(global_dir))
    data = dvc_repo / "data"
    shutil.copytree(data_dir, data)
    with Repo(str(dvc_repo)) as dvc:
        dvc.add(str(data))
        with dvc.config.edit() as config:
            config["remote"]["store"] = {"url": str(remote)}
            config["remote"]["web"] = {"url": "https://user:secret@example.invalid:8443/dvc"}
            config["core"]["remote"] = "store"
    with Repo(str(dvc_repo)) as dvc:
        dvc.push()
    assert not (dvc_repo / ".dvc" / "cache").exists() and cache.is_dir()
    tracked = dvc_tracked_md5(data)
    assert set(tracked) == {"alice/shard-00.parquet", "alice/shard-01.parquet", "bob/shard-00.parquet"} | {
        "holdout.parquet",
        "raw.bin",
    }
    shutil.rmtree(cache)
    assert dvc_tracked_md5(data / "alice") == {k.removeprefix("alice/"): v for k, v in tracked.items() if "alice" in k}

    record = dvc_record(dvc_repo / "data", [data / "alice"])
    assert record is not None and record.lock_sha256 is None
    assert record.remotes == {"store": str(remote), "web": "https://example.invalid:8443/dvc"}  # no credentials
    assert record.data.keys() == {data}  # the DVC out that holds it
    assert record.data[data].startswith(f"{remote}/files/md5/") and record.data[data].endswith(".dir")
    assert dvc_record(tmp_path / "global") is None
