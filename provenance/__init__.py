"""Signed, hash-verified training-data shards: keys, DSSE envelopes (and their Sigstore bundles), in-toto manifests,
verify and verify-on-read.

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

# What each lazy name is, for type checkers and IDEs (to them `__getattr__` alone makes every name Any).
if TYPE_CHECKING:
    from trainguard.provenance.callback import VerifyDatasetCallback as VerifyDatasetCallback
    from trainguard.provenance.dataset import ShardDataset as ShardDataset
    from trainguard.provenance.dataset import VerifiedDataModule as VerifiedDataModule
    from trainguard.provenance.dsse import Envelope as Envelope
    from trainguard.provenance.dsse import Signature as Signature
    from trainguard.provenance.dsse import add_signature as add_signature
    from trainguard.provenance.dsse import pae as pae
    from trainguard.provenance.dsse import sign_envelope as sign_envelope
    from trainguard.provenance.dsse import verify_envelope as verify_envelope
    from trainguard.provenance.dvc import dvc_tracked_md5 as dvc_tracked_md5
    from trainguard.provenance.keys import KeyType as KeyType
    from trainguard.provenance.keys import SigningKey as SigningKey
    from trainguard.provenance.keys import VerifyingKey as VerifyingKey
    from trainguard.provenance.keys import generate_signing_key as generate_signing_key
    from trainguard.provenance.keys import load_signing_key as load_signing_key
    from trainguard.provenance.keys import load_verifying_key as load_verifying_key
    from trainguard.provenance.keys import write_keypair as write_keypair
    from trainguard.provenance.manifest import PAYLOAD_TYPE as PAYLOAD_TYPE
    from trainguard.provenance.manifest import PREDICATE_TYPE as PREDICATE_TYPE
    from trainguard.provenance.manifest import STATEMENT_TYPE as STATEMENT_TYPE
    from trainguard.provenance.manifest import Manifest as Manifest
    from trainguard.provenance.manifest import ShardEntry as ShardEntry
    from trainguard.provenance.manifest import parse_statement as parse_statement
    from trainguard.provenance.manifest_ref import ManifestRef as ManifestRef
    from trainguard.provenance.merkle import InclusionProof as InclusionProof
    from trainguard.provenance.merkle import inclusion_proof as inclusion_proof
    from trainguard.provenance.merkle import merkle_root as merkle_root
    from trainguard.provenance.merkle import shard_leaf as shard_leaf
    from trainguard.provenance.merkle import shard_leaves as shard_leaves
    from trainguard.provenance.merkle import verify_inclusion as verify_inclusion
    from trainguard.provenance.policy import TrustPolicy as TrustPolicy
    from trainguard.provenance.policy import load_trust as load_trust
    from trainguard.provenance.reader import ReadLog as ReadLog
    from trainguard.provenance.reader import ReadRecord as ReadRecord
    from trainguard.provenance.reader import ShardReader as ShardReader
    from trainguard.provenance.rollback import RollbackState as RollbackState
    from trainguard.provenance.rollback import default_state_path as default_state_path
    from trainguard.provenance.signing import cosign_manifest as cosign_manifest
    from trainguard.provenance.signing import sign_dataset as sign_dataset
    from trainguard.provenance.signing import write_manifest as write_manifest
    from trainguard.provenance.sigstore_bundle import bundle_json as bundle_json
    from trainguard.provenance.sigstore_bundle import bundle_path as bundle_path
    from trainguard.provenance.sigstore_bundle import write_bundle as write_bundle
    from trainguard.provenance.verify import ShardFailure as ShardFailure
    from trainguard.provenance.verify import VerificationReport as VerificationReport
    from trainguard.provenance.verify import VerifiedManifest as VerifiedManifest
    from trainguard.provenance.verify import open_manifest as open_manifest
    from trainguard.provenance.verify import verify_dataset as verify_dataset
    from trainguard.provenance.verify import verify_or_raise as verify_or_raise

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
    "InclusionProof": "trainguard.provenance.merkle",
    "inclusion_proof": "trainguard.provenance.merkle",
    "merkle_root": "trainguard.provenance.merkle",
    "shard_leaf": "trainguard.provenance.merkle",
    "shard_leaves": "trainguard.provenance.merkle",
    "verify_inclusion": "trainguard.provenance.merkle",
    "TrustPolicy": "trainguard.provenance.policy",
    "load_trust": "trainguard.provenance.policy",
    "ReadLog": "trainguard.provenance.reader",
    "ReadRecord": "trainguard.provenance.reader",
    "ShardReader": "trainguard.provenance.reader",
    "RollbackState": "trainguard.provenance.rollback",
    "default_state_path": "trainguard.provenance.rollback",
    "bundle_json": "trainguard.provenance.sigstore_bundle",
    "bundle_path": "trainguard.provenance.sigstore_bundle",
    "write_bundle": "trainguard.provenance.sigstore_bundle",
    "cosign_manifest": "trainguard.provenance.signing",
    "sign_dataset": "trainguard.provenance.signing",
    "write_manifest": "trainguard.provenance.signing",
    "ShardFailure": "trainguard.provenance.verify",
    "VerificationReport": "trainguard.provenance.verify",
    "VerifiedManifest": "trainguard.provenance.verify",
    "open_manifest": "trainguard.provenance.verify",
    "verify_dataset": "trainguard.provenance.verify",
    "verify_or_raise": "trainguard.provenance.verify",
    "ManifestRef": "trainguard.provenance.manifest_ref",
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
