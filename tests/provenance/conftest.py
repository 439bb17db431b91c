"""Fixtures for provenance tests: key pairs on disk and a small signed dataset of digits parquet shards."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from trainguard.provenance import (
    ShardEntry,
    SigningKey,
    generate_signing_key,
    sign_dataset,
    write_keypair,
    write_manifest,
)


@dataclass(frozen=True)
class Keys:
    alice: SigningKey
    bob: SigningKey
    carol: SigningKey
    folder: Path

    def pub(self, name: str) -> Path:
        return self.folder / f"{name}.pub"

    def trust(self, name: str) -> Path:
        """A 1-of-1 policy for `name`'s key granting every dataset, source and role (a bare .pub grants `train`)."""
        path = self.folder / f"{name}-policy.json"
        policy = {"name": name, "keys": [f"{name}.pub"], "roles": ["train", "trusted", "holdout"]}
        path.write_text(json.dumps(policy))
        return path

    def private(self, name: str) -> Path:
        return self.folder / f"{name}.key"


@pytest.fixture(scope="session")
def key_pairs(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    folder = tmp_path_factory.mktemp("keys")
    keys = {
        name: generate_signing_key(kind)
        for name, kind in [("alice", "ed25519"), ("bob", "ecdsa-p256"), ("carol", "ed25519")]
    }
    for name, key in keys.items():
        write_keypair(key, folder / name)
    return Keys(folder=folder, **keys)


def digits_frame(rows: slice) -> pd.DataFrame:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    frame = pd.DataFrame((bunch.data[rows] / 16.0).astype(np.float32), columns=[f"pixel_{i:02d}" for i in range(64)])
    frame["label"] = bunch.target[rows].astype(np.int64)
    return frame


SHARDS = {
    "alice/shard-00.parquet": slice(0, 120),
    "alice/shard-01.parquet": slice(120, 240),
    "bob/shard-00.parquet": slice(240, 360),
    "holdout.parquet": slice(360, 560),
}
SOURCES = {"alice/": "alice", "bob/": "bob", "holdout.parquet": "curator", "raw.bin": "sensor"}
ROLES = {"holdout.parquet": "holdout"}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """Four parquet shards (two contributors in sub-folders, one holdout) and a raw binary shard."""
    root = tmp_path / "data"
    for name, rows in SHARDS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        digits_frame(rows).to_parquet(root / name, index=False)
    (root / "raw.bin").write_bytes(np.random.default_rng(0).bytes(3000))
    return root


def sign(data_dir: Path, key: SigningKey, out: Path, **options: object) -> Path:
    settings = {"sources": SOURCES, "source": "curator", "roles": ROLES, "exclude": (out,)} | options
    envelope, _ = sign_dataset(data_dir, key, **settings)  # type: ignore[arg-type]
    return write_manifest(envelope, out)


@pytest.fixture
def signer() -> object:
    """`sign(data_dir, key, out, **options)`: signs with the test sources and roles."""
    return sign


@pytest.fixture
def manifest(data_dir: Path, key_pairs: Keys) -> Path:
    """The dataset signed by alice, written in the data dir (the default data dir of `verify`)."""
    return sign(data_dir, key_pairs.alice, data_dir / "manifest.json", dataset="digits")


def signed_again(manifest: Path, key: SigningKey, change: Callable[[ShardEntry], ShardEntry]) -> Path:
    """The manifest with each shard's entry passed through `change`, signed again by `key`."""
    from trainguard.provenance import PAYLOAD_TYPE, parse_statement, sign_envelope
    from trainguard.provenance.manifest import statement_bytes
    from trainguard.provenance.verify import read_envelope

    signed = parse_statement(read_envelope(manifest)[1].payload)
    shards = tuple(change(s) for s in signed.shards)
    envelope = sign_envelope(PAYLOAD_TYPE, statement_bytes(replace(signed, shards=shards)), key)
    return write_manifest(envelope, manifest)


@pytest.fixture
def resign() -> object:
    """`resign(manifest, key, change)`: the manifest with each shard entry passed through `change`, signed again."""
    return signed_again
