"""One defended retraining cycle: verify -> validate -> cap -> screen -> train -> gate -> sign and attest.

Every decision goes into the cross-cycle state (signed with the cycle's key) as soon as it is made and into a local
JSON report before anything is sent to MLflow, so neither a crash nor an unreachable tracking server loses it.
The manifests are read once: training reads through the intake's verified statements and the allow-list of the
shards accepted, and its read log must equal that list before anything is signed. A failed check, or any other
error, stops the cycle as `failed` with a one-line reason; a rejected model leaves the last accepted one in place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from trainguard.defenses.heldout import HeldoutMetrics, LabeledData
from trainguard.files import atomic_write
from trainguard.pipeline import console
from trainguard.pipeline.attestation import (
    git_resource,
)
from trainguard.pipeline.config import CycleConfig, load_config
from trainguard.pipeline.cycle_report import report_path
from trainguard.pipeline.cycle_state import CycleState, ShardDecision, StateStore
from trainguard.pipeline.distributed import Meeting, Stopped, join, launch_from_env, share
from trainguard.pipeline.errors import CycleAbortedError, StateError, TamperedStateError
from trainguard.pipeline.holdout_split import split_holdout
from trainguard.pipeline.intake import (
    Intake,
    SignedShard,
    accepted,
    cap_sources,
    concat,
    feature_columns,
    manifest_refs,
    validate,
    verify_and_read,
)
from trainguard.pipeline.model_sign import load_verified_state_dict
from trainguard.pipeline.preflight import preflight
from trainguard.pipeline.release import release
from trainguard.pipeline.running_cycle import RunningCycle
from trainguard.pipeline.tracking import CycleTracker, DatasetRef, TrackedRun, cycle_tags
from trainguard.pipeline.training import TrainingResult, bootstrap, train
from trainguard.provenance.allowlist import AllowList
from trainguard.provenance.dataset import VerifiedDataModule
from trainguard.provenance.errors import ProvenanceError
from trainguard.provenance.formats import Decoder
from trainguard.provenance.keys import load_signing_key
from trainguard.provenance.verify import VerifiedManifest


@dataclass(frozen=True)
class CycleOutcome:
    """How a cycle ended, where its report and model are, and whether MLflow has it."""

    cycle: int
    status: str
    reason: str
    report: Path
    model_dir: Path | None
    tracking: str
    metrics: dict[str, float] = field(default_factory=dict)
    shards: tuple[ShardDecision, ...] = ()


def run_cycle(config_path: Path, *, reinit: bool = False) -> CycleOutcome:
    """Runs one cycle of the config at `config_path`; raises CycleAbortedError when a check (or anything else)
    stops it. `reinit` starts a new state where none exists beside released models, numbering after them.

    Started by a launcher (torchrun, SLURM), rank 0 runs the cycle and the other ranks only train their share."""
    config = load_config(config_path)
    launch = launch_from_env()
    if launch is not None:
        join(launch)
        if not launch.leader:
            return _follow(config)
    preflight(config)  # before the state records a running cycle: a mistake found here changes nothing
    meeting = Meeting(launch)
    try:
        return _lead(config, Path(config_path), reinit, meeting)
    except Exception as error:
        meeting.send(Stopped(" ".join(str(error).split())))  # the other ranks wait for a plan: say why none comes
        raise


def _lead(config: CycleConfig, config_path: Path, reinit: bool, meeting: Meeting) -> CycleOutcome:
    config_sha256 = hashlib.sha256(config_path.read_bytes()).hexdigest()
    try:
        key = load_signing_key(config.output.attestation_key_path)
    except ProvenanceError as error:
        raise CycleAbortedError(f"cannot load the cycle key: {error}", check="config") from None
    store = StateStore(config.output.state_path, key)
    with store.locked():
        state = store.update(_current_state(store, config.output.work_dir, reinit).begin(config_sha256))
        tracker = CycleTracker.connect(
            config.tracking.experiment_name, config.tracking.registered_model_name, config.tracking.uri
        )
        cycle = RunningCycle(config, config_path, config_sha256, store, state, tracker, {}, meeting)
        cycle.report = {"cycle": cycle.number, "config": str(config_path), "config_sha256": config_sha256}
        pl.seed_everything(config.training.seed, workers=True, verbose=False)
        with tracker.cycle(f"{config.name}-cycle-{cycle.number}", params=config.resolved()) as parent:
            try:
                return _run(cycle, parent)
            except Exception as error:  # any failure ends the cycle as `failed`, recorded, with a one-line reason
                aborted = _aborted(error)
                cycle.state = store.update(cycle.state.fail(str(aborted)))
                cycle.report.update(status="failed", reason=str(aborted), failed_check=aborted.check)
                cycle.write_report()
                parent.set_tags({"trainguard.status": "failed", "trainguard.reason": str(aborted)[:4000]})
                if aborted is error:
                    raise
                raise aborted from error


@dataclass(frozen=True)
class TrainingPlan:
    """What every rank trains from: the statements rank 0 verified, the allow-list of the shards it accepted, the
    held-out set and the gate's baseline."""

    cycle: int
    manifests: tuple[VerifiedManifest, ...]
    allow: AllowList
    holdout: LabeledData
    previous: HeldoutMetrics | None
    columns: list[str] | None


