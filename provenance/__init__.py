"""Signed, hash-verified training-data shards: keys, DSSE envelopes, in-toto manifests, verify and verify-on-read.

Every name but the errors is imported on first use, so a command that needs only part of the package (`trainguard
verify` needs no reader, signer or torch) does not pay for the rest.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trainguard.errors import TrainguardError
from trainguard.lazy import lazy_getattr
from trainguard.provenance.errors import (
    AlreadySignedError,
    BadSignatureError,
    DataDirError,
    DvcMismatchError,
    ExpiredError,
    KeyFileError,
    MalformedError,
    PayloadTypeError,
    PolicyError,
    ProvenanceError,
    RollbackError,
    ShardError,
    SignatureError,
    ThresholdError,
    UntrustedSignerError,
    VerificationFailed,
)

if TYPE_CHECKING:
    from trainguard.provenance.dsse import (
        Envelope,
        Signature,
        add_signature,
        pae,
        sign_envelope,
        verify_envelope,
    )
    from trainguard.provenance.keys import (
        KeyType,
        SigningKey,
        VerifyingKey,
        generate_signing_key,
        load_signing_key,
        load_verifying_key,
        write_keypair,
    )
    from trainguard.provenance.manifest import (
        PAYLOAD_TYPE,
        PREDICATE_TYPE,
        STATEMENT_TYPE,
        Manifest,
        ShardEntry,
        parse_statement,
    )
    from trainguard.provenance.policy import (
        TrustPolicy,
        load_trust,
    )
    from trainguard.provenance.reader import (
        ReadLog,
        ReadRecord,
        ShardReader,
    )
    from trainguard.provenance.rollback import (
        RollbackState,
        default_state_path,
    )
    from trainguard.provenance.signing import (
        cosign_manifest,
        sign_dataset,
        write_manifest,
    )
    from trainguard.provenance.verify import (
        ShardFailure,
        VerificationReport,
        VerifiedManifest,
        open_manifest,
        verify_dataset,
        verify_or_raise,
    )

_LAZY = {
    "Envelope": "trainguard.provenance.dsse",
    "Signature": "trainguard.provenance.dsse",
    "add_signature": "trainguard.provenance.dsse",
    "pae": "trainguard.provenance.dsse",
    "sign_envelope": "trainguard.provenance.dsse",
    "verify_envelope": "trainguard.provenance.dsse",
    "KeyType": "trainguard.provenance.keys",
    "SigningKey": "trainguard.provenance.keys",
    "VerifyingKey": "trainguard.provenance.keys",
    "generate_signing_key": "trainguard.provenance.keys",
    "load_signing_key": "trainguard.provenance.keys",
    "load_verifying_key": "trainguard.provenance.keys",
    "write_keypair": "trainguard.provenance.keys",
    "PAYLOAD_TYPE": "trainguard.provenance.manifest",
    "PREDICATE_TYPE": "trainguard.provenance.manifest",
    "STATEMENT_TYPE": "trainguard.provenance.manifest",
    "Manifest": "trainguard.provenance.manifest",
    "ShardEntry": "trainguard.provenance.manifest",
    "parse_statement": "trainguard.provenance.manifest",
    "TrustPolicy": "trainguard.provenance.policy",
    "load_trust": "trainguard.provenance.policy",
    "ReadLog": "trainguard.provenance.reader",
    "ReadRecord": "trainguard.provenance.reader",
    "ShardReader": "trainguard.provenance.reader",
    "RollbackState": "trainguard.provenance.rollback",
    "default_state_path": "trainguard.provenance.rollback",
    "cosign_manifest": "trainguard.provenance.signing",
    "sign_dataset": "trainguard.provenance.signing",
    "write_manifest": "trainguard.provenance.signing",
    "ShardFailure": "trainguard.provenance.verify",
    "VerificationReport": "trainguard.provenance.verify",
    "VerifiedManifest": "trainguard.provenance.verify",
    "open_manifest": "trainguard.provenance.verify",
    "verify_dataset": "trainguard.provenance.verify",
    "verify_or_raise": "trainguard.provenance.verify",
    "ManifestSpec": "trainguard.provenance.dataset",
    "ShardDataset": "trainguard.provenance.dataset",
    "VerifiedDataModule": "trainguard.provenance.dataset",
    "VerifyDatasetCallback": "trainguard.provenance.callback",
    "dvc_tracked_md5": "trainguard.provenance.dvc",
}

__all__ = [
    "PAYLOAD_TYPE",
    "PREDICATE_TYPE",
    "STATEMENT_TYPE",
    "Manifest",
    "ReadLog",
    "ReadRecord",
    "RollbackState",
    "ShardEntry",
    "ShardFailure",
    "ShardReader",
    "TrustPolicy",
    "VerificationReport",
    "VerifiedManifest",
    "cosign_manifest",
    "default_state_path",
    "load_trust",
    "open_manifest",
    "parse_statement",
    "sign_dataset",
    "verify_dataset",
    "verify_or_raise",
    "write_manifest",
    "AlreadySignedError",
    "BadSignatureError",
    "DataDirError",
    "DvcMismatchError",
    "Envelope",
    "ExpiredError",
    "KeyFileError",
    "KeyType",
    "MalformedError",
    "PayloadTypeError",
    "PolicyError",
    "ProvenanceError",
    "RollbackError",
    "ShardError",
    "Signature",
    "SignatureError",
    "SigningKey",
    "ThresholdError",
    "TrainguardError",
    "UntrustedSignerError",
    "VerificationFailed",
    "VerifyingKey",
    "add_signature",
    "generate_signing_key",
    "load_signing_key",
    "load_verifying_key",
    "pae",
    "sign_envelope",
    "verify_envelope",
    "write_keypair",
    *_LAZY,
]

__getattr__ = lazy_getattr(__name__, _LAZY)
