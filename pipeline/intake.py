"""The cycle's intake: verify every signed manifest once, read its shards verify-on-read, validate them, cap
sources.

Manifest-level failures (signature, threshold, authorisation, wrong dataset, payload type, expiry, rollback) and
any failure of the held-out set or of a trusted shard stop the cycle: nothing it measures could be trusted. A
training shard that fails its hash, size, path or decoding check is refused by name; the cycle goes on without it.
What a shard is used for comes from its signed role, which the trust policy let its signers grant: `trusted`
shards are the unscreened base, `train` shards are screened, `holdout` shards of the held-out manifest are
measured on and never trained on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from trainguard.pipeline.config import CycleConfig, ValidationSection
from trainguard.pipeline.cycle_state import ShardDecision
from trainguard.pipeline.errors import CycleAbortedError
from trainguard.provenance.allowlist import AllowedShard
from trainguard.provenance.dataset import read_as_table, table_samples
from trainguard.provenance.errors import ProvenanceError
from trainguard.provenance.formats import Decoder, Samples, default_decoders
from trainguard.provenance.manifest import ShardEntry
from trainguard.provenance.manifest_ref import ManifestRef
from trainguard.provenance.reader import ReadLog, ShardReader
from trainguard.provenance.rollback import RollbackCheck
from trainguard.provenance.verify import VerificationReport, VerifiedManifest, open_manifest, verify_shards

if TYPE_CHECKING:
    from trainguard.defenses.samples import SampleSchema
    from trainguard.defenses.validation import ShardSchema


@dataclass(frozen=True)
class SignedShard:
    """A shard read verify-on-read: its decoded samples (and, for tables, the frame they came from), the manifest
    that listed it and the key set that signed it, the source it counts as and its signed role."""

    name: str
    sha256: str
    source: str
    role: str
    dataset: str
    manifest_sha256: str
    samples: Samples
    frame: pd.DataFrame | None = None
    key_set: str = ""

    @property
    def key(self) -> str:
        """Its identity across manifests, as decisions and reports name it: `<key set>/<dataset>:<name>` (two key
        sets may each sign a dataset of the same name)."""
        return shard_key(self.key_set, self.dataset, self.name)

    @property
    def allowed(self) -> AllowedShard:
        """This shard as an allow-list entry: exactly these bytes, as listed in exactly this manifest."""
        return AllowedShard(self.manifest_sha256, self.dataset, self.name, self.sha256)


@dataclass(frozen=True)
class Intake:
    """What the intake verified and read (by signed role), and every shard it refused (with check and reason)."""

    manifests: tuple[VerifiedManifest, ...]
    reports: tuple[VerificationReport, ...]
    trusted: tuple[SignedShard, ...]
    train: tuple[SignedShard, ...]
    holdout: tuple[SignedShard, ...]
    holdout_sha256: str
    refused: tuple[ShardDecision, ...] = field(default=())

    @property
    def signer_keyids(self) -> tuple[str, ...]:
        return tuple(sorted({k for m in self.manifests for k in m.signers}))


def shard_key(key_set: str, dataset: str, name: str) -> str:
    """A shard's identity: which key set signed it, in which dataset, under which name."""
    return f"{key_set}/{dataset}:{name}"


def manifest_refs(config: CycleConfig) -> list[ManifestRef]:
    """Training and held-out manifests, each once (the same manifest may carry both roles)."""
    seen: dict[Path, ManifestRef] = {}
    for ref in (*config.dataset.training, config.dataset.holdout):
        seen.setdefault(ref.manifest.resolve(), ref)
    return list(seen.values())


def feature_columns(frame: pd.DataFrame | None, section: ValidationSection) -> list[str] | None:
    """The configured feature columns, or those matching the configured pattern, in frame order (None for shards
    that are not tables)."""
    if frame is None:
        return None
    if section.feature_columns:
        return list(section.feature_columns)
    pattern = section.feature_pattern or "*"
    return [c for c in frame.columns if c not in section.target_names and fnmatch(str(c), pattern)]


