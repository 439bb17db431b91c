"""Verifying a signed dataset: envelope signatures against a trust policy, payload type, expiry, rollback, then
every shard (path safety, type, size, BLAKE3 or SHA-256) and every unlisted file. The report names each failure and
its reason.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from trainguard.files import read_regular
from trainguard.provenance.ahead import AHEAD, HashAhead
from trainguard.provenance.bins import (
    BinnedIndex,
    BinShare,
    load_bin,
    looks_binned,
    manifest_files,
    parse_index,
    share_bins,
)
from trainguard.provenance.dsse import Envelope
from trainguard.provenance.errors import (
    AuthorizationError,
    BinError,
    DataDirError,
    ExpiredError,
    MalformedError,
    PayloadTypeError,
    ProvenanceError,
    RollbackError,
    SignatureError,
    VerificationFailed,
    WrongDatasetError,
)
from trainguard.provenance.hashing import (
    FileDigest,
    FileSize,
    HashJob,
    HashOutcome,
    ProgressCallback,
    Whole,
    digest_jobs,
)
from trainguard.provenance.manifest import PAYLOAD_TYPE, Manifest, ShardEntry, parse_statement, rfc3339
from trainguard.provenance.paths import (
    entry_problem,
    folder_entries,
    name_problem,
    printable,
    reached,
    skipped_names,
    walk_entries,
)
from trainguard.provenance.policy import KeySet, TrustPolicy, granted, granted_claims, load_trust
from trainguard.provenance.rollback import RollbackCheck, RollbackScope, RollbackState, default_state_path

MANIFEST_LEVEL = (
    PayloadTypeError,
    SignatureError,
    AuthorizationError,
    WrongDatasetError,
    ExpiredError,
    RollbackError,
    BinError,
)


@dataclass(frozen=True)
class ShardFailure:
    """One failed check of a verification, as a `VerificationReport` lists it.

    Attributes:
        shard: The shard (or unlisted file) that failed; None: the manifest itself (signature, expiry, rollback...).
        reason: A stable code: `digest-mismatch`, `missing`, `unlisted`, `truncated`, `expired`, ...
        detail: What was found, in one line.
    """

    shard: str | None
    reason: str
    detail: str

    def line(self) -> str:
        """`shard: reason: detail` on one line: control characters and non-UTF-8 bytes of a name are escaped."""
        return printable(f"{self.shard if self.shard is not None else 'manifest'}: {self.reason}: {self.detail}")


@dataclass(frozen=True)
class VerifiedManifest:
    """A manifest signed by a key set of the policy that is granted all it claims, of the expected dataset,
    unexpired and not rolled back (shards not yet hashed). Made by `open_manifest`; `ShardReader` reads through it.

    Attributes:
        path: The manifest file.
        manifest: What it signs (for a binned manifest, the shards of the bins loaded).
        manifest_sha256: SHA-256 of the manifest file's bytes.
        statement_sha256: SHA-256 of the signed payload.
        signers: The keyids of the chosen key set's keys that signed.
        data_dir: The folder its shard names are relative to.
        key_set: The key set whose threshold and grants accepted it.
        rollback_scope: The records its version was checked against, and the namespace it is recorded in.
        share: The bins loaded from a binned manifest when only a share was asked for; None: every shard.
    """

    path: Path
    manifest: Manifest
    manifest_sha256: str
    statement_sha256: str
    signers: tuple[str, ...]
    data_dir: Path
    key_set: KeySet
    rollback_scope: RollbackScope
    share: BinShare | None = None

    @property
    def rollback_key(self) -> str:
        """This manifest's anti-rollback namespace: (signing key set's name, dataset)."""
        return self.rollback_scope.key


@dataclass(frozen=True)
class VerificationReport:
    """What `verify_dataset` checked and every failure it found; `ok` when there is none.

    A manifest-level failure (signature, authorisation, dataset, expiry, rollback, bins) is the only failure and
    leaves `dataset` to `bytes_checked` at their defaults: nothing in the manifest was believed.

    Attributes:
        manifest_path: The manifest file.
        data_dir: The folder the shards were checked in.
        manifest_sha256: SHA-256 of the manifest file's bytes.
        dataset: The dataset name it signs.
        version: Its version.
        statement_sha256: SHA-256 of the signed payload.
        rollback_key: The anti-rollback namespace its version is recorded under (key set name / dataset).
        rollback_keyids: The keys of the key set whose namespace records the version (kept with it, so a renamed
            set finds it).
        signers: The keyids that signed for the accepting key set.
        shards: How many shards the manifest lists (those of the share checked, for a share of a binned one).
        bytes_checked: Bytes hashed.
        seconds: Wall time of the verification.
        failures: Every failed check, shard checks in manifest order, then unlisted files.
    """

    manifest_path: str
    data_dir: str
    manifest_sha256: str
    dataset: str | None = None
    version: int | None = None
    statement_sha256: str | None = None
    rollback_key: str | None = None
    rollback_keyids: tuple[str, ...] = ()
    signers: tuple[str, ...] = ()
    shards: int = 0
    bytes_checked: int = 0
    seconds: float = 0.0
    failures: tuple[ShardFailure, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.failures

    def facts(self) -> dict[str, Any]:
        """What the verification established about the manifest: its digests, version, size and signers (what a
        run logs about the data it used)."""
        return {
            "manifest_sha256": self.manifest_sha256,
            "statement_sha256": self.statement_sha256,
            "version": self.version,
            "shards": self.shards,
            "bytes": self.bytes_checked,
            "signers": ",".join(self.signers),
        }

    def to_dict(self) -> dict[str, Any]:
        document = asdict(self)
        document["ok"] = self.ok
        document["signers"] = list(self.signers)
        document["rollback_keyids"] = list(self.rollback_keyids)
        document["failures"] = [asdict(f) for f in self.failures]
        return document

    def raise_for_failures(self) -> None:
        if self.failures:
            raise VerificationFailed(
                f"{self.manifest_path}: {len(self.failures)} check(s) failed; first: {self.failures[0].line()}",
                report=self,
                shard=self.failures[0].shard,
                reason=self.failures[0].reason,
            )


def read_envelope(path: Path) -> tuple[bytes, Envelope]:
    """The manifest file's bytes (read once, a bounded regular file: a FIFO or device is refused, never read) and
    the envelope parsed from them."""
    try:
        data = read_regular(Path(path))
    except OSError as error:
        raise MalformedError(f"cannot read manifest {path}: {error.strerror}", path=str(path)) from None
    try:
        return data, Envelope.from_json(data)
    except MalformedError as error:
        raise MalformedError(f"{path}: {error}", path=str(path)) from None


def open_manifest(
    path: Path,
    trust: TrustPolicy | Path,
    *,
    dataset: str | None = None,
    data_dir: Path | None = None,
    state: RollbackCheck | Path | None = None,
    now: datetime | None = None,
    share: tuple[int, int] | None = None,
) -> VerifiedManifest:
    """Checks payloadType, signatures (k of n) of a key set granted every claim (dataset, sources, roles), the
    expected `dataset` name, expiry, then rollback against that key set's namespace and those of every key set
    holding a key that signed it (`TrustPolicy.rollback_scope`); raises the failing check's error.

    A binned manifest's bins are loaded after those checks, each against its signed digest: all of them, or with
    `share=(rank, world)` only that rank's bins (a single-file manifest has no shares: MalformedError).

    Args:
        path: The manifest file.
        trust: A trust policy, or the path of a policy file or `.pub` key (`load_trust`).
        dataset: The dataset name the manifest must carry; None: any.
        data_dir: The folder of its shards; None: the manifest's folder.
        state: Anti-rollback records: a `RollbackState` or other checker, or a state file's path; None:
            `default_state_path()`. Only checked here, never recorded.
        now: The time expiry is judged at; None: the current time.
        share: `(rank, world)`: load only that rank's bins of a binned manifest.

    Returns:
        The verified manifest, its shards not yet hashed (`verify_shards`, or a `ShardReader` checks them on
        read).

    Raises:
        MalformedError: The manifest or the rollback state file cannot be read or parsed, or a share was asked of a
            single-file manifest.
        PolicyError: `trust` names a policy that cannot be loaded.
        KeyFileError: `trust` names a PEM file that holds no usable public key.
        PayloadTypeError: The envelope's payloadType is not a manifest's.
        SignatureError: No key set's threshold is met (BadSignatureError, UntrustedSignerError, ThresholdError).
        AuthorizationError: The signing key sets are not granted the dataset, a source or a role it claims.
        WrongDatasetError: It is a manifest of another dataset than `dataset`.
        ExpiredError: It has expired.
        RollbackError: Its version is older than one accepted, or reuses one with other content.
        BinError: A binned manifest's bin is missing or differs from its signed digest.
    """
    path = Path(path)
    policy = trust if isinstance(trust, TrustPolicy) else load_trust(trust)
    data, envelope = read_envelope(path)
    if envelope.payload_type != PAYLOAD_TYPE:
        raise PayloadTypeError(f"{path}: payloadType is {envelope.payload_type!r}, not {PAYLOAD_TYPE}", path=str(path))
    signed = policy.signed_by(envelope)  # before parsing: nothing unsigned is read further
    binned = looks_binned(envelope.payload)
    if share is not None and not binned:
        raise MalformedError(f"{path}: a single-file manifest has no shares; sign it with bins", path=str(path))
    try:
        index = parse_index(envelope.payload) if binned else None
        manifest = index.header if index is not None else parse_statement(envelope.payload)
    except MalformedError as error:
        raise MalformedError(f"{path}: {error}", path=str(path)) from None
    try:
        if index is not None:
            chosen = granted_claims(signed, manifest.dataset, index.sources, index.roles)
        else:
            chosen = granted(signed, manifest)
    except AuthorizationError as error:
        raise type(error)(f"{path}: {error}", path=str(path), shard=error.shard) from None
    if dataset is not None and manifest.dataset != dataset:
        raise WrongDatasetError(
            f"{path}: is a manifest of dataset {manifest.dataset!r}, expected {dataset!r}", path=str(path)
        )
    moment = now or datetime.now(UTC)
    if moment >= manifest.expires:
        raise ExpiredError(f"{path}: manifest expired at {rfc3339(manifest.expires)}", path=str(path))
    statement_sha256 = hashlib.sha256(envelope.payload).hexdigest()
    verified = VerifiedManifest(
        path=path,
        manifest=manifest,
        manifest_sha256=hashlib.sha256(data).hexdigest(),
        statement_sha256=statement_sha256,
        signers=chosen.signers,
        data_dir=Path(data_dir) if data_dir is not None else path.parent,
        key_set=chosen.key_set,
        rollback_scope=policy.rollback_scope(envelope, chosen.key_set, manifest.dataset),
    )
    _state(state).check_scope(verified.rollback_scope, manifest.version, statement_sha256)
    if index is None:
        return verified
    bin_share = BinShare.of_rank(*share, len(index.bins)) if share is not None else None
    return replace(verified, manifest=_load_bins(path, index, bin_share, chosen.key_set), share=bin_share)


def _load_bins(path: Path, index: BinnedIndex, share: BinShare | None, key_set: KeySet) -> Manifest:
    """The top-level manifest with the shards of the share's bins (every bin without a share), each bin checked
    against its signed digest and its shards against the key set's grants."""
    shards: list[ShardEntry] = []
    try:
        for number in share_bins(index, share):
            shards.extend(load_bin(path, index, number))
    except MalformedError as error:
        raise MalformedError(f"{path}: {error}", path=str(path)) from None
    except BinError as error:
        raise type(error)(f"{path}: {error}", path=error.path) from None
    manifest = replace(index.header, shards=tuple(shards))
    refusal = key_set.unauthorized(manifest)
    if refusal is not None:
        raise type(refusal)(f"{path}: {refusal}", path=str(path), shard=refusal.shard)
    return manifest


