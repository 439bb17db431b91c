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

from pipeline.config import load_config
from pipeline.prepare import TRUSTED_SOURCE, prepare_digits
from pipeline.threats import poison_shards, tamper_file
from provenance.keys import generate_signing_key, write_keypair
from provenance.signing import sign_dataset, write_manifest

POISONED_SOURCE = "dave"
POISON_FRACTION = 0.3
TAMPERED_SHARD = "carol/b0-shard-01.parquet"


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def stage_data(root: Path) -> dict[str, Path]:
    """Writes keys, shards (one source poisoned before signing), both signed manifests, then tampers a shard."""
    if root.exists():
        shutil.rmtree(root)
    keys = root / "keys"
    for name, kind in (("curator", "ed25519"), ("owner", "ed25519"), ("model", "ecdsa-p256")):
        write_keypair(generate_signing_key(kind), keys / name)
    data = root / "data"
    prepared = prepare_digits(data)
    contributed = prepared.contributed()
    _say(f"prepared {len(contributed)} contributed shards from {len(set(contributed.values()))} sources")
    poisoned = [data / "train" / name for name, source in contributed.items() if source == POISONED_SOURCE]
    poison_shards(poisoned, POISON_FRACTION, seed=1)
    _say(f"source {POISONED_SOURCE} flipped {POISON_FRACTION:.0%} of the labels in {len(poisoned)} shards (before signing)")

    from provenance.keys import load_signing_key

    roles = {"holdout.parquet": "holdout", "base.parquet": "train"}
    envelope, _ = sign_dataset(
        data / "trusted", load_signing_key(keys / "curator.key"), dataset="digits-trusted", source=TRUSTED_SOURCE, roles=roles
    )
    write_manifest(envelope, data / "trusted.manifest.json")
    envelope, _ = sign_dataset(data / "train", load_signing_key(keys / "owner.key"), dataset="digits-contributed", sources=contributed)
    write_manifest(envelope, data / "train.manifest.json")
    _say("curator signed the trusted base and held-out set; the data owner signed the contributions")
    tamper_file(data / "train" / TAMPERED_SHARD)
    _say(f"an attacker flipped one byte of train/{TAMPERED_SHARD} after signing")
    return {"model_pub": keys / "model.pub"}


def run_demo(config_path: Path) -> int:
    """Runs the demo end to end; returns the exit code (0 when the cycle accepted a model)."""
    from pipeline.commands.cycle import print_outcome
    from pipeline.cycle import run_cycle

    config = load_config(config_path)
    root = config.output.work_dir.parent
    keys = stage_data(root)
    _say(f"running the retraining cycle: trainguard cycle --config {config_path}")
    outcome = run_cycle(config_path)
    print_outcome(outcome)
    robust = json.loads(outcome.report.read_text()).get("training", {}).get("robust_accuracy", {})
    clean = outcome.metrics.get("val/acc", float("nan"))
    _say(f"clean held-out accuracy {clean:.3f}; robust accuracy " + ", ".join(f"{v:.3f} at eps {k}" for k, v in robust.items()))
    if outcome.model_dir:
        attestation = outcome.model_dir / "attestation.intoto.json"
        _say(f"check it: trainguard verify-model {outcome.model_dir} --attestation {attestation} --key {keys['model_pub']}")
        _say(f"or with OpenSSF's tool: model_signing verify key {outcome.model_dir} --signature {outcome.model_dir / 'model.sig'} --public_key {keys['model_pub']}")
    uri = config.tracking.resolved_uri()
    _say(f"open the MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri}")
    return 0 if outcome.status == "accepted" else 1
