"""Checking a released model: its model-signing signature, its attestation's signature, and that both name the
same bytes (the attestation's subjects are exactly the signed files, digest for digest)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainguard.pipeline.attestation import VerifiedAttestation, cycle_record, verify_attestation
from trainguard.pipeline.errors import AttestationError, AttestationMismatchError
from trainguard.pipeline.model_sign import ATTESTATION_FILE, MODEL_FILE, file_sha256, verify_model_signature


@dataclass(frozen=True)
class ModelVerification:
    """What was checked and what the attestation says about the model's making."""

    model_dir: Path
    model_sha256: str
    files: dict[str, str]
    attestation: Path
    attestation_keyids: tuple[str, ...]
    invocation_id: str
    dependencies: tuple[dict[str, Any], ...]
    accepted_shards: int
    rejected_shards: int
    read_log_sha256: str
    cycle: int | None = None  # the cycle number the attestation records (attestations made before it: None)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": True,
            "model_dir": str(self.model_dir),
            "model_sha256": self.model_sha256,
            "files": self.files,
            "attestation": str(self.attestation),
            "attestation_keyids": list(self.attestation_keyids),
            "invocation_id": self.invocation_id,
            "dependencies": list(self.dependencies),
            "accepted_shards": self.accepted_shards,
            "rejected_shards": self.rejected_shards,
            "read_log_sha256": self.read_log_sha256,
            "cycle": self.cycle,
        }


def verify_model(
    model_dir: Path,
    attestation_path: Path | None,
    trusted_key: Path,
    attestation_keys: Sequence[Path] | None = None,
    threshold: int = 1,
) -> ModelVerification:
    """Verifies a model directory; raises ModelSignatureError, AttestationError or AttestationMismatchError.

    `trusted_key` is the model-signing public key (PEM); the attestation is checked against `attestation_keys`
    (default: the same key). The attestation defaults to the one inside the model directory.
    """
    model_dir = Path(model_dir)
    signed = verify_model_signature(model_dir, trusted_key)
    inside = model_dir / ATTESTATION_FILE
    chosen = Path(attestation_path) if attestation_path else inside
    keys = list(attestation_keys or [trusted_key])
    attestation = verify_attestation(chosen, keys, threshold)
    _check_subjects(attestation, signed.digests, model_dir)
    if chosen != inside and os.path.lexists(inside):  # the model's own attestation is unsigned by model.sig: check it
        _check_subjects(verify_attestation(inside, keys, threshold), signed.digests, model_dir)
    subjects = attestation.subjects
    model_sha256 = file_sha256(model_dir / MODEL_FILE)
    if model_sha256 != subjects.get(MODEL_FILE):
        raise AttestationMismatchError(f"{model_dir / MODEL_FILE}: changed during verification", path=str(model_dir))
    record = cycle_record(attestation.statement)
    predicate = attestation.statement["predicate"]
    return ModelVerification(
        model_dir=model_dir,
        model_sha256=model_sha256,
        files=dict(signed.digests),
        attestation=attestation.path,
        attestation_keyids=attestation.keyids,
        invocation_id=str(predicate["runDetails"]["metadata"].get("invocationId", "")),
        dependencies=tuple(predicate["buildDefinition"]["resolvedDependencies"]),
        accepted_shards=_shard_count(record, "accepted"),
        rejected_shards=_shard_count(record, "rejected"),
        read_log_sha256=str(record.get("readLog", {}).get("sha256", "")),
        cycle=_attested_cycle(record, attestation.path),
    )


def _shard_count(record: Mapping[str, Any], kind: str) -> int:
    """The number of shards the attested cycle `kind` ("accepted" or "rejected"): the record's `<kind>Count`, or, in an
    attestation made before the counts (which lists every decision), the length of its `<kind>` list."""
    shards = record.get("shards", {})
    count = shards.get(f"{kind}Count")
    return int(count) if count is not None else len(shards.get(kind, []))


def _attested_cycle(record: Mapping[str, Any], path: Path) -> int | None:
    """The cycle number in the attestation's trainguard record, if it has one; anything but an integer is refused."""
    cycle = record.get("cycle")
    if cycle is None:
        return None
    if not isinstance(cycle, int) or isinstance(cycle, bool) or cycle < 0:
        raise AttestationError(f"{path}: the attested cycle {cycle!r} is not a cycle number", path=str(path))
    return cycle


def _check_subjects(attestation: VerifiedAttestation, signed: Mapping[str, str], model_dir: Path) -> None:
    """The attestation's subjects are exactly the signed files, digest for digest; else AttestationMismatchError."""
    subjects = attestation.subjects
    for name, digest in sorted(signed.items()):
        if name not in subjects:
            raise AttestationMismatchError(
                f"{attestation.path}: does not attest {model_dir / name} (attests {', '.join(sorted(subjects))})",
                path=str(model_dir / name),
            )
        if subjects[name] != digest:
            raise AttestationMismatchError(
                f"{attestation.path}: attests {name} sha256 {subjects[name][:16]}..., but {model_dir / name} has "
                f"{digest[:16]}...: the model or the attestation was swapped",
                path=str(model_dir / name),
            )
    unsigned = sorted(set(subjects) - set(signed))
    if unsigned:
        raise AttestationMismatchError(
            f"{attestation.path}: attests {unsigned[0]}, which the model signature does not cover",
            path=str(model_dir / unsigned[0]),
        )