def verify_dataset(
    path: Path,
    trust: TrustPolicy | Path,
    *,
    dataset: str | None = None,
    data_dir: Path | None = None,
    state: RollbackCheck | Path | None = None,
    allow_extra: bool = False,
    now: datetime | None = None,
    workers: int | None = None,
    on_bytes: ProgressCallback | None = None,
    record: bool = True,
    dvc: bool = False,
    share: tuple[int, int] | None = None,
    ahead: HashAhead | None = None,
) -> VerificationReport:
    """Every check on a manifest and its data dir; failed checks go into the report, unusable input raises.
    `share=(rank, world)` checks only that rank's bins of a binned manifest (and only unlisted files of those bins).
    `ahead`: a child process walking and hashing the data dir, started by a single-threaded caller (the CLI) before
    it imported and read what this needs (`provenance.ahead`); it is stopped, or used, here.

    `dataset` is the name the manifest must carry. When everything passes and `record` is set, the manifest's
    version is recorded in a file-backed RollbackState (in-memory records are only checked: their owner records).

    Args:
        path: The manifest file.
        trust: A trust policy, or the path of a policy file or `.pub` key (`load_trust`).
        dataset: The dataset name the manifest must carry; None: any.
        data_dir: The folder of its shards; None: the manifest's folder.
        state: Anti-rollback records: a `RollbackState` or other checker, or a state file's path; None:
            `default_state_path()`.
        allow_extra: Whether files in the data folder that the manifest does not list are tolerated.
        now: The time expiry is judged at; None: the current time.
        workers: Parallel hashing workers (None: one per CPU).
        on_bytes: Called with each count of bytes hashed, for a progress display.
        record: Whether a passing manifest's version is recorded in a file-backed state.
        dvc: Whether each shard's md5 is also checked against what DVC tracks for the data folder (a shard DVC does
            not track, or whose md5 differs, is a `dvc-untracked` or `dvc-mismatch` failure in the report).
        share: `(rank, world)`: check only that rank's bins of a binned manifest.
        ahead: The data folder's walk and digests, started early by the CLI; None for other callers.

    Returns:
        The report: every failed check, manifest-level ones (signature, authorisation, dataset, expiry,
        rollback, bins) included; `report.ok` when there is none.

    Raises:
        MalformedError: The manifest or the rollback state file cannot be read or parsed, a share was asked of a
            single-file manifest, or (with `dvc`) DVC's listing of the folder names a file unsafely or gives it a
            malformed md5.
        PolicyError: `trust` names a policy that cannot be loaded.
        KeyFileError: `trust` names a PEM file that holds no usable public key.
        DataDirError: The data folder does not exist, or (with `dvc`) DVC does not track it as a directory, cannot
            read its records or load its listing, or has no listing of it in its cache or remote.

    Example::

        from pathlib import Path
        from trainguard import load_trust, verify_dataset

        policy = load_trust(Path("configs/digits-trust.yaml"))
        report = verify_dataset(Path("data/train.manifest.json"), policy, dataset="digits-contributed")
        for failure in report.failures:
            print(failure.line())  # e.g. `alice/part-3.parquet: digest-mismatch: whole-file blake3 ..., signed ...`
        report.raise_for_failures()  # VerificationFailed, with the report, when anything failed
    """
    started = time.perf_counter()
    path = Path(path)
    rollback = _state(state)
    folder = Path(data_dir) if data_dir is not None else path.parent
    skip = (
        [rollback.path, rollback.path.with_name(rollback.path.name + ".lock")]
        if isinstance(rollback, RollbackState)
        else []
    )
    try:
        verified = open_manifest(path, trust, dataset=dataset, data_dir=folder, state=rollback, now=now, share=share)
    except BaseException as error:
        if ahead is not None:
            ahead.close()
        if not isinstance(error, MANIFEST_LEVEL):
            raise
        data, _ = read_envelope(path)
        failure = ShardFailure(None, error.reason, str(error).removeprefix(f"{path}: "))
        return VerificationReport(
            str(path),
            str(folder),
            hashlib.sha256(data).hexdigest(),
            failures=(failure,),
            seconds=time.perf_counter() - started,
        )
    try:
        report = verify_shards(
            verified,
            allow_extra=allow_extra,
            workers=workers,
            on_bytes=on_bytes,
            dvc=dvc,
            skip=skip,
            started=started,
            ahead=ahead,
        )
    finally:
        if ahead is not None:
            ahead.close()
    if report.ok and record and isinstance(rollback, RollbackState):
        rollback.record(
            verified.rollback_key, verified.manifest.version, verified.statement_sha256, verified.key_set.keyids
        )
    return report


