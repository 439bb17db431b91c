"""The cycle's local report: one JSON file per cycle and the latest as `report.json` (DVC's metrics file), written
before anything is sent to MLflow, so the local record never depends on the tracking server.

Its structure is `CycleReportDict` (the sections below, `TypedDict`s: JSON as written, the keys of a section that is
not always written `NotRequired`), so where a shard or source is refused reads off the types: `verification.refused`
(signature or digest), `validation` (schema), `limits` (source caps), `detection.rejected` (reject-source) and
`detection.quarantined_rows` (rows), `roni.decisions` / `roni.sources` (RONI), `copied_rows` (rows shared across
sources), then `gate` (the model) and `source_lines` (all of it in words). What the cycle trained on is named in `data`
by digest (manifests, Merkle roots), its rows kept in parquet files beside the report (the allow-list, every shard
decision), so the report does not grow with the pipeline's history. Sections made by `trainguard.defenses` and
`trainguard.provenance` (`to_dict` of their reports, plain dicts there) enter the report through the `*_section`
functions here, which declare their shape without changing a value."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict, cast

from trainguard.files import atomic_write
from trainguard.pipeline.cycle_state import ShardDecision
from trainguard.pipeline.workdir import WorkDir
from trainguard.provenance.merkle import ALGORITHM, merkle_root, shard_leaves

if TYPE_CHECKING:
    import pyarrow as pa

    from trainguard.defenses.detectors import Detections
    from trainguard.defenses.gate import GateVerdict
    from trainguard.defenses.margin import SourceMargin
    from trainguard.defenses.roni import ScreeningReport
    from trainguard.provenance.allowlist import AllowList


class TaskReport(TypedDict):
    """The task the cycle trained for and what its `accuracy` means."""

    kind: str
    accuracy_is: str


class ShardDecisionRow(TypedDict):
    """One `ShardDecision` as JSON (`model_dump()`): which check refused or accepted the shard, and why."""

    shard: str
    sha256: str
    source: str
    accepted: bool
    check: str
    reason: str


class VerificationSection(TypedDict):
    """The intake: each manifest's verification (`provenance.verify.VerificationReport.to_dict`, the format of
    `trainguard data verify --json`), the signers' key ids and the shards refused by `verify`."""

    manifests: list[dict[str, Any]]
    signers: list[str]
    refused: list[ShardDecisionRow]


class SourceFindingRow(TypedDict):
    """One source's figures from one detector (`defenses.findings.SourceFinding`)."""

    source: str
    rows: int
    flagged_rows: int
    fraction: float
    expected: float
    p_value: float
    q_value: float
    flagged: bool


class DetectorSummary(TypedDict):
    """One detector's findings (`defenses.findings.Findings.summary`)."""

    detector: str
    rows: int
    flagged_rows: int
    clean_rate: float
    reference_rows: int
    alpha: float
    flagged_sources: list[str]
    sources: list[SourceFindingRow]


class DetectionSection(TypedDict):
    """The row-level detectors, in one of three shapes: `{"enabled": False}` when they are off; `action` and
    `shards` (0) when no shard was left to examine; else everything below, `flagged_sources`, `flagged_rows` (a
    count) and `detectors` from `defenses.detectors.Detections.to_dict`. `quarantined_rows` (shard key -> rows) are
    the rows training skips (action `quarantine-rows`), `rejected` the shards refused (`reject-source`)."""

    enabled: NotRequired[bool]
    action: NotRequired[str]
    shards: NotRequired[int]
    rows: NotRequired[int]
    reference_rows: NotRequired[int]
    flagged_sources: NotRequired[list[str]]
    flagged_rows: NotRequired[int]
    detectors: NotRequired[dict[str, DetectorSummary]]
    flagged: NotRequired[dict[str, list[int]]]
    quarantined_rows: NotRequired[dict[str, list[int]]]
    rejected: NotRequired[list[ShardDecisionRow]]


class Quantiles(TypedDict):
    median: float
    q90: float
    q99: float
    max: float


class CalibrationStratum(TypedDict):
    """One stratum of RONI's calibration: its draws' size and class counts, and their impacts' and scores' spread."""

    size: int
    counts: list[int] | None
    draws: int
    impact_quantiles: Quantiles
    score_quantiles: Quantiles


