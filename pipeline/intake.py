"""The cycle's intake: verify every signed manifest, read its shards verify-on-read, validate them, cap sources.

Manifest-level failures (signature, threshold, payload type, expiry, rollback) and any failure of the held-out
manifest stop the cycle: nothing it measures could be trusted. A listed training shard that fails its hash, size
or path check is refused by name and never read; the rest of the cycle goes on without it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

import pandas as pd

from trainguard.pipeline.config import CycleConfig, ManifestRef, ValidationSection
from trainguard.pipeline.errors import CycleAbortedError
from trainguard.pipeline.state import ShardDecision
from trainguard.provenance.errors import ProvenanceError
from trainguard.provenance.reader import ReadLog, ShardReader
from trainguard.provenance.state import RollbackState, default_state_path
from trainguard.provenance.verify import VerificationReport, VerifiedManifest, open_manifest, verify_dataset


@dataclass(frozen=True)
class SignedShard:
    """A shard read verify-on-read: its frame, where it is listed, who contributed it and for what role."""

    name: str
    sha256: str
    source: str
    role: str
    dataset: str
    frame: pd.DataFrame

    @property
    def key(self) -> str:
        """Unique across manifests: `dataset:name`, as `VerifiedDataModule(exclude=...)` takes it."""
        return f"{self.dataset}:{self.name}"


@dataclass(frozen=True)
class Intake:
    """What the intake verified and read, and every shard it refused (with the check and the reason)."""

    manifests: tuple[VerifiedManifest, ...]
    reports: tuple[VerificationReport, ...]
    train: tuple[SignedShard, ...]
    holdout: tuple[SignedShard, ...]
    holdout_sha256: str
    refused: tuple[ShardDecision, ...] = field(default=())

    @property
    def signer_keyids(self) -> tuple[str, ...]:
        return tuple(sorted({k for m in self.manifests for k in m.signers}))


def manifest_refs(config: CycleConfig) -> list[ManifestRef]:
    """Training and held-out manifests, each once (the same manifest may carry both roles)."""
    seen: dict[Path, ManifestRef] = {}
    for ref in (*config.dataset.training, config.dataset.holdout):
        seen.setdefault(ref.manifest.resolve(), ref)
    return list(seen.values())


def feature_columns(frame: pd.DataFrame, section: ValidationSection) -> list[str]:
    """The configured feature columns, or those matching the configured pattern, in frame order."""
    if section.feature_columns:
        return list(section.feature_columns)
    return [c for c in frame.columns if c != section.label_column and fnmatch(str(c), section.feature_pattern or "")]


def _verify(
    ref: ManifestRef, config: CycleConfig, rollback: RollbackState
) -> tuple[VerifiedManifest, VerificationReport]:
    """Every check on one manifest; a manifest-level failure (or unusable input) aborts the cycle."""
    trust = ref.trust or config.dataset.trust
    data_dir = ref.data_dir or ref.manifest.parent
    try:
        report = verify_dataset(
            ref.manifest, trust, data_dir=data_dir, state=rollback, allow_extra=config.dataset.allow_extra, record=False
        )
        failed = next((f for f in report.failures if f.shard is None), None)
        if failed is not None:
            raise CycleAbortedError(f"verify {ref.manifest}: {failed.line()}", check="verify")
        return open_manifest(ref.manifest, trust, data_dir=data_dir, state=rollback), report
    except ProvenanceError as error:
        raise CycleAbortedError(f"verify {ref.manifest}: {error.reason}: {error}", check="verify") from None


def verify_and_read(config: CycleConfig, log: ReadLog | None = None) -> Intake:
    """Verifies every manifest, then reads each shard that passed (hash checked again on read)."""
    rollback = RollbackState(config.dataset.state_file or default_state_path())
    holdout_path = config.dataset.holdout.manifest.resolve()
    manifests, reports, train, holdout, refused = [], [], [], [], []
    for ref in manifest_refs(config):
        verified, report = _verify(ref, config, rollback)
        failures = report.failures
        manifests.append(verified)
        reports.append(report)
        listed = {s.name: s for s in verified.manifest.shards}
        for failure in failures:
            if failure.shard not in listed or ref.manifest.resolve() == holdout_path:
                raise CycleAbortedError(f"verify {ref.manifest}: {failure.line()}", check="verify")
            shard = listed[failure.shard]
            refused.append(
                ShardDecision(
                    shard=f"{verified.manifest.dataset}:{shard.name}",
                    sha256=shard.sha256,
                    source=shard.source,
                    accepted=False,
                    check="verify",
                    reason=f"{failure.reason}: {failure.detail}",
                )
            )
        failed = {f.shard for f in failures}
        reader = ShardReader(verified, log)
        wanted = [s for s in verified.manifest.shards if s.name not in failed]
        for shard, (name, frame) in zip(wanted, reader.frames(s.name for s in wanted), strict=True):
            signed = SignedShard(name, shard.sha256, shard.source, shard.role, verified.manifest.dataset, frame)
            (holdout if shard.role == "holdout" else train).append(signed)
        rollback.record(verified.manifest.dataset, verified.manifest.version, verified.statement_sha256)
    if not holdout:
        raise CycleAbortedError(f"{config.dataset.holdout.manifest}: lists no role=holdout shard", check="verify")
    holdout_sha256 = next(m.manifest_sha256 for m in manifests if m.path.resolve() == holdout_path)
    return Intake(tuple(manifests), tuple(reports), tuple(train), tuple(holdout), holdout_sha256, tuple(refused))


def validate(
    shards: Sequence[SignedShard], section: ValidationSection
) -> tuple[list[SignedShard], list[ShardDecision]]:
    """Schema checks (dtypes, ranges, nulls, labels, cross-source duplicates): invalid shards are quarantined."""
    from trainguard.defenses.validation import Shard, ShardSchema, validate_shards

    if not shards:
        return [], []
    features = tuple(feature_columns(shards[0].frame, section))
    schema = ShardSchema(
        features=features,
        label=section.label_column,
        allowed_labels=tuple(section.labels),
        min_value=section.feature_min,
        max_value=section.feature_max,
    )
    result = validate_shards([Shard(s.key, s.source, s.frame) for s in shards], schema)
    verdicts = {v.name: v for v in result.verdicts}
    kept, refused = [], []
    for shard in shards:
        verdict = verdicts[shard.key]
        if verdict.accepted and len(shard.frame) >= section.min_rows:
            kept.append(shard)
            continue
        reason = verdict.reason if not verdict.accepted else f"{len(shard.frame)} rows, fewer than {section.min_rows}"
        refused.append(_refusal(shard, "validate", f"{verdict.check}: {reason}"))
    return kept, refused


def cap_sources(shards: Sequence[SignedShard], max_fraction: float) -> tuple[list[SignedShard], list[ShardDecision]]:
    """Drops a source's latest shards beyond what `max_fraction` of the cycle's rows allows it."""
    from trainguard.defenses.limits import capped_rows

    rows: dict[str, int] = defaultdict(int)
    for shard in shards:
        rows[shard.source] += len(shard.frame)
    allowed = capped_rows(rows, max_fraction)
    used: dict[str, int] = defaultdict(int)
    kept, refused = [], []
    for shard in shards:
        if used[shard.source] + len(shard.frame) <= allowed[shard.source]:
            used[shard.source] += len(shard.frame)
            kept.append(shard)
        else:
            share = rows[shard.source] / max(sum(rows.values()), 1)
            reason = (
                f"source {shard.source} offers {share:.1%} of this cycle's rows; the cap is {max_fraction:.1%} "
                f"({allowed[shard.source]} rows)"
            )
            refused.append(_refusal(shard, "limits", reason))
    return kept, refused


def _refusal(shard: SignedShard, check: str, reason: str) -> ShardDecision:
    return ShardDecision(
        shard=shard.key, sha256=shard.sha256, source=shard.source, accepted=False, check=check, reason=reason
    )


def accepted(shard: SignedShard, check: str, reason: str) -> ShardDecision:
    """The decision that `shard` may be trained on, after `check`."""
    return ShardDecision(
        shard=shard.key, sha256=shard.sha256, source=shard.source, accepted=True, check=check, reason=reason
    )


def concat(shards: Iterable[SignedShard]) -> pd.DataFrame:
    frames = [s.frame for s in shards]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