def verify_shards(
    verified: VerifiedManifest,
    *,
    allow_extra: bool = False,
    workers: int | None = None,
    on_bytes: ProgressCallback | None = None,
    dvc: bool = False,
    skip: Sequence[Path] = (),
    started: float | None = None,
    ahead: HashAhead | None = None,
) -> VerificationReport:
    """Every shard check on a manifest already opened (no second read of the manifest file); failures go into the
    report, an unusable data dir raises. `ahead`: the data dir's walk and digests, started before the manifest was
    opened."""
    started = time.perf_counter() if started is None else started
    folder = verified.data_dir
    if not folder.is_dir():
        raise DataDirError(f"data dir {folder} does not exist or is not a directory", path=str(folder))
    dvc_md5 = None
    if dvc:
        from trainguard.provenance.dvc import dvc_tracked_md5

        dvc_md5 = dvc_tracked_md5(folder)
    failures, hashed = check_shards(
        verified.manifest,
        folder,
        allow_extra=allow_extra,
        workers=workers,
        on_bytes=on_bytes,
        skip=[*manifest_files(verified.path), *skip],
        dvc_md5=dvc_md5,
        holds=verified.share.holds if verified.share is not None else None,
        ahead=ahead,
    )
    manifest = verified.manifest
    return VerificationReport(
        manifest_path=str(verified.path),
        data_dir=str(folder),
        manifest_sha256=verified.manifest_sha256,
        dataset=manifest.dataset,
        version=manifest.version,
        statement_sha256=verified.statement_sha256,
        rollback_key=verified.rollback_key,
        rollback_keyids=verified.key_set.keyids,
        signers=verified.signers,
        shards=len(manifest.shards),
        bytes_checked=hashed,
        seconds=time.perf_counter() - started,
        failures=tuple(failures),
    )


