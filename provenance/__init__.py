"""Signed, hash-verified training-data shards: keys, DSSE envelopes, in-toto manifests, verify and verify-on-read.

Torch- and Lightning-backed names (datasets, data module, callback) are imported lazily so
`import trainguard.provenance` stays cheap.
"""

from __future__ import annotations

from trainguard.lazy import lazy_getattr
from trainguard.provenance.dsse import Envelope, Signature, add_signature, pae, sign_envelope, verify_envelope
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
from trainguard.provenance.policy import TrustPolicy, load_trust
from trainguard.provenance.reader import ReadLog, ReadRecord, ShardReader
from trainguard.provenance.rollback import RollbackState, default_state_path
from trainguard.provenance.signing import cosign_manifest, sign_dataset, write_manifest
from trainguard.provenance.verify import (
    ShardFailure,
    VerificationReport,
    VerifiedManifest,
    open_manifest,
    verify_dataset,
    verify_or_raise,
)

_LAZY = {
    "ManifestSpec": "trainguard.provenance.dataset",
    "ShardDataset": "trainguard.provenance.dataset",
    "VerifiedDataModule": "trainguard.provenance.dataset",
    "VerifyDatasetCallback": "trainguard.provenance.callback",
    "dvc_tracked_md5": "trainguard.provenance.dvc",
    "dataset_input": "trainguard.provenance.dataset_input",
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