def _training_data(config: CycleConfig, plan: TrainingPlan) -> VerifiedDataModule:
    """The data module training reads through: the plan's verified statements and allow-list, nothing else."""
    return VerifiedDataModule.from_verified(
        plan.manifests,
        plan.allow,
        feature_columns=plan.columns,
        label_column=config.validation.label_column,
        decoders=_decoders(config),
        transform=config.data.transform.instantiate() if config.data.transform else None,
        val_transform=config.data.val_transform.instantiate() if config.data.val_transform else None,
        batch_size=config.training.batch_size,
        num_workers=config.training.num_workers,
        seed=config.training.seed,
    )


def _follow(config: CycleConfig) -> CycleOutcome:
    """A rank other than 0: trains its share of the plan rank 0 shares; rank 0 judges, signs and records."""
    plan = share()
    if isinstance(plan, Stopped):
        raise CycleAbortedError(f"rank 0 stopped the cycle: {plan.reason}", check="rank-0")
    pl.seed_everything(config.training.seed, workers=True, verbose=False)
    result = train(config.model.instantiate(), config, _training_data(config, plan), plan.holdout, plan.previous, None)
    return CycleOutcome(
        cycle=plan.cycle,
        status="follower",
        reason="trained its share; rank 0 judges, signs and records the cycle",
        report=report_path(config.output.work_dir, plan.cycle),
        model_dir=None,
        tracking="logged by rank 0",
        metrics=result.metrics,
    )


def _aborted(error: Exception) -> CycleAbortedError:
    """`error` as the cycle's failure: itself if it is one, else a CycleAbortedError naming what went wrong."""
    if isinstance(error, CycleAbortedError):
        return error
    check = getattr(error, "reason", None) or "internal"
    text = " ".join(str(error).split()) or type(error).__name__
    return CycleAbortedError(f"{type(error).__name__}: {text[:1000]}", check=str(check))


def _released_numbers(work_dir: Path) -> list[int]:
    """Cycle numbers that left a released model or a report in `work_dir`."""
    numbers = [int(p.name.removeprefix("cycle-")) for p in (work_dir / "models").glob("cycle-[0-9]*")]
    numbers += [int(p.stem.removeprefix("cycle-")) for p in (work_dir / "reports").glob("cycle-[0-9]*.json")]
    return numbers


def _current_state(store: StateStore, work_dir: Path, reinit: bool) -> CycleState:
    """The signed state, refused when it is older than what the cycles released (deleted or replayed); with
    `reinit`, a new state numbered after every released cycle, only where no state exists."""
    released = max(_released_numbers(work_dir), default=0)
    if reinit:
        if store.exists():
            raise StateError(f"{store.path}: --reinit starts a new state; this one exists (move it aside first)")
        return CycleState(first_cycle=released + 1)
    state = store.load()
    if released > state.last_number:
        what = "is missing" if not store.exists() else f"ends at cycle {state.last_number}"
        raise TamperedStateError(
            f"{store.path}: the cycle state {what}, but {work_dir} holds cycle {released}'s model or report "
            "(deleted or replayed state); run `trainguard cycle --reinit` to start a new state explicitly",
            path=str(store.path),
        )
    return state