def check_shards(
    manifest: Manifest,
    root: Path,
    *,
    allow_extra: bool = False,
    workers: int | None = None,
    on_bytes: ProgressCallback | None = None,
    skip: list[Path] | None = None,
    dvc_md5: Mapping[str, str] | None = None,
    holds: Callable[[str], bool] | None = None,
    ahead: HashAhead | None = None,
) -> tuple[list[ShardFailure], int]:
    """Failures of the shards under `root` against the manifest (name and entry checks in manifest order, then
    content checks, then unlisted entries). `holds` says which unlisted names are this manifest's concern (a share
    of a binned manifest answers only for its own bins); None: all of them.

    One walk of the data dir (with `allow_extra`, one listing of each folder holding shards) gives every entry's
    kind; a shard seen as a regular file is opened once without following a final symlink and checked again with
    fstat, so only odd entries cost a per-component lstat. `ahead`, children hashing `root` (used without
    `allow_extra` or `dvc_md5`), gives the walk and, where a shard is checked by BLAKE3, its digest."""
    ahead = ahead if ahead is not None and ahead.root == root and not allow_extra and dvc_md5 is None else None
    if allow_extra:  # no unlisted check: list only the folders that hold shards
        found = dict(folder_entries(root, (s.name for s in manifest.shards)))
    elif ahead is not None:
        found = {name: ahead.entries[name] for name in reached(ahead.entries, skipped_names(root, skip or ()))}
    else:
        found = dict(walk_entries(root, skip or ()))
    failures: dict[str, ShardFailure] = {}
    counts = Counter(s.name for s in manifest.shards)
    sizes = Counter(s.size for s in manifest.shards)
    base = os.path.join(os.fspath(root), "")
    jobs: list[HashJob] = []
    for shard in manifest.shards:
        if shard.name in failures:
            continue
        problem = name_problem(shard.name)
        if problem is not None:
            failures[shard.name] = ShardFailure(shard.name, "unsafe-path", f"subject name is unsafe: {problem}")
            continue
        if counts[shard.name] > 1:
            failures[shard.name] = ShardFailure(shard.name, "duplicate-name", f"listed {counts[shard.name]} times")
            continue
        if found.get(shard.name) != "file":
            entry = entry_problem(root, shard.name)
            if entry is not None:
                failures[shard.name] = ShardFailure(shard.name, *entry)
                continue
        chunk_size = manifest.chunk_size if shard.chunks else None
        jobs.append(HashJob(shard.name, base + shard.name, shard.size, chunk_size, _checked_digest(shard)))

    def hash_if(job: HashJob, size: int) -> bool:
        """A file of another size than signed is hashed only when it may hold another shard's content (swap)."""
        return size == job.size_hint or sizes[size] > 0

    md5 = dvc_md5 is not None
    hashed = {}
    if ahead is not None and any(_hashed_ahead(job) for job in jobs):
        hashed = ahead.digests()
    elif ahead is not None:
        ahead.close()  # no shard checked by BLAKE3 alone (none signed, or all chunk-signed): no use for their digests
    reused = {job.name: hashed[job.name] for job in jobs if _hashed_ahead(job) and job.name in hashed}
    jobs = [job for job in jobs if job.name not in reused]
    if on_bytes is not None and reused:
        on_bytes(sum(digest.size for digest in reused.values()))
    outcomes = digest_jobs(jobs, md5=md5, workers=workers, on_bytes=on_bytes, hash_if=hash_if)
    results: dict[str, HashOutcome] = {
        **reused,
        **{job.name: outcome for job, outcome in zip(jobs, outcomes, strict=True)},
    }
    owner = {digest: s.name for s in manifest.shards for digest in (s.sha256, s.blake3) if digest is not None}
    for shard in manifest.shards:
        if shard.name not in failures:
            failure = _outcome_failure(shard, results[shard.name], owner, dvc_md5)
            if failure is not None:
                failures[shard.name] = failure
    ordered = list(failures.values())
    if not allow_extra:
        for name, kind in found.items():
            if name not in counts and (holds is None or holds(name)):
                ordered.append(ShardFailure(name, "unlisted", f"{_KIND[kind]} in the data dir is not in the manifest"))
    return ordered, sum(r.size for r in results.values() if isinstance(r, FileDigest))


