"""Errors of data provenance, after python-tuf's exceptions: one family under `TrainguardError`, a subclass per
failure kind, each with a stable `reason` code (what reports, receipts and the CLI print)."""

from __future__ import annotations

from trainguard.errors import TrainguardError


class ProvenanceError(TrainguardError):
    """Base of every provenance failure. `reason` is a stable code; `exit_code` 1 = failed check, 2 = bad input."""

    reason = "provenance"
    exit_code = 1

    def __init__(
        self, message: str, *, shard: str | None = None, keyid: str | None = None, path: str | None = None
    ) -> None:
        super().__init__(message)
        self.shard = shard
        self.keyid = keyid
        self.path = path


# Unusable input (exit 2)


class MalformedError(ProvenanceError):
    """An envelope, statement, policy or state file cannot be parsed or breaks the format."""

    reason = "malformed"
    exit_code = 2


class KeyFileError(ProvenanceError):
    """A key file is missing, unreadable, of an unsupported type or needs a passphrase that was not given."""

    reason = "key-file"
    exit_code = 2


class PolicyError(ProvenanceError):
    """A trust policy is unusable (no keys, threshold out of range, unreadable key)."""

    reason = "policy"
    exit_code = 2


class AlreadySignedError(ProvenanceError):
    """The envelope already carries a signature of this key."""

    reason = "already-signed"
    exit_code = 2


class DataDirError(ProvenanceError):
    """The data directory to sign is unusable (missing, empty, holds unsafe entries)."""

    reason = "data-dir"
    exit_code = 2


# Failed checks (exit 1)


class SignatureError(ProvenanceError):
    """The envelope's signatures do not meet the trust policy."""

    reason = "signature"


class BadSignatureError(SignatureError):
    """A signature claiming a trusted key does not verify: the payload or payloadType was changed after signing."""

    reason = "bad-signature"


class UntrustedSignerError(SignatureError):
    """No signature comes from a trusted key."""

    reason = "untrusted-signer"


class ThresholdError(SignatureError):
    """Fewer distinct trusted keys signed than the policy's threshold."""

    reason = "below-threshold"


class AuthorizationError(ProvenanceError):
    """The manifest's signers meet the threshold but are not authorised for what it claims (trust flows from keys:
    a key set vouches only for the datasets, sources and roles its policy grants it)."""

    reason = "unauthorized"


class UnauthorizedDatasetError(AuthorizationError):
    """The signing key set may not sign a dataset of this name."""

    reason = "unauthorized-dataset"


class UnauthorizedSourceError(AuthorizationError):
    """A shard is attributed to a source the signing key set may not attribute."""

    reason = "unauthorized-source"


class UnauthorizedRoleError(AuthorizationError):
    """A shard claims a role (trusted, holdout) the signing key set may not grant."""

    reason = "unauthorized-role"


class WrongDatasetError(ProvenanceError):
    """A validly signed manifest of another dataset stands where the reference expects this one."""

    reason = "wrong-dataset"


class PayloadTypeError(ProvenanceError):
    """The envelope's payloadType is not the in-toto one."""

    reason = "payload-type"


class ExpiredError(ProvenanceError):
    """The manifest's `expires` time has passed."""

    reason = "expired"


class RollbackError(ProvenanceError):
    """The manifest is older than (or reuses the version of) one already accepted for this dataset from the same
    key set."""

    reason = "rollback"


class BinError(ProvenanceError):
    """A bin of a binned manifest does not match the digest its signed top-level statement lists for it."""

    reason = "bin"


class BinMissingError(BinError):
    """A bin file the share needs is not there: re-copy the manifest's `.bins` folder beside it."""

    reason = "bin-missing"


class BinTamperedError(BinError):
    """A bin's bytes differ from the signed digest (edited, truncated or grown)."""

    reason = "bin-tampered"


class BinSwappedError(BinError):
    """A bin file holds another bin of the same manifest."""

    reason = "bin-swapped"


class BinRollbackError(BinError):
    """A bin file holds the bin of an older version of the dataset than the signed top-level statement."""

    reason = "bin-rollback"