class LrProbe(TypedDict):
    """A learning rate RONI's "auto" probe tried, with its poisoned draws' separation (None: unstable, or not
    measured)."""

    lr: float
    separation: float | None


class CandidateDecisionRow(TypedDict):
    """RONI's test of one shard (`defenses.roni.CandidateDecision`; non-finite numbers as None)."""

    name: str
    source: str
    size: int
    impact: float
    class_impacts: list[float | None]
    score: float | None
    p_value: float
    source_p_value: float | None
    adjusted_p_value: float
    calibration_size: int
    accepted: bool
    reason: str


class SourceDecisionRow(TypedDict):
    """RONI's test of one source as a whole (`defenses.roni.SourceDecision`; non-finite numbers as None): `flagged`
    refuses every shard of the source this cycle."""

    source: str
    shards: Sequence[str]
    rows: int
    union_impact: float | None
    union_p_value: float | None
    combined_p_value: float
    earlier: int
    p_value: float
    adjusted_p_value: float
    flagged: bool
    reason: str
    evidence: Sequence[float]
    class_impacts: list[float | None]


class MarginRow(TypedDict):
    """The margin check of one source (`defenses.margin.SourceMargin`); `flagged` is for review, not a refusal."""

    source: str
    count: int
    median_margin: float
    population_median: float
    p_value: float
    flagged: bool
    reason: str


class RoniSection(TypedDict):
    """RONI's screening, absent when it is disabled; `{"candidates": 0}` when no new shard was left to screen, else
    its report (`level` to `sources`: `defenses.roni.ScreeningReport.to_dict`, with each shard's test in `decisions`
    and each source's in `sources`), the files it wrote, the margin check (rows, or why it was skipped) and the
    sources flagged (every shard refused) or flagged for review."""

    candidates: NotRequired[int]
    level: NotRequired[float]
    error_control: NotRequired[str]
    combination: NotRequired[str]
    calibration: NotRequired[list[CalibrationStratum]]
    base_soft_accuracy: NotRequired[float]
    seconds: NotRequired[float]
    scope: NotRequired[str]
    head: NotRequired[str | None]
    lr: NotRequired[float]
    lr_probe: NotRequired[list[LrProbe]]
    chunk_size: NotRequired[int | None]
    config: NotRequired[dict[str, Any]]
    decisions: NotRequired[list[CandidateDecisionRow]]
    sources: NotRequired[list[SourceDecisionRow]]
    local_report: NotRequired[str]
    plot: NotRequired[str]
    margin: NotRequired[list[MarginRow] | str]
    flagged_sources: NotRequired[list[str]]
    flagged_for_review: NotRequired[list[str]]


class ReadLogSection(TypedDict):
    """The training read log: where it is written, its digest and how many reads it records."""

    path: str
    sha256: str
    entries: int


class TrainingSection(TypedDict):
    """Training: its adversarial method, last metrics, robust accuracy per eps, what it read and the rows it
    skipped (shard key -> rows); the gradient-masking check and each attack's cost only when they ran."""

    adversarial: str
    metrics: dict[str, float]
    robust_accuracy: dict[str, float]
    gradient_masking: NotRequired[dict[str, object]]
    robust_cost: NotRequired[dict[str, dict[str, float]]]
    read_log: ReadLogSection
    excluded_rows: dict[str, list[int]]


class HeldoutMetricsDict(TypedDict):
    """`defenses.heldout.HeldoutMetrics.to_dict`."""

    loss: float
    accuracy: float
    class_loss: list[float]
    class_accuracy: list[float]


class GateSection(TypedDict):
    """The gate's verdict on the model (`defenses.gate.GateVerdict.to_dict`), `accepted` and `reason` after the
    config's accuracy floors too."""

    accepted: bool
    reason: str
    before: HeldoutMetricsDict
    after: HeldoutMetricsDict


class ModelSection(TypedDict):
    """The released model: its directory, the signed files' digests, its attestation and registered version."""

    dir: str
    digests: dict[str, str]
    attestation: str
    registered_version: str | None


class StateLink(TypedDict):
    """The signed state's link the report was written under."""

    pipeline: str
    seq: int
    link: str


class ManifestDigest(TypedDict):
    """A data manifest by its dataset name and the sha256 of its signed bytes."""

    name: str
    sha256: str