_KIND = {"file": "file", "symlink": "symbolic link", "other": "non-regular file"}


def _checked_digest(shard: ShardEntry) -> tuple[Whole, ...]:
    """The whole-file digest verification computes: BLAKE3 where it is signed (a DigestSet matches when any field it
    accepts does, in-toto's rule), else SHA-256. Chunk digests, where signed, are SHA-256 of the same pass, which
    binds them to the whole-file digest checked."""
    return AHEAD if shard.blake3 is not None else ("sha256",)


def _hashed_ahead(job: HashJob) -> bool:
    """Whether the children's digest can stand for this job's: its BLAKE3 only, never chunk digests (the children
    fork before the manifest says which shards are chunk-signed, so they hash none of them)."""
    return job.whole == AHEAD and job.chunk_size is None


def _size_failure(shard: ShardEntry, size: int) -> ShardFailure:
    if size < shard.size:
        return ShardFailure(shard.name, "truncated", f"{size} bytes, signed {shard.size} ({shard.size - size} missing)")
    return ShardFailure(shard.name, "appended", f"{size} bytes, signed {shard.size} ({size - shard.size} appended)")


def _error_failure(shard: ShardEntry, error: ProvenanceError) -> ShardFailure:
    return ShardFailure(shard.name, error.reason, str(error).removeprefix(f"shard {shard.name}: "))


