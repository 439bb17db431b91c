"""The plan every rank trains from, and the JSON that carries it to the other ranks.

Rank 0 makes the plan from its intake. The other ranks get its JSON (`TrainingPlan.message`) and rebuild it from
bytes they check themselves (`TrainingPlan.rebuilt`): each re-opens and verifies the manifests, refuses one whose
digest is not the one rank 0 verified, and reads the held-out shards through the allow-list, verify-on-read. What
a rank trains and gates on never comes from objects another process made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from trainguard.defenses.heldout import HeldoutMetrics, LabeledData
from trainguard.pipeline.config import CycleConfig
from trainguard.pipeline.errors import CycleAbortedError
from trainguard.pipeline.intake import decode_shard, manifest_refs
from trainguard.provenance.allowlist import AllowList
from trainguard.provenance.errors import ProvenanceError
from trainguard.provenance.formats import Decoder, Samples, default_decoders
from trainguard.provenance.manifest_ref import ManifestRef
from trainguard.provenance.reader import ShardReader
from trainguard.provenance.verify import VerifiedManifest, open_manifest


@dataclass(frozen=True)
class TrainingPlan:
    """What every rank trains from: the statements rank 0 verified, the allow-list of the shards it accepted, the
    held-out set and the gate's baseline, and the rows of allowed shards to skip (`dataset:name` -> rows), which
    the data module drops after each shard's verified read."""

    cycle: int
    manifests: tuple[VerifiedManifest, ...]
    allow: AllowList
    holdout: LabeledData
    previous: HeldoutMetrics | None
    columns: list[str] | None
    excluded_rows: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def message(self) -> dict[str, Any]:
        """The plan as JSON: each manifest by path and digest (the other ranks verify it again), never the verified
        objects or the held-out tensors."""
        return {
            "cycle": self.cycle,
            "manifests": [{"path": str(m.path.resolve()), "sha256": m.manifest_sha256} for m in self.manifests],
            "allow": self.allow.to_json(),
            "previous": None if self.previous is None else _metrics_json(self.previous),
            "columns": self.columns,
            "excluded_rows": {key: list(rows) for key, rows in sorted(self.excluded_rows.items())},
        }

    @classmethod
    def rebuilt(cls, config: CycleConfig, message: Any, decoders: Mapping[str, Decoder]) -> TrainingPlan:
        """The plan of rank 0's `message`, rebuilt from what this rank verifies itself (see the module); every
        refusal is one line with its check."""
        try:
            sent = PlanMessage.model_validate(message)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(map(str, first["loc"])) or "plan"
            raise CycleAbortedError(f"rank 0's plan: {where}: {first['msg']}", check="rank-message") from None
        try:
            allow = AllowList.from_json(sent.allow)
        except ProvenanceError as error:
            raise CycleAbortedError(f"rank 0's plan: {error}", check="rank-message") from None
        manifests = _reopened(config, sent.manifests)
        return cls(
            cycle=sent.cycle,
            manifests=manifests,
            allow=allow,
            holdout=_heldout(config, manifests, allow, decoders),
            previous=None if sent.previous is None else sent.previous.metrics(),
            columns=sent.columns,
            excluded_rows={key: tuple(rows) for key, rows in sent.excluded_rows.items()},
        )


Number = float | Literal["nan", "inf", "-inf"]
"""A float as the plan carries it: JSON has no NaN or infinity (a class absent from the held-out set has NaN)."""


def _number(value: float) -> Number:
    if math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"


def _metrics_json(metrics: HeldoutMetrics) -> dict[str, Any]:
    return {
        "loss": _number(metrics.loss),
        "accuracy": _number(metrics.accuracy),
        "class_loss": [_number(v) for v in metrics.class_loss],
        "class_accuracy": [_number(v) for v in metrics.class_accuracy],
    }


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SentManifest(_Strict):
    path: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class SentMetrics(_Strict):
    loss: Number
    accuracy: Number
    class_loss: list[Number]
    class_accuracy: list[Number]

    def metrics(self) -> HeldoutMetrics:
        return HeldoutMetrics(
            float(self.loss),
            float(self.accuracy),
            tuple(map(float, self.class_loss)),
            tuple(map(float, self.class_accuracy)),
        )


class PlanMessage(_Strict):
    """The plan's JSON, checked field by field before anything in it is used."""

    cycle: Annotated[int, Field(ge=1)]
    manifests: Annotated[list[SentManifest], Field(min_length=1)]
    allow: list[Any]
    previous: SentMetrics | None
    columns: list[str] | None
    excluded_rows: dict[str, list[Annotated[int, Field(ge=0)]]]


def _reopened(config: CycleConfig, sent: Sequence[SentManifest]) -> tuple[VerifiedManifest, ...]:
    """The config's manifests in rank 0's order, each opened and verified here (signatures, grants, dataset,
    expiry) and refused unless its bytes are the ones rank 0 verified; rollback was rank 0's check against the
    signed state, and the digest binds these bytes to that check."""
    refs = {ref.manifest.resolve(): ref for ref in manifest_refs(config)}
    paths = [Path(m.path) for m in sent]
    if sorted(map(str, paths)) != sorted(map(str, refs)):
        raise CycleAbortedError(
            f"rank 0's plan names the manifests {sorted(map(str, paths))}, this rank's config {sorted(map(str, refs))}",
            check="rank-plan",
        )
    return tuple(_reopen(refs[path], config, m.sha256) for path, m in zip(paths, sent, strict=True))


def _reopen(ref: ManifestRef, config: CycleConfig, sha256: str) -> VerifiedManifest:
    try:
        verified = open_manifest(ref.manifest, config.dataset.trust_of(ref), dataset=ref.dataset, data_dir=ref.data_dir)
    except ProvenanceError as error:
        raise CycleAbortedError(f"verify {ref.manifest}: {error.reason}: {error}", check="verify") from None
    if verified.manifest_sha256 != sha256:
        raise CycleAbortedError(
            f"verify {ref.manifest}: manifest-changed: sha256 {verified.manifest_sha256[:16]}... is not the "
            f"{sha256[:16]}... rank 0 verified (the manifest changed since)",
            check="verify",
        )
    return verified


def _heldout(
    config: CycleConfig, manifests: Sequence[VerifiedManifest], allow: AllowList, decoders: Mapping[str, Decoder]
) -> LabeledData:
    """The held-out set as rank 0's intake read it: the held-out manifest's role-`holdout` shards, in manifest
    order, each verified on read against the allow-list (a held-out shard that fails stops the cycle)."""
    holdout_path = config.dataset.holdout.manifest.resolve()
    verified = next(m for m in manifests if m.path.resolve() == holdout_path)
    reader = ShardReader(verified, allow=allow)
    every_decoder = default_decoders(decoders, label=config.validation.label_column)
    parts: list[Samples] = []
    try:
        for shard in verified.manifest.select(("holdout",)):
            parts.append(decode_shard(reader, shard.name, config.validation, decoders, every_decoder)[0])
    except ProvenanceError as error:
        raise CycleAbortedError(f"read {verified.path}: {error.reason}: {error}", check="verify") from None
    if not parts:
        raise CycleAbortedError(f"{verified.path}: lists no role=holdout shard", check="verify")
    samples = Samples.concat(parts)
    return LabeledData.of(samples.inputs, samples.targets, config.task.build())