class MerkleTreeRef(TypedDict):
    """A set of shards by the RFC 9162 root (hex) of its sorted `[name, sha256]` leaves (`provenance.merkle`): a
    verifier proves one shard in it with `merkle.inclusion_proof` over the rows of the matching table."""

    merkle_root: str
    shards: int


class TableFile(TypedDict):
    """A parquet file beside the report: where it is (`path`, relative to the work dir, e.g.
    `reports/cycle-0001.decisions.parquet`), the sha256 of its bytes and how many rows it holds."""

    path: str
    sha256: str
    rows: int


class DataSection(TypedDict):
    """The data, by digest: the manifests, the allow-list planned for training (its root over `dataset:name` keys,
    and its rows in `allow_list`; where training refused a shard at read, the attestation's root names only what it
    read); once the cycle decided, the shards it accepted (root over decision names) and every shard
    decision (`decisions`, the table MLflow gets). Its size is independent of the shard count."""

    algorithm: str
    manifests: list[ManifestDigest]
    allowed: MerkleTreeRef
    allow_list: TableFile
    accepted: NotRequired[MerkleTreeRef]
    decisions: NotRequired[TableFile]


class CycleReportDict(TypedDict):
    """The cycle's report (`report.json`), in the order its sections are written; a section is absent when the
    cycle ended (`status` `failed`, with `reason` and `failed_check`) before it."""

    cycle: int
    config: str
    config_sha256: str
    task: TaskReport
    verification: NotRequired[VerificationSection]
    validation: NotRequired[list[ShardDecisionRow]]
    limits: NotRequired[list[ShardDecisionRow]]
    detection: NotRequired[DetectionSection]
    roni: NotRequired[RoniSection]
    data: NotRequired[DataSection]
    copied_rows: NotRequired[dict[str, list[int]]]
    training: NotRequired[TrainingSection]
    gate: NotRequired[GateSection]
    model: NotRequired[ModelSection]
    source_lines: NotRequired[list[str]]
    status: NotRequired[str]
    reason: NotRequired[str]
    failed_check: NotRequired[str]
    metrics: NotRequired[dict[str, float]]
    model_dir: NotRequired[str | None]
    tracking: NotRequired[str]
    state: NotRequired[StateLink]


def decision_rows(decisions: Sequence[ShardDecision]) -> list[ShardDecisionRow]:
    """The decisions as the report lists them (`model_dump()`)."""
    return [cast(ShardDecisionRow, d.model_dump()) for d in decisions]


def detections_section(detections: Detections) -> DetectionSection:
    """The detectors' findings (`flagged_sources`, `flagged_rows`, `detectors`) as the detection section holds them."""
    return cast(DetectionSection, detections.to_dict())


def screening_section(screening: ScreeningReport) -> RoniSection:
    """RONI's report (`level` to `sources`) as the roni section holds it."""
    return cast(RoniSection, screening.to_dict())


def margin_rows(margins: Sequence[SourceMargin]) -> list[MarginRow]:
    """The margin check's sources as the report's roni section lists them (`vars`)."""
    return [cast(MarginRow, vars(m)) for m in margins]


def gate_section(verdict: GateVerdict, accepted: bool, reason: str) -> GateSection:
    """The gate's verdict with the cycle's decision (`accepted`, `reason`) after the accuracy floors."""
    return {**cast(GateSection, verdict.to_dict()), "accepted": accepted, "reason": reason}