def _verify(
    ref: ManifestRef, config: CycleConfig, rollback: RollbackCheck
) -> tuple[VerifiedManifest, VerificationReport]:
    """Every check on one manifest, read once; a manifest-level failure (or unusable input) aborts the cycle."""
    trust = config.dataset.trust_of(ref)
    data_dir = ref.data_dir or ref.manifest.parent
    try:
        verified = open_manifest(ref.manifest, trust, dataset=ref.dataset, data_dir=data_dir, state=rollback)
        return verified, verify_shards(verified, allow_extra=config.dataset.allow_extra)
    except ProvenanceError as error:
        raise CycleAbortedError(f"verify {ref.manifest}: {error.reason}: {error}", check="verify") from None


def verify_and_read(
    config: CycleConfig, rollback: RollbackCheck, decoders: Mapping[str, Decoder], log: ReadLog | None = None
) -> Intake:
    """Verifies every manifest (rollback checked against `rollback`), then reads and decodes each shard that passed
    (tables through their columns, other formats through `decoders`), its hash checked again on read. Recording the
    accepted manifest versions is the caller's (it owns the state)."""
    holdout_ref = config.dataset.holdout
    every_decoder = default_decoders(decoders, label=config.validation.label_column)
    manifests: list[VerifiedManifest] = []
    reports: list[VerificationReport] = []
    refused: list[ShardDecision] = []
    by_role: dict[str, list[SignedShard]] = defaultdict(list)
    pending: list[tuple[ManifestRef, VerifiedManifest, ShardReader, ShardEntry]] = []
    for ref in manifest_refs(config):
        verified, report = _verify(ref, config, rollback)
        _refuse_shared_namespace(verified, manifests)
        manifests.append(verified)
        reports.append(report)
        is_holdout = ref.manifest.resolve() == holdout_ref.manifest.resolve()
        listed = {s.name: s for s in verified.manifest.shards}
        for failure in report.failures:
            shard = listed.get(failure.shard or "")
            if shard is None or is_holdout or shard.role != "train":
                raise CycleAbortedError(f"verify {ref.manifest}: {failure.line()}", check="verify")
            refused.append(_refused_entry(verified, shard.name, "verify", f"{failure.reason}: {failure.detail}"))
        failed = {f.shard for f in report.failures}
        reader = ShardReader(verified, log)
        pending += [
            (ref, verified, reader, shard)
            for shard in verified.manifest.shards
            if shard.name not in failed and (shard.role != "holdout" or is_holdout)
        ]
    ceiling, held = config.limits.max_decoded_bytes, 0
    for ref, verified, reader, shard in sorted(pending, key=lambda p: p[3].role == "train"):  # base, held-out first
        try:
            samples, frame = decode_shard(reader, shard.name, config.validation, decoders, every_decoder)
        except ProvenanceError as error:
            if shard.role != "train":
                raise CycleAbortedError(f"read {ref.manifest}: {error.reason}: {error}", check="verify") from None
            refused.append(_refused_entry(verified, shard.name, "verify", f"{error.reason}: {error}"))
            continue
        size = decoded_bytes(samples, frame)
        if held + size > ceiling:
            message = f"decoding {shard.name} would hold {held + size} bytes, over limits.max_decoded_bytes {ceiling}"
            if shard.role != "train":
                raise CycleAbortedError(f"read {ref.manifest}: intake-ceiling: {message}", check="intake-ceiling")
            refused.append(_refused_entry(verified, shard.name, "verify", f"intake-ceiling: {message}"))
            continue
        held += size
        by_role[shard.role].append(
            SignedShard(
                shard.name,
                shard.sha256,
                verified.key_set.attributed_source(shard.source),
                shard.role,
                verified.manifest.dataset,
                verified.manifest_sha256,
                samples,
                frame,
                verified.key_set.namespace,
            )
        )
    if not by_role["holdout"]:
        raise CycleAbortedError(f"{holdout_ref.manifest}: lists no role=holdout shard", check="verify")
    holdout_sha256 = next(m.manifest_sha256 for m in manifests if m.path.resolve() == holdout_ref.manifest.resolve())
    return Intake(
        tuple(manifests),
        tuple(reports),
        tuple(by_role["trusted"]),
        tuple(by_role["train"]),
        tuple(by_role["holdout"]),
        holdout_sha256,
        tuple(refused),
    )


