"""Signing a DVC-tracked data dir and cross-checking it against DVC's md5 record, in a real DVC repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from trainguard.provenance import DvcMismatchError, dvc_tracked_md5, load_signing_key, verify_dataset

DVC = str(Path(sys.executable).parent / "dvc")


def test_dvc_tracked_dir_is_signed_and_cross_checked(
    dvc_repo: Path, data_dir: Path, key_pairs: Any, signer: Any
) -> None:
    data = dvc_repo / "data"
    shutil.copytree(data_dir, data)
    subprocess.run([DVC, "add", "data"], cwd=dvc_repo, check=True, capture_output=True)
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
    subprocess.run([DVC, "add", "data"], cwd=dvc_repo, check=True, capture_output=True)
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
    subprocess.run([DVC, "repro", "-q"], cwd=dvc_repo, check=True, capture_output=True)
    tracked = dvc_tracked_md5(dvc_repo / "data")
    manifest = signer(dvc_repo / "data", key_pairs.alice, dvc_repo / "m.json", dvc_md5=tracked)
    assert verify_dataset(manifest, key_pairs.trust("alice"), data_dir=dvc_repo / "data", dvc=True).ok
    extra = dvc_repo / "data" / "late.bin"
    extra.write_bytes(b"late")
    report = verify_dataset(manifest, key_pairs.trust("alice"), data_dir=dvc_repo / "data", dvc=True, allow_extra=True)
    assert report.ok
