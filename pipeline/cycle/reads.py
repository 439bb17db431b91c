"""What training reads: the allow-list of the shards accepted, the data module that reads through it, and the read
log checked against it before anything is signed."""

from __future__ import annotations

from trainguard.files import atomic_write
from trainguard.pipeline.config import CycleConfig
from trainguard.pipeline.cycle.stages import _decoders
from trainguard.pipeline.cycle_report import ReadLogSection
from trainguard.pipeline.errors import CycleAbortedError
from trainguard.pipeline.intake import Intake, refusal
from trainguard.pipeline.plan import TrainingPlan
from trainguard.pipeline.running_cycle import RunningCycle
from trainguard.pipeline.training import TrainingResult
from trainguard.provenance.allowlist import AllowList
from trainguard.provenance.dataset import VerifiedDataModule
from trainguard.provenance.errors import ProvenanceError


def _training_data(config: CycleConfig, plan: TrainingPlan) -> VerifiedDataModule:
    """The data module training reads through: the plan's verified statements and allow-list, nothing else; a
    training shard changed since the intake is refused by name and training goes on without it."""
    return VerifiedDataModule.from_verified(
        plan.manifests,
        plan.allow,
        exclude_rows=plan.excluded_rows,
        feature_columns=plan.columns,
        label_column=config.validation.table_targets,
        decoders=_decoders(config),
        transform=config.data.transform.instantiate() if config.data.transform else None,
        val_transform=config.data.val_transform.instantiate() if config.data.val_transform else None,
        batch_size=config.training.batch_size,
        num_workers=config.training.num_workers,
        seed=config.training.seed,
        refuse_changed=True,
    )


def _allow_list(cycle: RunningCycle, intake: Intake) -> AllowList:
    """The shards training may read: every trusted and train shard accepted in this cycle's decisions, and the
    held-out shards it validates on, each as listed in the manifest the intake verified."""
    accepted_keys = {d.key for d in cycle.running.shards if d.accepted}
    chosen = [s for s in (*intake.trusted, *intake.train) if (s.key, s.sha256) in accepted_keys]
    return AllowList.of(s.allowed for s in (*chosen, *intake.holdout))


def _checked_read_log(cycle: RunningCycle, allow: AllowList, result: TrainingResult) -> ReadLogSection:
    """Writes what training read, then refuses the cycle unless it is exactly the allow-list less the shards
    training refused at read (`result.refused`, changed after intake), before signing."""
    path = cycle.config.output.paths.read_log(cycle.number)
    atomic_write(path, result.read_log.to_json_lines())
    try:
        allow.check_reads(result.read_log, [r.shard for r in result.refused])
    except ProvenanceError as error:
        raise CycleAbortedError(f"read log {path}: {error.reason}: {error}", check="read-log") from None
    return {"path": str(path), "sha256": result.read_log.digest(), "entries": len(result.read_log.records)}


def _refused_at_read(cycle: RunningCycle, intake: Intake, allow: AllowList, result: TrainingResult) -> AllowList:
    """Records the shards training refused at read (changed after intake) as refused by `verify`; returns the
    allow-list of what training did read, which the attestation names."""
    if not result.refused:
        return allow
    signed = {s.allowed: s for s in intake.train}
    cycle.decide(
        [refusal(signed[r.shard], "verify", f"changed after intake: {r.reason}: {r.detail}") for r in result.refused]
    )
    return AllowList.of(allow.shards - {r.shard for r in result.refused})