def _tracking_status(tracker: CycleTracker) -> str:
    if tracker.offline:
        return f"MLflow unreachable ({tracker.offline_reason}); decisions kept in the local report and state"
    return f"logged to MLflow at {tracker.uri}"


def _run(cycle: RunningCycle, parent: TrackedRun) -> CycleOutcome:
    config = cycle.config
    with parent.stage("verification") as stage, console.stage("verifying the signed shards"):
        intake = verify_and_read(config, cycle.state.rollback_records, _decoders(config))
        state = cycle.state
        for manifest in intake.manifests:
            state = state.accept_manifest(manifest.rollback_key, manifest.manifest.version, manifest.statement_sha256)
        cycle.state = cycle.store.update(state)
        cycle.decide(intake.refused)
        _log_verification(cycle, intake, parent, stage)
    columns = feature_columns(intake.holdout[0].frame, config.validation)
    holdout = _labeled(intake.holdout)
    if not intake.trusted:
        raise CycleAbortedError(
            "no trusted training shard: sign the base set with role `trusted` by a key set the trust policy grants it",
            "verify",
        )

    with parent.stage("screening") as stage, console.stage("screening new shards (RONI)"):
        candidates = _screen_inputs(cycle, intake, stage)
        model, previous = _incoming_model(cycle, _labeled(intake.trusted), intake.holdout_sha256)
        _screen(cycle, model, holdout, candidates, stage)

    allow = _allow_list(cycle, intake)
    cycle.report["allow_list"] = allow.to_json()
    plan = TrainingPlan(cycle.number, intake.manifests, allow, holdout, previous, columns)
    cycle.meeting.send(plan)
    data = _training_data(config, plan)
    with parent.stage("training") as stage:
        result = train(model, config, data, holdout, previous, stage.lightning_logger())
        read_log = _checked_read_log(cycle, allow, result)
        cycle.step("training", result.metrics)
        cycle.report["training"] = {
            "metrics": result.metrics,
            "robust_accuracy": result.robust_accuracy,
            "read_log": read_log,
        }
    with parent.stage("gate") as stage:
        accepted_model, reason = _judge(config, result)
        stage.log_metrics({"gate/accuracy_before": result.verdict.before.accuracy})
        stage.log_metrics({"gate/accuracy_after": result.verdict.after.accuracy})
        stage.set_tags({"trainguard.gate": "accepted" if accepted_model else "rejected", "trainguard.reason": reason})
        cycle.report["gate"] = {**result.verdict.to_dict(), "accepted": accepted_model, "reason": reason}
        model_dir = release(cycle, model, intake, allow, result, parent) if accepted_model else None
        if not accepted_model:
            cycle.state = cycle.store.update(cycle.state.reject(reason))
    status = "accepted" if accepted_model else "rejected"
    cycle.report.update(
        status=status,
        reason=reason,
        model_dir=str(model_dir) if model_dir else None,
        tracking=_tracking_status(cycle.tracker),
    )
    report = cycle.write_report()  # before any upload: the local record never waits on the server
    parent.log_artifact(report, "report")
    parent.set_tags({"trainguard.status": status, "trainguard.reason": reason[:4000]})
    parent.flush()
    tracking = _tracking_status(cycle.tracker)
    if tracking != cycle.report["tracking"]:  # the uploads just now found the server gone
        cycle.report["tracking"] = tracking
        cycle.write_report()
    return CycleOutcome(
        cycle=cycle.number,
        status=status,
        reason=reason,
        report=report,
        model_dir=model_dir,
        tracking=tracking,
        metrics=result.metrics,
        shards=cycle.state.cycles[-1].shards,
    )


def _decoders(config: CycleConfig) -> dict[str, Decoder]:
    """The configured decoder of each suffix (tables need none)."""
    return {suffix: component.instantiate() for suffix, component in config.data.decoders.items()}