def decoded_bytes(samples: Samples, frame: pd.DataFrame | None) -> int:
    """The memory a decoded shard holds in the intake: its arrays, and its table when it has one."""
    table = int(frame.memory_usage(index=True).sum()) if frame is not None else 0
    return int(samples.inputs.nbytes) + int(samples.targets.nbytes) + table


def decode_shard(
    reader: ShardReader,
    name: str,
    section: ValidationSection,
    configured: Mapping[str, Decoder],
    every_decoder: Mapping[str, Decoder],
) -> tuple[Samples, pd.DataFrame | None]:
    """A shard's samples: as a table (feature and label columns) unless a configured decoder claims its suffix,
    else through the decoder for its suffix, else refused as a format with no decoder."""
    if read_as_table(name, configured):
        frame = reader.read_frame(name)
        return table_samples(name, frame, feature_columns(frame, section), section.table_targets), frame
    return reader.read_samples(name, every_decoder), None


def _refuse_shared_namespace(verified: VerifiedManifest, earlier: Sequence[VerifiedManifest]) -> None:
    """Two manifests of one key set for one dataset would share shard identities and anti-rollback records."""
    twin = next((m for m in earlier if m.rollback_key == verified.rollback_key), None)
    if twin is not None:
        raise CycleAbortedError(
            f"verify {verified.path}: key set {verified.key_set.label} signs dataset {verified.manifest.dataset!r} in "
            f"{twin.path} too; configure one manifest per key set and dataset",
            check="verify",
        )


def _refused_entry(verified: VerifiedManifest, name: str, check: str, reason: str) -> ShardDecision:
    shard = next(s for s in verified.manifest.shards if s.name == name)
    return ShardDecision(
        shard=shard_key(verified.key_set.namespace, verified.manifest.dataset, name),
        sha256=shard.sha256,
        source=verified.key_set.attributed_source(shard.source),
        accepted=False,
        check=check,
        reason=reason,
    )


def validate(
    shards: Sequence[SignedShard], section: ValidationSection
) -> tuple[list[SignedShard], list[ShardDecision]]:
    """Schema checks (tables: dtypes, ranges, nulls, labels; decoded samples: shape, range,
    finiteness, labels): invalid shards are quarantined."""
    verdicts = {**_table_verdicts([s for s in shards if s.frame is not None], section)}
    verdicts |= _sample_verdicts([s for s in shards if s.frame is None], section)
    kept, refused = [], []
    for shard in shards:
        verdict = verdicts[shard.key]
        if verdict.accepted and len(shard.samples) >= section.min_rows:
            kept.append(shard)
            continue
        rows = len(shard.samples)
        reason = verdict.reason if not verdict.accepted else f"{rows} rows, fewer than {section.min_rows}"
        refused.append(refusal(shard, "validate", f"{verdict.check}: {reason}"))
    return kept, refused


def _sample_verdicts(shards: Sequence[SignedShard], section: ValidationSection) -> dict[str, Any]:
    if not shards:
        return {}
    from trainguard.defenses.samples import validate_samples

    schema = sample_schema(section)
    return {s.key: validate_samples(s.key, s.samples, schema, source=s.source) for s in shards}


def sample_schema(section: ValidationSection) -> SampleSchema:
    """What a decoded (not table) shard's samples must be: shape, value range, labels or targets."""
    from trainguard.defenses.samples import SampleSchema

    targets = section.targets
    return SampleSchema(
        shape=section.input_shape,
        min_value=section.feature_min,
        max_value=section.feature_max,
        allowed_labels=tuple(section.labels) if targets is None else None,
        target_shape=targets.shape if targets is not None else None,
        target_min=targets.min if targets is not None else None,
        target_max=targets.max if targets is not None else None,
    )


def _table_verdicts(shards: Sequence[SignedShard], section: ValidationSection) -> dict[str, Any]:
    from trainguard.defenses.validation import Shard, validate_shards

    if not shards:
        return {}
    schema = table_schema(shards[0].frame, section)
    result = validate_shards([Shard(s.key, s.source, s.frame) for s in shards], schema)
    return {v.name: v for v in result.verdicts}


