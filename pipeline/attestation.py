"""SLSA v1 provenance for a trained model: an in-toto Statement in a DSSE envelope, signed with provenance's keys.

The subject is the signed model's files (name + sha256). `resolvedDependencies` are the signed data manifests (by
digest), the code commit, the config file by absolute URI, in a DVC repository the `dvc.lock` the run started from
(with the DVC remotes and where the data lives in the default one), and the model the cycle started from;
`externalParameters` holds the resolved config. A `trainguard` byproduct names the training data by the manifests'
digests and two Merkle roots (`trainguard.provenance.merkle`, RFC 9162 over sorted `[name, sha256]` leaves): of the
allow-list training read (`dataset:name` keys) and of the shards this cycle accepted (decision names); it counts the
decisions and lists the refused ones with their reasons (at most `LISTED_REFUSALS`, and RONI's refused tests alike),
with the RONI summary, the gate's figures and the sha256 of the exact log of shards training read. Its size does not
grow with the shard count beyond those bounded lists: every decision is in the cycle's decision table
(`shards-NNNN.parquet` beside the report), and any shard's place in a root is proven by `merkle.inclusion_proof`.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainguard import strictjson
from trainguard.files import read_regular
from trainguard.pipeline.cycle_report import MerkleTreeRef, manifest_digests
from trainguard.pipeline.cycle_state import ShardDecision
from trainguard.pipeline.errors import AttestationError, AttestationInputError
from trainguard.pipeline.model_sign import Attestation, ModelFiles
from trainguard.provenance.merkle import ALGORITHM

if TYPE_CHECKING:
    from trainguard.provenance.dsse import Envelope
    from trainguard.provenance.keys import SigningKey

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "https://github.com/trainguard/trainguard/cycle/v1"
BUILDER_ID = "https://github.com/trainguard/trainguard/trainguard-cycle"
RECORD_NAME = "trainguard-cycle-record"
LISTED_REFUSALS = 1000
"""The most refused shards (and RONI tests) the record lists by name and reason; the counts are always complete."""


@dataclass(frozen=True)
class Resource:
    """A SLSA ResourceDescriptor: where something is, its digests, and free-form annotations."""

    uri: str
    digest: Mapping[str, str]
    name: str | None = None
    annotations: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"uri": self.uri, "digest": dict(self.digest)}
        if self.name:
            out["name"] = self.name
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out


@dataclass(frozen=True)
class CycleFacts:
    """Everything the attestation states about one cycle; build with the cycle's results, then `build_statement`."""

    model_digests: Mapping[str, str]  # signed file name -> sha256 (ModelFiles.digests)
    manifests: Sequence[Resource]
    config: Resource
    resolved_config: Mapping[str, Any]
    shards: Sequence[ShardDecision]
    read_log: Resource
    allowed: MerkleTreeRef  # the allow-list training read, by root (`cycle_report.allowed_tree`)
    accepted: MerkleTreeRef  # the shards of `shards` accepted, by root (`cycle_report.accepted_tree`)
    invocation_id: str
    started: str
    finished: str
    code: Resource | None = None
    base_model: Resource | None = None
    roni: Mapping[str, Any] = field(default_factory=dict)
    gate: Mapping[str, Any] = field(default_factory=dict)
    excluded_rows: Mapping[str, Sequence[int]] = field(default_factory=dict)  # shard key -> rows training skipped
    state: Mapping[str, Any] = field(default_factory=dict)  # the signed state's link: pipeline, cycle, seq, link
    dvc: Resource | None = None  # the DVC record of the repository the cycle ran in (`dvc_resource`)


def read_log_resource(path: str | Path, sha256: str, entries: int) -> Resource:
    """The training read log, written beside the cycle's report, as an attested byproduct."""
    return Resource(Path(path).resolve().as_uri(), {"sha256": sha256}, "read-log", {"entries": entries})


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while block := stream.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def file_resource(path: Path, name: str | None = None, annotations: Mapping[str, Any] | None = None) -> Resource:
    """A local file as a dependency: its absolute `file://` URI (wherever the cycle ran from), and its sha256."""
    return Resource(Path(path).resolve().as_uri(), {"sha256": sha256_file(path)}, name, annotations or {})


def dvc_resource(directory: Path, data: Sequence[Path] = ()) -> Resource | None:
    """The DVC repository `directory` is in, as a dependency: its `dvc.lock` (absolute URI and sha256; no digest
    before the first `dvc repro` wrote one), annotated with each DVC remote's URL and, for each DVC out holding
    some of `data`, the URL of its content in the default remote. None outside a DVC repository.

    Args:
        directory: Where the cycle runs (inside the repository).
        data: The data dirs and manifests the cycle read.

    Returns:
        The resource, or None outside a DVC repository.

    Raises:
        AttestationInputError: DVC cannot read the repository's config or DVC files.
    """
    from trainguard.provenance.dvc import LOCK_FILE, dvc_record
    from trainguard.provenance.errors import ProvenanceError

    try:
        record = dvc_record(directory, data)
    except ProvenanceError as error:
        raise AttestationInputError(f"cannot record the DVC repository: {error}", path=str(directory)) from None
    if record is None:
        return None
    where = {path.resolve().relative_to(record.root).as_posix(): url for path, url in record.data.items()}
    return Resource(
        (record.root / LOCK_FILE).as_uri(),
        {"sha256": record.lock_sha256} if record.lock_sha256 else {},
        "dvc.lock",
        {"remotes": dict(sorted(record.remotes.items())), "dataRemoteUris": dict(sorted(where.items()))},
    )