class ShardError(ProvenanceError):
    """One shard failed a check; the subclass, and its `reason`, says which (digest-mismatch, missing, format, ...)."""

    reason = "shard"


class MissingShardError(ShardError):
    """The shard file, or a folder on its path, does not exist."""

    reason = "missing"


class SymlinkShardError(ShardError):
    """The shard, or a folder on its path, is a symbolic link (never followed)."""

    reason = "symlink"


class NotRegularShardError(ShardError):
    """The shard is not a regular file (a FIFO, device or folder stands at its path)."""

    reason = "not-regular"


class UnreadableShardError(ShardError):
    """The shard cannot be opened or read."""

    reason = "unreadable"


class TruncatedShardError(ShardError):
    """The shard holds fewer bytes than signed, or shrank while it was read."""

    reason = "truncated"


class AppendedShardError(ShardError):
    """The shard holds more bytes than signed, or grew while it was read."""

    reason = "appended"


class DigestMismatchError(ShardError):
    """The shard's bytes differ from its signed digest."""

    reason = "digest-mismatch"


class ChunkMismatchError(ShardError):
    """A chunk of the shard is missing from the signed chunk digests or differs from its digest."""

    reason = "chunk"


class UnlistedShardError(ShardError):
    """The shard (or a chunk its index names) is not listed in the manifest."""

    reason = "unlisted"


class DuplicateShardError(ShardError):
    """The manifest lists the shard's name more than once."""

    reason = "duplicate-name"


class UnsafePathError(ShardError):
    """A shard's name would leave its data folder (absolute, `..`, or otherwise unsafe)."""

    reason = "unsafe-path"


class ShardFormatError(ShardError):
    """The shard's verified bytes do not decode as its format (a corrupt file, a missing column, a wrong type)."""

    reason = "format"


class RecordsMismatchError(ShardError):
    """The shard decodes to another number of records than its manifest entry signs."""

    reason = "records-mismatch"


class DecodeLimitError(ShardError):
    """Decoding the shard would pass a size limit (pixels, memory) set to refuse decompression bombs."""

    reason = "decode-limit"


class NotAllowedError(ShardError):
    """A read of a shard that is not on the allow-list the reader was given (verified, but not accepted)."""

    reason = "not-allowed"


SHARD_ERRORS: dict[str, type[ShardError]] = {
    kind.reason: kind
    for kind in (
        MissingShardError,
        SymlinkShardError,
        NotRegularShardError,
        UnreadableShardError,
        TruncatedShardError,
        AppendedShardError,
        DigestMismatchError,
        ChunkMismatchError,
        UnlistedShardError,
        DuplicateShardError,
        UnsafePathError,
        ShardFormatError,
        RecordsMismatchError,
        DecodeLimitError,
        NotAllowedError,
    )
}
"""Each shard failure's `reason` code -> its ShardError subclass."""


def shard_error(reason: str, message: str, *, shard: str | None) -> ShardError:
    """The ShardError of a failure known by its `reason` code only (a refusal a worker journalled, a read refused
    earlier, a path check's verdict); a code of no known kind (from an older journal) is kept on a plain ShardError."""
    kind = SHARD_ERRORS.get(reason)
    if kind is not None:
        return kind(message, shard=shard)
    error = ShardError(message, shard=shard)
    error.reason = reason
    return error


class ReadLogMismatchError(ProvenanceError):
    """What training read differs from the allow-list: a stray read, or an accepted shard never read."""

    reason = "read-log-mismatch"


class DvcMismatchError(ProvenanceError):
    """A shard's md5 differs from what DVC tracks for it (cross-check beside sha256)."""

    reason = "dvc-mismatch"


class VerificationFailed(ProvenanceError):
    """Verification of a dataset found failures; `report` lists every one of them, `reason`/`shard` the first."""

    reason = "verification-failed"

    def __init__(self, message: str, report: object, *, shard: str | None = None, reason: str | None = None) -> None:
        super().__init__(message, shard=shard)
        self.report = report
        if reason is not None:
            self.reason = reason