def _allow_list(cycle: RunningCycle, intake: Intake) -> AllowList:
    """The shards training may read: every trusted and train shard accepted in this cycle's decisions, and the
    held-out shards it validates on, each as listed in the manifest the intake verified."""
    accepted_keys = {d.key for d in cycle.state.current.shards if d.accepted}
    chosen = [s for s in (*intake.trusted, *intake.train) if (s.key, s.sha256) in accepted_keys]
    return AllowList.of(s.allowed for s in (*chosen, *intake.holdout))


def _checked_read_log(cycle: RunningCycle, allow: AllowList, result: TrainingResult) -> dict[str, Any]:
    """Writes what training read, then refuses the cycle unless it is exactly the allow-list (before signing)."""
    path = cycle.config.output.work_dir / "reads" / f"cycle-{cycle.number:04d}.jsonl"
    atomic_write(path, result.read_log.to_json_lines())
    try:
        allow.check_reads(result.read_log)
    except ProvenanceError as error:
        raise CycleAbortedError(f"read log {path}: {error.reason}: {error}", check="read-log") from None
    return {"path": str(path), "sha256": result.read_log.digest(), "entries": len(result.read_log.records)}


def _labeled(shards: Sequence[SignedShard]) -> LabeledData:
    samples = concat(shards)
    return LabeledData.of(samples.inputs, samples.targets)


def _log_verification(cycle: RunningCycle, intake: Intake, parent: TrackedRun, stage: TrackedRun) -> None:
    digests = {m.manifest.dataset: m.manifest_sha256 for m in intake.manifests}
    commit = git_resource(Path.cwd())
    tags = cycle_tags(commit.digest.get("gitCommit") if commit else None, digests, intake.signer_keyids)
    parent.set_tags(tags)
    stage.set_tags(tags)
    stage.log_metrics(
        {
            "verify/manifests": len(intake.manifests),
            "verify/shards": sum(r.shards for r in intake.reports),
            "verify/bytes": sum(r.bytes_checked for r in intake.reports),
            "verify/refused": len(intake.refused),
        }
    )
    parent.log_datasets(
        [DatasetRef(m.manifest.dataset, m.manifest_sha256, str(m.path), context="training") for m in intake.manifests]
    )
    cycle.report["verification"] = {
        "manifests": [r.to_dict() for r in intake.reports],
        "signers": list(intake.signer_keyids),
        "refused": [d.model_dump() for d in intake.refused],
    }
    cycle.step("verification")


def _screen_inputs(cycle: RunningCycle, intake: Intake, stage: TrackedRun) -> list[SignedShard]:
    """Validation and source caps; returns the shards RONI must still judge (new content, not yet decided)."""
    config = cycle.config
    trusted_keys = {s.key for s in intake.trusted}
    valid, invalid = validate([*intake.trusted, *intake.train], config.validation)
    bad = next((d for d in invalid if d.shard in trusted_keys), None)
    if bad is not None:
        raise CycleAbortedError(f"trusted shard {bad.shard} is invalid: {bad.reason}", "validate")
    kept, capped = cap_sources(valid, config.limits.max_fraction_per_source)
    cycle.decide([*invalid, *capped])
    stage.log_metrics({"validate/quarantined": len(invalid), "limits/refused": len(capped)})
    cycle.report["validation"] = [d.model_dump() for d in invalid]
    cycle.report["limits"] = [d.model_dump() for d in capped]
    new = []
    reused = []
    signers = {m.manifest_sha256: m.key_set.label for m in intake.manifests}
    for shard in kept:
        if shard.role == "trusted":
            reason = f"role trusted, granted to key set {signers[shard.manifest_sha256]} by the trust policy"
            reused.append(accepted(shard, "trusted", reason))
            continue
        earlier = cycle.state.decided(shard.key, shard.sha256)
        if earlier is not None and earlier.check == "roni":
            reused.append(earlier)
        else:
            new.append(shard)
    cycle.decide(reused)
    cycle.step("validation")
    return new