def git_resource(directory: Path) -> Resource | None:
    """The checkout's HEAD commit as `git+<origin>@<commit>` (annotated when dirty), None outside git."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    origin = git("remote", "get-url", "origin") or f"file://{Path(directory).resolve().as_posix()}"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return Resource(f"git+{origin}@{commit}", {"gitCommit": commit}, "code", {"dirty": dirty} if dirty else {})


def build_statement(facts: CycleFacts) -> dict[str, Any]:
    """The in-toto Statement v1 with a SLSA v1 provenance predicate (pure: same facts, same statement)."""
    if not facts.model_digests:
        raise AttestationError("an attestation needs at least one model file as subject")
    dependencies = [m.to_json() for m in facts.manifests] + [facts.config.to_json()]
    dependencies += [r.to_json() for r in (facts.code, facts.dvc, facts.base_model) if r is not None]
    refused = [_shard(d) for d in facts.shards if not d.accepted]
    record = {
        "data": data_record(facts),
        "shards": {
            "acceptedCount": sum(d.accepted for d in facts.shards),
            "rejectedCount": len(refused),
            "rejected": refused[:LISTED_REFUSALS],
        },
        "readLog": {"sha256": facts.read_log.digest["sha256"], **facts.read_log.annotations},
        "roni": _roni(facts.roni),
        "gate": dict(facts.gate),
    }
    if facts.state:  # where in its pipeline's signed history the model was made
        record["cycle"] = facts.state["cycle"]
        record["state"] = {k: v for k, v in facts.state.items() if k != "cycle"}
    if facts.excluded_rows:
        record["excludedRows"] = {key: list(rows) for key, rows in sorted(facts.excluded_rows.items())}
    return {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": name, "digest": {"sha256": digest}} for name, digest in sorted(facts.model_digests.items())
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"config": dict(facts.resolved_config), "configUri": facts.config.uri},
                "internalParameters": {"versions": _versions()},
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"trainguard": _version("trainguard")}},
                "metadata": {
                    "invocationId": facts.invocation_id,
                    "startedOn": facts.started,
                    "finishedOn": facts.finished,
                },
                "byproducts": [
                    {"name": RECORD_NAME, "mediaType": "application/json", "annotations": record},
                    {**facts.read_log.to_json(), "mediaType": "application/jsonl"},
                ],
            },
        },
    }


def data_record(facts: CycleFacts) -> dict[str, Any]:
    """The training data by digest: each manifest's sha256 and the Merkle roots (hex) and sizes of the allow-list and
    of this cycle's accepted shards (the roots the report's data section names), so the record stays the same size
    whatever the shard count.

    Args:
        facts: The cycle's facts.

    Returns:
        The record's `data` entry.
    """
    return {
        "algorithm": ALGORITHM,
        "manifests": manifest_digests((m.name or "", m.digest["sha256"]) for m in facts.manifests),
        "allowed": _tree(facts.allowed),
        "accepted": _tree(facts.accepted),
    }


def _tree(tree: MerkleTreeRef) -> dict[str, Any]:
    """A root as the record names it (camelCase, as SLSA's fields are)."""
    return {"merkleRoot": tree["merkle_root"], "shards": tree["shards"]}


def _roni(roni: Mapping[str, Any]) -> dict[str, Any]:
    """RONI's summary with only its refused tests listed (at most `LISTED_REFUSALS`) and every test counted."""
    out = {key: value for key, value in roni.items() if key != "decisions"}
    if "decisions" in roni:
        refused = [d for d in roni["decisions"] if not d.get("accepted")]
        out.update(tested=len(roni["decisions"]), refusedCount=len(refused), refused=refused[:LISTED_REFUSALS])
    return out


def statement_bytes(statement: Mapping[str, Any]) -> bytes:
    """Canonical JSON (sorted keys, no spaces) of a statement: the DSSE payload."""
    return json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def cycle_record(statement: Mapping[str, Any]) -> dict[str, Any]:
    """The trainguard byproduct (data by digest, decision counts and refusals, read log, RONI, gate) of a statement."""
    for product in statement["predicate"]["runDetails"].get("byproducts", []):
        if product.get("name") == RECORD_NAME:
            annotations: dict[str, Any] = product.get("annotations", {})
            return annotations
    raise AttestationError(f"the statement has no {RECORD_NAME} byproduct")


def _shard(decision: ShardDecision) -> dict[str, Any]:
    out = {"name": decision.shard, "sha256": decision.sha256, "source": decision.source, "check": decision.check}
    if decision.reason:
        out["reason"] = decision.reason
    return out


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _versions() -> dict[str, str]:
    packages = ("trainguard", "torch", "pytorch-lightning", "model-signing", "mlflow", "cryptography")
    return {package: _version(package) for package in packages}


def attestor(facts: CycleFacts, signing_key: Path) -> Callable[[ModelFiles], Attestation]:
    """The `attest` hook of `write_signed_model`: states `facts` about the files just signed, signed with the key,
    as a DSSE envelope and the Sigstore bundle of the same signature."""

    def attest(files: ModelFiles) -> Attestation:
        from trainguard.provenance.sigstore_bundle import bundle_json

        statement = build_statement(replace(facts, model_digests=dict(files.digests)))
        envelope, key = _signed_envelope(statement, signing_key)
        return Attestation(_as_bytes(envelope.to_json()), bundle_json(envelope, key.public))

    return attest


@dataclass(frozen=True)
class VerifiedAttestation:
    """An attestation whose DSSE signature a trusted key made, and the statement it carries."""

    path: Path
    statement: dict[str, Any]
    keyids: tuple[str, ...]

    @property
    def subjects(self) -> dict[str, str]:
        """Subject name -> sha256."""
        return {s["name"]: s["digest"]["sha256"] for s in self.statement["subject"]}


def sign_statement(statement: Mapping[str, Any], signing_key: Path) -> bytes:
    """The statement in a DSSE envelope signed with a provenance key file (PEM), as JSON bytes."""
    envelope, _ = _signed_envelope(statement, signing_key)
    return _as_bytes(envelope.to_json())


def _signed_envelope(statement: Mapping[str, Any], signing_key: Path) -> tuple[Envelope, SigningKey]:
    from trainguard.provenance.dsse import sign_envelope
    from trainguard.provenance.errors import ProvenanceError
    from trainguard.provenance.keys import load_signing_key

    try:
        key = load_signing_key(signing_key)
    except ProvenanceError as error:
        raise AttestationError(f"cannot load attestation key {signing_key}: {error}", path=str(signing_key)) from None
    return sign_envelope(PAYLOAD_TYPE, statement_bytes(statement), key), key


def verify_attestation(path: Path, trusted: Sequence[Path], threshold: int = 1) -> VerifiedAttestation:
    """Checks the envelope's signatures against the trusted public keys and parses the SLSA statement."""
    from trainguard.provenance.dsse import Envelope, verify_envelope
    from trainguard.provenance.errors import ProvenanceError
    from trainguard.provenance.keys import load_verifying_key

    path = Path(path)
    try:
        keys = [load_verifying_key(key) for key in trusted]
    except ProvenanceError as error:
        raise AttestationInputError(f"cannot load a trusted key: {error}") from None
    try:
        data = read_regular(path)
    except OSError as error:
        raise AttestationInputError(f"{path}: cannot read: {error.strerror}", path=str(path)) from None
    try:
        envelope = Envelope.from_json(data)
    except ProvenanceError as error:
        raise AttestationInputError(f"{path}: malformed attestation: {error}", path=str(path)) from None
    try:
        keyids = tuple(verify_envelope(envelope, keys, threshold))
    except ProvenanceError as error:
        raise AttestationError(f"{path}: attestation signature check failed: {error}", path=str(path)) from None
    if envelope.payload_type != PAYLOAD_TYPE:
        raise AttestationError(f"{path}: payloadType is {envelope.payload_type!r}, not {PAYLOAD_TYPE}", path=str(path))
    return VerifiedAttestation(path, _parse_statement(envelope.payload, path), keyids)


def _parse_statement(payload: bytes, path: Path) -> dict[str, Any]:
    """The SLSA statement in a verified payload, as strict JSON with every field the verifier reads present and
    typed; anything else is an AttestationInputError (exit 2) naming the file."""
    try:
        statement = strictjson.loads(payload)
        if not isinstance(statement, dict):
            raise TypeError("the statement is not a JSON object")
        if statement.get("_type") != STATEMENT_TYPE or statement.get("predicateType") != PREDICATE_TYPE:
            raise ValueError(f"not an in-toto v1 SLSA provenance statement ({statement.get('predicateType')!r})")
        subjects = statement["subject"]
        if not isinstance(subjects, list) or not subjects:
            raise ValueError("no subject")
        for subject in subjects:
            if not (isinstance(subject["name"], str) and isinstance(subject["digest"]["sha256"], str)):
                raise ValueError("a subject lacks a name or sha256")
        predicate = statement["predicate"]
        if not isinstance(predicate["buildDefinition"]["resolvedDependencies"], list):
            raise TypeError("resolvedDependencies is not a list")
        run = predicate["runDetails"]
        if not isinstance(run["metadata"], dict) or not isinstance(run.get("byproducts", []), list):
            raise TypeError("runDetails.metadata is not an object or byproducts not a list")
        if not all(isinstance(product, dict) for product in run.get("byproducts", [])):
            raise TypeError("a byproduct is not an object")
    except strictjson.StrictJSONError as error:
        raise AttestationInputError(f"{path}: statement is not strict JSON: {error}", path=str(path)) from None
    except (ValueError, KeyError, TypeError) as error:
        raise AttestationInputError(f"{path}: malformed statement: {error}", path=str(path)) from None
    return statement


def _as_bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data
