"""The data owner's step of the digits DVC pipeline, run outside it: `dvc repro` never signs and never makes keys.

The data owner holds the curator's and the data owner's private keys (made once with `trainguard keygen`; only
their `.pub` halves are committed). `publish` adds a batch of contributed shards beside the earlier ones, has the
curator sign the trusted base and held-out set once, re-signs the contributions (the manifest's version goes up by
one) and tracks the whole data folder with DVC (`demo-work/data.dvc`); the owner then commits that file and runs
`dvc push`. The pipeline only verifies what was published.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from digits_demo.demo import sign_contributions, sign_trusted
from digits_demo.prepare import Layout, prepare_digits
from trainguard.files import atomic_write
from trainguard.provenance.dvc import find_repo_root
from trainguard.provenance.errors import KeyFileError

OWNER_KEYS = ("curator", "owner")
"""The private keys `publish` signs with, under the keys folder: the curator's and the data owner's."""


@dataclass(frozen=True)
class Published:
    """What one `publish` left: the data folder, its DVC file, and how many contributed shards it now holds."""

    data: Path
    dvc_file: Path
    contributed: int


def publish(root: Path, batch: int, seed: int = 0) -> Published:
    """Adds contributed batch `batch` to `root/data`, signs, and `dvc add`s the data folder.

    Args:
        root: The demo's folder (`demo-work`): `keys/` holds the owner's keys, `data/` the published data.
        batch: Which batch of contributions to add (its shards join the earlier batches' shards).
        seed: The digits shuffle (keep it across batches, so batches stay disjoint).

    Returns:
        The data folder, its DVC file and the number of contributed shards it holds.

    Raises:
        KeyFileError: A private key of `OWNER_KEYS` is not under `root/keys` (make it with `trainguard keygen`).
    """
    keys, data = root / "keys", root / "data"
    missing = [keys / f"{name}.key" for name in OWNER_KEYS if not (keys / f"{name}.key").is_file()]
    if missing:
        prefix = missing[0].with_suffix("")
        raise KeyFileError(
            f"no key {missing[0]}: make it once with `trainguard keygen --out {prefix}`", path=str(prefix)
        )
    sources_file = data / "train-sources.json"
    known = json.loads(sources_file.read_text()) if sources_file.exists() else {}
    contributed = known | prepare_digits(data, Layout(), batch, seed).contributed()
    atomic_write(sources_file, (json.dumps(contributed, indent=2, sort_keys=True) + "\n").encode())
    if not (data / "trusted.manifest.json").exists():  # the same base and held-out rows each batch: signed once
        sign_trusted(data, keys)
    sign_contributions(data, keys, contributed)
    from dvc.repo import Repo

    with Repo(str(find_repo_root(data.resolve()))) as repo:
        repo.add(str(data))
    return Published(data, data.with_name(f"{data.name}.dvc"), len(contributed))
