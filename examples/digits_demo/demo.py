"""The demo: the whole defended retraining cycle on digits, from nothing, with two attacks on the data.

A curator signs a trusted base and held-out set; a data owner signs four contributors' shards, one of whom
(`dave`) poisoned his labels before signing; after signing, an attacker with write access to storage flips a
byte of one of `carol`'s shards. The cycle refuses the tampered shard by name, rejects the poisoned shards by
RONI, trains adversarially, and signs the accepted model with its attestation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from digits_demo.prepare import TRUSTED_SOURCE, prepare_digits
from digits_demo.threats import poison_shards, tamper_file
from trainguard.pipeline.config import load_config
from trainguard.provenance.keys import generate_signing_key, load_signing_key, write_keypair
from trainguard.provenance.signing import sign_dataset, write_manifest

POISONED_SOURCE = "dave"
POISON_FRACTION = 0.3
TAMPERED_SHARD = "carol/b0-shard-01"


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def create_keys(keys: Path) -> None:
    """The curator's and the data owner's Ed25519 keys, and the ECDSA P-256 key models are signed with."""
    for name, kind in (("curator", "ed25519"), ("owner", "ed25519"), ("model", "ecdsa-p256")):
        write_keypair(generate_signing_key(kind), keys / name)


def sign_trusted(data: Path, keys: Path) -> Path:
    """The curator signs `trusted/`: the base set (role trusted) and the held-out set (role holdout), roles that
    the trust policy grants the curator's key alone."""
    roles = {"holdout.*": "holdout", "base.*": "trusted"}
    key = load_signing_key(keys / "curator.key")
    envelope, _ = sign_dataset(data / "trusted", key, dataset="digits-trusted", source=TRUSTED_SOURCE, roles=roles)
    return write_manifest(envelope, data / "trusted.manifest.json", key.public)


def sign_contributions(data: Path, keys: Path, sources: dict[str, str]) -> Path:
    """The data owner signs `train/` with each shard's contributor; a re-sign bumps the manifest version."""
    out = data / "train.manifest.json"
    key = load_signing_key(keys / "owner.key")
    envelope, _ = sign_dataset(
        data / "train", key, dataset="digits-contributed", sources=sources, previous=out if out.exists() else None
    )
    return write_manifest(envelope, out, key.public)


def stage_data(root: Path, shard_format: str = "parquet") -> None:
    """Writes keys, shards (one source poisoned before signing), both signed manifests, then tampers a shard."""
    if root.exists():
        shutil.rmtree(root)
    create_keys(root / "keys")
    data = root / "data"
    contributed = prepare_digits(data, shard_format=shard_format).contributed()
    kind = "WebDataset image tars" if shard_format == "images" else "parquet tables"
    _say(f"prepared {len(contributed)} contributed shards ({kind}) from {len(set(contributed.values()))} sources")
    poisoned = [data / "train" / name for name, source in contributed.items() if source == POISONED_SOURCE]
    poison_shards(poisoned, POISON_FRACTION, seed=1)
    _say(
        f"source {POISONED_SOURCE} flipped {POISON_FRACTION:.0%} of the labels in {len(poisoned)} shards "
        "(before signing)"
    )
    sign_trusted(data, root / "keys")
    sign_contributions(data, root / "keys", contributed)
    _say("the curator signed the trusted base and held-out set; the data owner signed the contributions")
    tampered = next(name for name in contributed if name.startswith(TAMPERED_SHARD))
    tamper_file(data / "train" / tampered)
    _say(f"an attacker flipped one byte of train/{tampered} after signing")


def run_demo(config_path: Path) -> int:
    """Runs the demo end to end; returns the exit code (0 when the cycle accepted a model)."""
    from trainguard.pipeline.commands.cycle import print_outcome
    from trainguard.pipeline.cycle import run_cycle

    config = load_config(config_path)
    root = config.output.work_dir.parent
    stage_data(root, "images" if ".tar" in config.data.decoders else "parquet")
    public_key = root / "keys" / "model.pub"
    _say(f"running the retraining cycle: trainguard cycle --config {config_path}")
    outcome = run_cycle(config_path)
    print_outcome(outcome)
    robust = json.loads(outcome.report.read_text()).get("training", {}).get("robust_accuracy", {})
    clean = outcome.metrics.get("val/acc", float("nan"))
    _say(
        f"clean held-out accuracy {clean:.3f}; robust accuracy "
        + ", ".join(f"{v:.3f} at eps {k}" for k, v in robust.items())
    )
    if outcome.model_dir:
        attestation = outcome.model_dir / "attestation.intoto.json"
        _say(f"check it: trainguard verify-model {outcome.model_dir} --attestation {attestation} --key {public_key}")
        _say(
            f"or with OpenSSF's tool: model_signing verify key {outcome.model_dir} "
            f"--signature {outcome.model_dir / 'model.sig'} --public_key {public_key}"
        )
    uri = config.tracking.resolved_uri()
    _say(f"open the MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri}")
    return 0 if outcome.status == "accepted" else 1