def _incoming_model(
    cycle: RunningCycle, trusted: LabeledData, holdout_sha256: str
) -> tuple[pl.LightningModule, HeldoutMetrics | None]:
    """The last accepted model (its signature checked before its weights are read), or on the first cycle a
    model fitted on the trusted data; with the held-out record to gate against, when it is comparable."""
    config = cycle.config
    model = config.model.instantiate()
    record = cycle.state.accepted_model
    if record is None:
        bootstrap(model, config, trusted)
        return model, None
    model.load_state_dict(load_verified_state_dict(Path(record.path), _public_key(config.output.model_signing_key)))
    heldout = cycle.state.heldout
    comparable = heldout is not None and heldout.metrics and heldout.manifest_sha256 == holdout_sha256
    return model, HeldoutMetrics.from_dict(heldout.metrics) if comparable else None


def _public_key(private_key: Path) -> Path:
    return private_key.with_suffix(".pub")


def _screen(
    cycle: RunningCycle,
    model: pl.LightningModule,
    holdout: LabeledData,
    shards: Sequence[SignedShard],
    stage: TrackedRun,
) -> None:
    """RONI on the new shards (per shard, or per source) and the margin check; records every decision."""
    from trainguard.defenses.margin import check_margins
    from trainguard.defenses.report import record_screening
    from trainguard.defenses.roni import Candidate, ScreeningConfig, group_by_source, screen_candidates

    config = cycle.config
    if not shards:
        cycle.report["roni"] = {"candidates": 0}
        return
    candidates = [Candidate(s.key, s.source, LabeledData.of(s.samples.inputs, s.samples.targets)) for s in shards]
    if not config.roni.enabled:
        cycle.decide([accepted(s, "roni", "RONI screening disabled in the config") for s in shards])
        return
    if config.roni.group_by_source:
        candidates = group_by_source(candidates)
    options = {"num_classes": len(config.validation.labels), **config.roni.options}
    calibration, impact_set = split_holdout(holdout, config.roni.calibration_fraction, config.training.seed)
    screening = screen_candidates(model, calibration, impact_set, candidates, ScreeningConfig(**options))
    verdict = {d.name: d for d in screening.decisions}
    decisions = []
    for shard in shards:
        decision = verdict.get(shard.key) or verdict[shard.source]
        decisions.append(
            ShardDecision(
                shard=shard.key,
                sha256=shard.sha256,
                source=shard.source,
                accepted=decision.accepted,
                check="roni",
                reason=decision.reason,
            )
        )
    cycle.decide(decisions)
    outcome = record_screening(
        screening,
        cycle.config.output.work_dir / "roni" / f"cycle-{cycle.number:04d}",
        run_id=stage.run_id,
        tracking_uri=cycle.tracker.uri,
    )
    kept = [s for s in shards if verdict.get(s.key, verdict.get(s.source)).accepted]
    margins = []
    if kept:
        rows = concat(kept)
        sources = [s.source for s in kept for _ in range(len(s.samples))]
        margins = check_margins(model, torch.as_tensor(rows.inputs, dtype=torch.float32), sources)
    flagged = [m for m in margins if m.flagged]
    stage.set_tags({f"trainguard.margin.{m.source}": m.reason[:4000] for m in flagged})
    cycle.report["roni"] = {
        **screening.to_dict(),
        "local_report": str(outcome.json_path),
        "plot": str(outcome.plot_path),
        "margin": [vars(m) for m in margins],
        "flagged_for_review": [m.source for m in flagged],
    }
    cycle.step("screening", {"roni/rejected": float(len(screening.rejected))})


def _judge(config: CycleConfig, result: TrainingResult) -> tuple[bool, str]:
    """The RONI gate's verdict, then the config's absolute floors on clean and robust held-out accuracy."""
    if not result.verdict.accepted:
        return False, result.verdict.reason
    gate = config.gate
    clean = result.verdict.after.accuracy
    if clean < gate.min_clean_accuracy:
        return False, f"held-out accuracy {clean:.4f} is below the floor {gate.min_clean_accuracy}"
    eps = gate.robust_eps if gate.robust_eps is not None else max(config.robust_eval.eps)
    robust = result.robust_accuracy.get(f"{eps:g}", float("nan"))
    if not robust >= gate.min_robust_accuracy:
        return False, f"robust accuracy {robust:.4f} at eps {eps:g} is below the floor {gate.min_robust_accuracy}"
    return True, result.verdict.reason


__all__ = ["CycleOutcome", "manifest_refs", "run_cycle"]