def write_report(work_dir: Path, cycle: int, report: CycleReportDict) -> tuple[Path, str]:
    """Writes the report atomically, as `reports/cycle-NNNN.json` and as the latest `report.json`; returns the
    first and the SHA-256 of the bytes written."""
    text = (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode()
    paths = WorkDir(work_dir)
    path = paths.report(cycle)
    for target in (path, paths.latest_report):
        atomic_write(target, text)
    return path, hashlib.sha256(text).hexdigest()


def refusals(shards: Sequence[ShardDecision]) -> dict[str, int]:
    """How many shards each check refused."""
    refused: dict[str, int] = {}
    for decision in shards:
        if not decision.accepted:
            refused[decision.check] = refused.get(decision.check, 0) + 1
    return refused


def data_section(work_dir: Path, cycle: int, manifests: Sequence[tuple[str, str]], allow: AllowList) -> DataSection:
    """The report's `data`: the manifests by digest and the allow-list by its Merkle root, its rows written to
    `reports/cycle-NNNN.allow.parquet` (columns of `AllowedShard`).

    Args:
        work_dir: The cycle's work dir.
        cycle: The cycle's number.
        manifests: (dataset name, sha256) of each manifest the cycle verified.
        allow: The allow-list training reads from.

    Returns:
        The section, without the decisions (see `decided`).
    """
    import pyarrow as pa

    rows = [vars(shard) for shard in sorted(allow.shards)]
    schema = pa.schema([(name, pa.string()) for name in ("manifest_sha256", "dataset", "name", "sha256")])
    return {
        "algorithm": ALGORITHM,
        "manifests": manifest_digests(manifests),
        "allowed": allowed_tree(allow),
        "allow_list": write_table(work_dir, WorkDir(work_dir).allow_table(cycle), rows, schema),
    }


def decided(
    work_dir: Path, cycle: int, section: DataSection, shards: Sequence[ShardDecision], accepted: MerkleTreeRef
) -> DataSection:
    """The data section with the cycle's accepted shards by Merkle root and every decision written to
    `reports/cycle-NNNN.decisions.parquet` (one column per `ShardDecision` field).

    Args:
        work_dir: The cycle's work dir.
        cycle: The cycle's number.
        section: The section `data_section` made.
        shards: Every shard decision of the cycle.
        accepted: `accepted_tree(shards)`, computed once for the report and the attestation.

    Returns:
        The completed section.
    """
    import pyarrow as pa

    types = {"accepted": pa.bool_()}
    schema = pa.schema([(name, types.get(name, pa.string())) for name in ShardDecision.model_fields])
    rows = [d.model_dump(mode="json") for d in shards]
    return {
        **section,
        "accepted": accepted,
        "decisions": write_table(work_dir, WorkDir(work_dir).decisions_table(cycle), rows, schema),
    }


def write_table(work_dir: Path, path: Path, rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> TableFile:
    """Writes rows as one parquet file under the work dir, atomically.

    Args:
        work_dir: The cycle's work dir.
        path: The file (a `WorkDir` table path under `work_dir`).
        rows: The rows, keyed by the schema's column names.
        schema: The columns and their types.

    Returns:
        Where it is (relative to `work_dir`), its sha256 and its row count.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(list(rows), schema=schema), sink)
    data = sink.getvalue().to_pybytes()
    atomic_write(path, data)
    where = path.relative_to(work_dir).as_posix()
    return {"path": where, "sha256": hashlib.sha256(data).hexdigest(), "rows": len(rows)}


def merkle_tree(shards: Iterable[tuple[str, str]]) -> MerkleTreeRef:
    """A set of shards by the Merkle root of its sorted `[name, sha256]` leaves and its size: the one computation
    of the roots the report's data section and the attestation's record name.

    Args:
        shards: (name, sha256) of each shard.

    Returns:
        The root (hex) and the shard count.
    """
    leaves = shard_leaves(list(shards))
    return {"merkle_root": merkle_root(leaves).hex(), "shards": len(leaves)}


@dataclass(frozen=True)
class DataRoots:
    """What a cycle trained on by Merkle root, computed once: the allow-list training read (`allowed_tree`) and the
    shards it accepted (`accepted_tree`), for the attestation's record and the report's data section."""

    allowed: MerkleTreeRef
    accepted: MerkleTreeRef


def allowed_tree(allow: AllowList) -> MerkleTreeRef:
    """An allow-list by its root over `dataset:name` keys (`merkle_tree`)."""
    return merkle_tree((s.key, s.sha256) for s in allow.shards)


def accepted_tree(shards: Sequence[ShardDecision]) -> MerkleTreeRef:
    """The shards a cycle accepted by their root over decision names (`merkle_tree`)."""
    return merkle_tree(d.key for d in shards if d.accepted)


def manifest_digests(manifests: Iterable[tuple[str, str]]) -> list[ManifestDigest]:
    """The manifests by (dataset name, sha256), sorted by name then digest, as the report and attestation list them.

    Args:
        manifests: (dataset name, sha256) of each manifest.

    Returns:
        The sorted `{"name", "sha256"}` entries.
    """
    return [{"name": name, "sha256": digest} for name, digest in sorted(manifests)]