def _outcome_failure(
    shard: ShardEntry,
    result: HashOutcome,
    owner: Mapping[str, str],
    dvc_md5: Mapping[str, str] | None,
) -> ShardFailure | None:
    if isinstance(result, ProvenanceError):
        return _error_failure(shard, result)
    if isinstance(result, FileSize):
        return _size_failure(shard, result.size)
    algorithm, got, signed = (
        ("blake3", result.blake3, shard.blake3)
        if result.blake3 is not None
        else ("sha256", result.sha256, shard.sha256)
    )
    other = owner.get(got or "")
    if got != signed and other is not None and other != shard.name:
        return ShardFailure(shard.name, "swapped", f"holds the signed content of shard {other}")
    if result.size != shard.size:
        return _size_failure(shard, result.size)
    chunk_failure = _chunk_failure(shard, result.chunks) if shard.chunks else None
    if chunk_failure is not None:
        return chunk_failure
    if got != signed:
        return ShardFailure(shard.name, "digest-mismatch", f"whole-file {algorithm} {got}, signed {signed}")
    if dvc_md5 is not None:
        tracked = dvc_md5.get(shard.name)
        if tracked is None:
            return ShardFailure(shard.name, "dvc-untracked", "the shard is not in DVC's record of the data dir")
        if tracked != result.md5:
            return ShardFailure(shard.name, "dvc-mismatch", f"md5 {result.md5}, DVC tracks {tracked}")
    return None