def table_schema(frame: pd.DataFrame | None, section: ValidationSection) -> ShardSchema:
    """What a table shard must be: its feature columns (as `frame`'s columns give them), labels or targets, range."""
    from trainguard.defenses.validation import ShardSchema

    targets = section.targets
    return ShardSchema(
        features=tuple(feature_columns(frame, section) or ()),
        label=section.label_column,
        allowed_labels=tuple(section.labels) if targets is None else None,
        min_value=section.feature_min,
        max_value=section.feature_max,
        targets=section.target_columns,
        target_min=targets.min if targets is not None else None,
        target_max=targets.max if targets is not None else None,
    )


def admit(intake: Intake, config: CycleConfig) -> tuple[list[SignedShard], list[ShardDecision], list[ShardDecision]]:
    """The cycle's rules before screening: validation (a trusted shard that fails it stops the cycle), then the
    per-source caps. Returns the shards kept, those validation quarantined and those over a source's cap; no trusted
    shard at all stops the cycle."""
    if not intake.trusted:
        raise CycleAbortedError(
            "no trusted training shard: sign the base set with role `trusted` by a key set the trust policy grants it",
            "verify",
        )
    trusted_keys = {s.key for s in intake.trusted}
    valid, invalid = validate([*intake.trusted, *intake.train], config.validation)
    bad = next((d for d in invalid if d.shard in trusted_keys), None)
    if bad is not None:
        raise CycleAbortedError(f"trusted shard {bad.shard} is invalid: {bad.reason}", "validate")
    kept, capped = cap_sources(valid, config.limits.max_fraction_per_source)
    return kept, invalid, capped


def cap_sources(shards: Sequence[SignedShard], max_fraction: float) -> tuple[list[SignedShard], list[ShardDecision]]:
    """Drops a source's latest shards beyond what `max_fraction` of the cycle's rows allows it. The trusted base is
    never capped: its rows count in the total, and no source is measured against it."""
    from trainguard.defenses.limits import capped_rows

    rows: dict[str, int] = defaultdict(int)
    for shard in shards:
        if shard.role != "trusted":
            rows[shard.source] += len(shard.samples)
    trusted = sum(len(s.samples) for s in shards if s.role == "trusted")
    allowed = capped_rows(rows, max_fraction, exempt_rows=trusted)
    used: dict[str, int] = defaultdict(int)
    kept, refused = [], []
    for shard in shards:
        if shard.role == "trusted":
            kept.append(shard)
        elif used[shard.source] + len(shard.samples) <= allowed[shard.source]:
            used[shard.source] += len(shard.samples)
            kept.append(shard)
        else:
            share = rows[shard.source] / max(sum(rows.values()) + trusted, 1)
            reason = (
                f"source {shard.source} offers {share:.1%} of this cycle's rows; the cap is {max_fraction:.1%} "
                f"({allowed[shard.source]} rows)"
            )
            refused.append(refusal(shard, "limits", reason))
    return kept, refused


def quarantined_by_operator(shard: SignedShard, quarantined: Mapping[str, str]) -> ShardDecision | None:
    """The operator's refusal of a shard whose source is quarantined (`trainguard sources quarantine`); None for a
    trusted shard or another source."""
    if shard.role == "trusted" or shard.source not in quarantined:
        return None
    why = f"source {shard.source} is quarantined by the operator: {quarantined[shard.source]}"
    return refusal(shard, "operator", why)


def refusal(shard: SignedShard, check: str, reason: str) -> ShardDecision:
    """The decision that `shard` may not be trained on, by `check`."""
    return ShardDecision(
        shard=shard.key, sha256=shard.sha256, source=shard.source, accepted=False, check=check, reason=reason
    )


def accepted(shard: SignedShard, check: str, reason: str) -> ShardDecision:
    """The decision that `shard` may be trained on, after `check`."""
    return ShardDecision(
        shard=shard.key, sha256=shard.sha256, source=shard.source, accepted=True, check=check, reason=reason
    )


def concat(shards: Iterable[SignedShard]) -> Samples:
    """The samples of several shards, in order."""
    return Samples.concat([s.samples for s in shards])