def _chunk_failure(shard: ShardEntry, chunks: tuple[str, ...]) -> ShardFailure | None:
    """The first chunk whose digest differs from the signed one, or None when all match."""
    for index, (got, signed) in enumerate(zip(chunks, shard.chunks, strict=False)):
        if got != signed:
            return ShardFailure(shard.name, "digest-mismatch", f"chunk {index} sha256 {got}, signed {signed}")
    if len(chunks) != len(shard.chunks):
        return ShardFailure(shard.name, "digest-mismatch", f"{len(chunks)} chunks, signed {len(shard.chunks)}")
    return None


def _state(state: RollbackCheck | Path | None) -> RollbackCheck:
    if state is None or isinstance(state, (str, Path)):
        return RollbackState(Path(state) if state is not None else default_state_path())
    return state


def verify_or_raise(path: Path, trust: TrustPolicy | Path, **options: Any) -> VerificationReport:
    """`verify_dataset`, raising VerificationFailed (with the report) when anything fails.

    Args:
        path: The manifest file.
        trust: A trust policy, or the path of a policy file or `.pub` key.
        **options: `verify_dataset`'s keywords (`dataset`, `data_dir`, `state`, `allow_extra`, `workers`, ...).

    Returns:
        The report of a verification that found no failure.

    Raises:
        VerificationFailed: Any check failed; `report` lists every failure, `reason` and `shard` the first.
        MalformedError: Unusable input, as `verify_dataset` raises it (so are PolicyError, KeyFileError and
            DataDirError).
    """
    report = verify_dataset(path, trust, **options)
    report.raise_for_failures()
    return report
