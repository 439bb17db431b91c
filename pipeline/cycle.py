"""One defended retraining cycle: verify -> validate -> cap -> detect -> screen -> train -> gate -> sign and attest.

Every decision goes into the cross-cycle state (signed with the cycle's key) as soon as it is made and into a local
JSON report before anything is sent to MLflow, so neither a crash nor an unreachable tracking server loses it.
The manifests are read once: training reads through the intake's verified statements and the allow-list of the
shards accepted, and its read log must equal that list before anything is signed. A failed check, or any other
error, stops the cycle as `failed` with a one-line reason; a rejected model leaves the last accepted one in place.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch

from trainguard.defenses.heldout import HeldoutMetrics, LabeledData
from trainguard.defenses.task import Task
from trainguard.files import atomic_write
from trainguard.pipeline import console, plots
from trainguard.pipeline.attestation import git_resource
from trainguard.pipeline.config import CycleConfig, load_config
from trainguard.pipeline.cycle_report import refusals, report_path
from trainguard.pipeline.cycle_state import CycleRecord, CycleState, HeldoutRecord, ShardDecision
from trainguard.pipeline.distributed import Meeting, Stopped, follow, join, launch_from_env
from trainguard.pipeline.errors import CycleAbortedError
from trainguard.pipeline.holdout_split import split_holdout
from trainguard.pipeline.intake import (
    Intake,
    SignedShard,
    accepted,
    admit,
    concat,
    feature_columns,
    manifest_refs,
    quarantined_by_operator,
    refusal,
    verify_and_read,
)
from trainguard.pipeline.model_sign import file_sha256, load_verified_state_dict
from trainguard.pipeline.plan import TrainingPlan
from trainguard.pipeline.preflight import preflight
from trainguard.pipeline.receipts import check_fresh, rebuild_state
from trainguard.pipeline.release import release
from trainguard.pipeline.running_cycle import RunningCycle
from trainguard.pipeline.source_lines import source_lines
from trainguard.pipeline.state_log import StateStore
from trainguard.pipeline.tracking import CycleTracker, TrackedRun, cycle_tags
from trainguard.pipeline.training import TrainingResult, bootstrap, train
from trainguard.provenance.allowlist import AllowList
from trainguard.provenance.dataset import VerifiedDataModule
from trainguard.provenance.errors import ProvenanceError
from trainguard.provenance.formats import Decoder
from trainguard.provenance.keys import load_signing_key, public_key_path

if TYPE_CHECKING:
    from trainguard.defenses.margin import SourceMargin
    from trainguard.defenses.roni import ScreeningConfig

CHECKS = ("verify", "validate", "limits", "roni")
"""The checks that refuse shards, each with a `shards/refused_<check>` metric even when it refused none (stable
columns for `dvc exp show`); a check not listed here gets its metric when it refuses something."""
DECISIONS_TABLE = "shards/decisions.json"
METRICS_FILE = "metrics.json"
"""The latest cycle's headline numbers, numbers only (DVC's metrics file, tracked by git so experiments compare)."""


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
    sources: tuple[str, ...] = ()
    """One line per source that lost shards or rows (`source_lines`), what the console prints."""


def run_cycle(config_path: Path, *, reinit: bool = False, force: bool = False) -> CycleOutcome:
    """Runs one cycle of the config at `config_path`; raises CycleAbortedError when a check (or anything else)
    stops it. `reinit` starts a new state where none exists beside released models, numbering after them. A cycle
    with nothing new (the config and the manifests' digests of the last accepted cycle) is `skipped` unless `force`.

    Started by a launcher (torchrun, SLURM), rank 0 runs the cycle and the other ranks only train their share."""
    config = load_config(config_path)
    launch = launch_from_env()
    if launch is not None:
        join(launch, timedelta(seconds=config.training.rank_timeout))
        if not launch.leader:
            return _follow(config)
    preflight(config)  # before the state records a running cycle: a mistake found here changes nothing
    meeting = Meeting(launch)
    try:
        return _lead(config, Path(config_path), reinit, force, meeting)
    except Exception as error:
        meeting.send(Stopped(" ".join(str(error).split())))  # the other ranks wait for a plan: say why none comes
        raise


def _lead(config: CycleConfig, config_path: Path, reinit: bool, force: bool, meeting: Meeting) -> CycleOutcome:
    config_sha256 = hashlib.sha256(config_path.read_bytes()).hexdigest()
    try:
        key = load_signing_key(config.output.attestation_key_path)
    except ProvenanceError as error:
        raise CycleAbortedError(f"cannot load the cycle key: {error}", check="config") from None
    store = StateStore(config.output.state_path, key, config.pipeline_identity)
    with store.locked():
        current = _current_state(store, config.output.work_dir, reinit)
        unchanged = None if force else _unchanged_since_accepted(config, config_sha256, current)
        if unchanged is not None:
            meeting.send(Stopped(f"nothing new since cycle {unchanged.cycle}"))
            return _skipped(config, unchanged)
        state = store.update(current.begin(config_sha256))
        tracker = CycleTracker.connect(
            config.tracking.experiment_name, config.tracking.registered_model_name, config.tracking.uri
        )
        cycle = RunningCycle(config, config_path, config_sha256, store, state, tracker, {}, meeting)
        cycle.report = {
            "cycle": cycle.number,
            "config": str(config_path),
            "config_sha256": config_sha256,
            "task": {"kind": config.task.kind, "accuracy_is": config.task.build().metric_name},
        }
        pl.seed_everything(config.training.seed, workers=True, verbose=False)
        run_name = f"{config.name}-cycle-{cycle.number}"
        with tracker.cycle(run_name, params=config.resolved()) as parent:
            try:
                return _run(cycle, parent)
            except Exception as error:  # any failure ends the cycle as `failed`, recorded, with a one-line reason
                aborted = _aborted(error)
                cycle.state = store.update(cycle.state.fail(str(aborted)))
                cycle.report.update(status="failed", reason=str(aborted), failed_check=aborted.check)
                cycle.write_report()
                parent.finish("failed", str(aborted), name=f"{run_name}-failed")
                if aborted is error:
                    raise
                raise aborted from error


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


def _follow(config: CycleConfig) -> CycleOutcome:
    """A rank other than 0: trains its share of the plan rank 0 shares, rebuilt from the manifests and held-out
    shards this rank verifies itself; rank 0 judges, signs and records."""
    plan = follow(lambda message: TrainingPlan.rebuilt(config, message, _decoders(config)))
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


def _current_state(store: StateStore, work_dir: Path, reinit: bool) -> CycleState:
    """The signed state, checked (`StateStore.load`) and refused when a signed receipt beside it shows it is not
    the newest link of its history; with `reinit`, a new history rebuilt from the signed log and receipts, only
    where the state is lost (missing, stale, foreign or unreadable)."""
    if reinit:
        state, carried = rebuild_state(store, work_dir)
        console.note(carried)
        return state
    state = store.load()
    check_fresh(state, store.link, work_dir, store.key)
    return state


def _unchanged_since_accepted(config: CycleConfig, config_sha256: str, state: CycleState) -> CycleRecord | None:
    """The last accepted cycle when it ran this config on the manifests now in place (same sha256 each), else None."""
    if state.current is not None:
        return None
    last = next((c for c in reversed(state.cycles) if c.status == "accepted"), None)
    if last is None or last.config_sha256 != config_sha256 or not last.manifests:
        return None
    paths = [ref.manifest.resolve() for ref in manifest_refs(config)]
    if not all(path.is_file() for path in paths):
        return None
    return last if {str(path): file_sha256(path) for path in paths} == last.manifests else None


def _skipped(config: CycleConfig, last: CycleRecord) -> CycleOutcome:
    """The outcome of a cycle with nothing new: no state change, no run, the accepted model stays."""
    return CycleOutcome(
        cycle=last.cycle,
        status="skipped",
        reason=f"nothing new since cycle {last.cycle} (same config and manifests); `--force` retrains",
        report=config.output.work_dir / "reports" / f"cycle-{last.cycle:04d}.json",
        model_dir=Path(last.candidate.path) if last.candidate else None,
        tracking="nothing logged",
        metrics=dict(last.metrics),
    )


def _tracking_status(tracker: CycleTracker) -> str:
    if tracker.offline:
        return f"MLflow unreachable ({tracker.offline_reason}); decisions kept in the local report and state"
    return f"logged to MLflow at {tracker.uri}"


def _run(cycle: RunningCycle, parent: TrackedRun) -> CycleOutcome:
    config = cycle.config
    prior = cycle.state.heldout  # the last accepted model's held-out record, for the plots
    with parent.stage("verification") as stage, console.stage("verifying the signed shards"):
        intake = verify_and_read(config, cycle.state.rollback_records, _decoders(config))
        state = cycle.state
        for manifest in intake.manifests:
            version, statement = manifest.manifest.version, manifest.statement_sha256
            state = state.accept_manifest(manifest.rollback_key, version, statement, manifest.key_set.keyids)
        digests = {str(m.path.resolve()): m.manifest_sha256 for m in intake.manifests}
        cycle.state = cycle.store.update(state.read_manifests(digests))
        cycle.decide(intake.refused)
        _log_verification(cycle, intake, parent, stage)
    columns = feature_columns(intake.holdout[0].frame, config.validation)
    task = config.task.build()
    holdout = _labeled(intake.holdout, task)

    with parent.stage("screening") as stage:
        candidates = _screen_inputs(cycle, intake, stage)
        model, previous = _incoming_model(cycle, _labeled(intake.trusted, task), intake.holdout_sha256)
        label = f"screening {_counted(len(candidates), 'new shard')} (detectors, RONI)"
        with console.stage(label, counting="copies fine-tuned") as progress:
            candidates, excluded_rows, evidence = _detect(cycle, model, intake, candidates, stage)
            started = time.monotonic()
            offered = [s.sha256 for s in intake.train]
            _screen(cycle, model, holdout, candidates, evidence, stage, offered=offered, progress=progress)
            screening_seconds = time.monotonic() - started

    allow = _allow_list(cycle, intake)
    cycle.report["allow_list"] = allow.to_json()
    allowed = {s.key for s in (*intake.trusted, *intake.train) if s.allowed in allow.shards}
    excluded_rows = {key: rows for key, rows in excluded_rows.items() if key in allowed}
    from trainguard.pipeline.detection import copied_rows, merged_rows

    copies = copied_rows([s for s in (*intake.trusted, *intake.train) if s.key in allowed], cycle.state)
    cycle.report["copied_rows"] = {key: list(rows) for key, rows in copies.items()}
    excluded_rows = merged_rows(excluded_rows, copies)
    plan = TrainingPlan(cycle.number, intake.manifests, allow, holdout, previous, columns, excluded_rows)
    cycle.meeting.send(plan)
    data = _training_data(config, plan)
    training = f"training on {_counted(len(allowed), 'shard')}"
    with parent.stage("training") as stage, console.stage(training, display=False):
        result = train(model, config, data, holdout, previous, stage.lightning_logger())
        read_log = _checked_read_log(cycle, allow, result)
        trained = _refused_at_read(cycle, intake, allow, result)
        cycle.step("training", result.metrics)
        cycle.report["training"] = {
            "adversarial": result.adversarial,
            "metrics": result.metrics,
            "robust_accuracy": result.robust_accuracy,
            **({"gradient_masking": result.gradient_masking} if result.gradient_masking is not None else {}),
            **({"robust_cost": result.robust_cost} if result.robust_cost is not None else {}),
            "read_log": read_log,
            "excluded_rows": {key: list(rows) for key, rows in sorted(plan.excluded_rows.items())},
        }
    with parent.stage("gate") as stage:
        accepted_model, reason = _judge(config, result)
        stage.log_metrics({"gate/accuracy_before": result.verdict.before.accuracy})
        stage.log_metrics({"gate/accuracy_after": result.verdict.after.accuracy})
        stage.set_tags({"trainguard.gate": "accepted" if accepted_model else "rejected", "trainguard.reason": reason})
        cycle.report["gate"] = {**result.verdict.to_dict(), "accepted": accepted_model, "reason": reason}
        example = holdout.x[:5].numpy()
        model_dir = release(cycle, model, intake, trained, result, parent, example) if accepted_model else None
        if not accepted_model:
            cycle.state = cycle.store.update(cycle.state.reject(reason))
    status = "accepted" if accepted_model else "rejected"
    headline = _headline(cycle, result, screening_seconds, status)
    lines = source_lines(cycle.record.shards, cycle.report)
    cycle.report.update(
        source_lines=list(lines),
        status=status,
        reason=reason,
        metrics=headline,
        model_dir=str(model_dir) if model_dir else None,
        tracking=_tracking_status(cycle.tracker),
    )
    report = cycle.write_report()  # before any upload: the local record never waits on the server
    rows = _write_dvc_outputs(cycle, result, headline)
    parent.log_metrics(headline, step=cycle.number)
    parent.log_table(_decision_table(cycle.record.shards), DECISIONS_TABLE)
    _log_plots(parent, rows, prior, cycle.number)
    parent.log_artifact(report, "report")
    parent.finish(status, reason)
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
        sources=lines,
    )


def _decoders(config: CycleConfig) -> dict[str, Decoder]:
    """The configured decoder of each suffix (tables need none)."""
    return {suffix: component.instantiate() for suffix, component in config.data.decoders.items()}


def _allow_list(cycle: RunningCycle, intake: Intake) -> AllowList:
    """The shards training may read: every trusted and train shard accepted in this cycle's decisions, and the
    held-out shards it validates on, each as listed in the manifest the intake verified."""
    accepted_keys = {d.key for d in cycle.running.shards if d.accepted}
    chosen = [s for s in (*intake.trusted, *intake.train) if (s.key, s.sha256) in accepted_keys]
    return AllowList.of(s.allowed for s in (*chosen, *intake.holdout))


def _checked_read_log(cycle: RunningCycle, allow: AllowList, result: TrainingResult) -> dict[str, Any]:
    """Writes what training read, then refuses the cycle unless it is exactly the allow-list less the shards
    training refused at read (`result.refused`, changed after intake), before signing."""
    path = cycle.config.output.work_dir / "reads" / f"cycle-{cycle.number:04d}.jsonl"
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


def _labeled(shards: Sequence[SignedShard], task: Task) -> LabeledData:
    """The shards' samples as tensors for `task`; real-valued targets are refused under a classification task,
    never cast to labels."""
    real = [s for s in shards if s.samples.targets.dtype.kind not in "iu"]
    if task.kind == "classification" and real:
        raise CycleAbortedError(
            f"shard {real[0].key}: targets are {real[0].samples.targets.dtype}; a classification task needs integer "
            "class labels (set task: regression or multilabel for real-valued targets)",
            "validate",
        )
    samples = concat(shards)
    return LabeledData.of(samples.inputs, samples.targets, task)


def _headline(cycle: RunningCycle, result: TrainingResult, screening_seconds: float, status: str) -> dict[str, float]:
    """The cycle's numbers, named alike in MLflow, the JSON report and DVC's metrics file: clean and robust
    held-out accuracy, shards offered, accepted and refused by check, and the screening's error level and time."""
    shards = cycle.record.shards
    refused = refusals(shards)
    metrics = {
        "cycle/number": float(cycle.number),
        "cycle/accepted": float(status == "accepted"),
        "val/acc": result.verdict.after.accuracy,
        "gate/accuracy_before": result.verdict.before.accuracy,
        **{f"{plots.ROBUST_PREFIX}{eps}": acc for eps, acc in result.robust_accuracy.items()},
        "shards/offered": float(len(shards)),
        "shards/accepted": float(len(shards) - sum(refused.values())),
        "shards/refused": float(sum(refused.values())),
        **{f"shards/refused_{check}": float(refused.get(check, 0)) for check in (*CHECKS, *refused)},
        "roni/seconds": screening_seconds,
    }
    if result.gradient_masking is not None:
        metrics["val/gradient_masking"] = float(bool(result.gradient_masking["flagged"]))
    if cycle.config.roni.enabled:
        metrics["roni/level"] = cycle.config.roni.level
    return {name: value for name, value in metrics.items() if value == value}  # NaN (not measured) left out


def _decision_table(shards: Sequence[ShardDecision]) -> dict[str, list[Any]]:
    """Every shard decision of the cycle, one column per ShardDecision field."""
    columns = list(ShardDecision.model_fields)
    rows = [d.model_dump(mode="json") for d in shards]
    return {column: [row[column] for row in rows] for column in columns}


def _write_dvc_outputs(cycle: RunningCycle, result: TrainingResult, headline: dict[str, float]) -> dict[str, list[Any]]:
    """Writes DVC's metrics file and the cycle's plot data (`plots/<name>.json`); returns the plot rows by name."""
    work_dir = cycle.config.output.work_dir
    atomic_write(work_dir / METRICS_FILE, (json.dumps(headline, indent=2, sort_keys=True) + "\n").encode())
    rows = {
        "robust_accuracy": plots.robust_rows(result.robust_accuracy),
        "gate_classes": plots.gate_rows(result.verdict.before, result.verdict.after),
        "cycles": plots.cycle_rows(cycle.state.cycles),
    }
    for name, data in rows.items():
        atomic_write(work_dir / "plots" / f"{name}.json", (json.dumps(data, indent=1) + "\n").encode())
    return rows


def _log_plots(parent: TrackedRun, rows: dict[str, list[Any]], prior: HeldoutRecord | None, number: int) -> None:
    """The same plots as figures in MLflow (`plots/<name>.png`), drawn only when there is a run to log them to."""
    if not parent.active:
        return
    import matplotlib.pyplot as plt

    last = plots.robust_rows(prior.robust_accuracy) if prior is not None else []
    figures = {
        "robust_accuracy": plots.robust_figure(rows["robust_accuracy"], last, number),
        "gate_classes": plots.gate_figure(rows["gate_classes"]),
        "cycles": plots.cycles_figure(rows["cycles"]),
    }
    for name, figure in figures.items():
        parent.log_figure(figure, f"plots/{name}.png")
        plt.close(figure)


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
    parent.log_datasets(intake.reports, context="training")
    cycle.report["verification"] = {
        "manifests": [r.to_dict() for r in intake.reports],
        "signers": list(intake.signer_keyids),
        "refused": [d.model_dump() for d in intake.refused],
    }
    cycle.step("verification")


def _screen_inputs(cycle: RunningCycle, intake: Intake, stage: TrackedRun) -> list[SignedShard]:
    """Validation and source caps; returns the shards RONI must still judge (new content, not yet decided)."""
    config = cycle.config
    kept, invalid, capped = admit(intake, config)
    cycle.decide([*invalid, *capped])
    stage.log_metrics({"validate/quarantined": len(invalid), "limits/refused": len(capped)})
    cycle.report["validation"] = [d.model_dump() for d in invalid]
    cycle.report["limits"] = [d.model_dump() for d in capped]
    new = []
    reused = []
    signers = {m.manifest_sha256: m.key_set.label for m in intake.manifests}
    quarantined = cycle.state.quarantined
    for shard in kept:
        if shard.role == "trusted":
            reason = f"role trusted, granted to key set {signers[shard.manifest_sha256]} by the trust policy"
            reused.append(accepted(shard, "trusted", reason))
            continue
        operator = quarantined_by_operator(shard, quarantined)
        if operator is not None:
            reused.append(operator)
            continue
        earlier = cycle.state.decided(shard.key, shard.sha256)
        if earlier is not None and earlier.check == "roni":
            reused.append(earlier)
        else:
            new.append(shard)
    cycle.decide(reused)
    cycle.step("validation")
    return new


def _detect(
    cycle: RunningCycle, model: pl.LightningModule, intake: Intake, new: Sequence[SignedShard], stage: TrackedRun
) -> tuple[list[SignedShard], dict[str, tuple[int, ...]], Mapping[str, tuple[float, ...]]]:
    """The row-level detectors on every contributed shard still in play (accepted before, or new); returns the new
    shards left for RONI, the rows to quarantine (`dataset:name` -> rows) and per source the detectors' p-values
    RONI's source test combines with its own."""
    section = cycle.config.detectors
    if not cycle.config.detectors_on:
        cycle.report["detection"] = {"enabled": False}
        return list(new), {}, {}
    from trainguard.pipeline.detection import run_detection

    before = {d.key for d in cycle.running.shards if d.accepted}
    pool = [*(s for s in intake.train if (s.key, s.sha256) in before), *new]
    outcome = run_detection(section, model, intake.holdout, pool, stage)
    cycle.decide(outcome.rejected)
    cycle.report["detection"] = outcome.report
    cycle.step("detection", outcome.metrics)
    refused = {d.key for d in outcome.rejected}
    return [s for s in new if (s.key, s.sha256) not in refused], dict(outcome.excluded_rows), outcome.evidence


def _incoming_model(
    cycle: RunningCycle, trusted: LabeledData, holdout_sha256: str
) -> tuple[pl.LightningModule, HeldoutMetrics | None]:
    """The last accepted model (its signature checked before its weights are read), or on the first cycle a
    model fitted on the trusted data; with the held-out record to gate against, when it is comparable."""
    config = cycle.config
    model = config.model.instantiate()
    record = cycle.state.accepted_model
    if record is None:
        with console.stage(f"fitting the first model on {len(trusted)} trusted rows", display=False):
            bootstrap(model, config, trusted)
        return model, None
    key = public_key_path(config.output.model_signing_key)
    model.load_state_dict(load_verified_state_dict(Path(record.path), key, expected_sha256=record.sha256))
    heldout = cycle.state.heldout
    if heldout is not None and heldout.metrics and heldout.manifest_sha256 == holdout_sha256:
        return model, HeldoutMetrics.from_dict(heldout.metrics)
    return model, None


def _screen(
    cycle: RunningCycle,
    model: pl.LightningModule,
    holdout: LabeledData,
    shards: Sequence[SignedShard],
    detected: Mapping[str, tuple[float, ...]],
    stage: TrackedRun,
    offered: Sequence[str],
    progress: console.Progress,
) -> None:
    """RONI on the new shards, per shard and per source (with the sources' evidence from earlier cycles and the
    detectors' p-values of this cycle), and the margin check; records every decision and each shard's p-value as
    its source's evidence. A flagged source loses every shard this cycle, earlier-accepted ones included."""
    from trainguard.defenses.margin import check_margins
    from trainguard.defenses.report import write_screening
    from trainguard.defenses.roni import Candidate, screen_candidates

    config = cycle.config
    if not shards:
        cycle.report["roni"] = {"candidates": 0}
        return
    task, forward = config.task.build(), config.forward_hook()
    candidates = [Candidate(s.key, s.source, LabeledData.of(s.samples.inputs, s.samples.targets, task)) for s in shards]
    settings = screening_config(config)
    if settings is None:
        cycle.decide([accepted(s, "roni", "RONI screening disabled in the config") for s in shards])
        return
    calibration, impact_set = roni_holdout(config, holdout)
    history = cycle.state.earlier_evidence(s.sha256 for s in shards)
    screening = screen_candidates(
        model,
        calibration,
        impact_set,
        candidates,
        settings,
        history=history,
        evidence=detected,
        task=task,
        forward=forward,
        progress=progress,
    )
    if screening.scope == "full" and config.roni.options.get("scope", "auto") == "auto":
        console.note(
            "RONI fine-tuned every parameter: no nn.Linear head gives the model's output (or it takes extra "
            "inputs); name its head's first module as roni.options.feature_layer for a faster screening"
        )
    verdict = {d.name: d for d in screening.decisions}
    flagged = {s.source: s for s in screening.flagged}
    decisions = [
        ShardDecision(
            shard=shard.key,
            sha256=shard.sha256,
            source=shard.source,
            accepted=verdict[shard.key].accepted,
            check="roni",
            reason=verdict[shard.key].reason,
        )
        for shard in shards
    ]
    earlier = [
        d.model_copy(update={"accepted": False, "check": "roni", "reason": flagged[d.source].reason})
        for d in cycle.running.shards
        if d.accepted and d.source in flagged and d.check == "roni"
    ]
    cycle.decide([*decisions, *earlier])
    evidence = [(s.source, s.sha256, verdict[s.key].p_value) for s in shards]
    cycle.state = cycle.store.update(cycle.state.record_evidence(evidence, offered))
    files = write_screening(screening, cycle.config.output.work_dir / "roni" / f"cycle-{cycle.number:04d}")
    stage.log_screening(screening, files)
    kept = [s for s in shards if verdict[s.key].accepted]
    margins: Sequence[SourceMargin] = ()
    skipped = _margin_skipped(config)
    if kept and skipped is None:
        rows = concat(kept)
        sources = [s.source for s in kept for _ in range(len(s.samples))]
        margins = check_margins(model, torch.as_tensor(rows.inputs, dtype=torch.float32), sources, task=task)
    for_review = [m for m in margins if m.flagged]
    stage.set_tags({f"trainguard.margin.{m.source}": m.reason[:4000] for m in for_review})
    cycle.report["roni"] = {
        **screening.to_dict(),
        "local_report": str(files.json_path),
        "plot": str(files.plot_path),
        "margin": [vars(m) for m in margins] if skipped is None else skipped,
        "flagged_sources": sorted(flagged),
        "flagged_for_review": [m.source for m in for_review],
    }
    cycle.step(
        "screening",
        {"roni/rejected": float(len(screening.rejected)), "roni/flagged_sources": float(len(flagged))},
    )


def screening_config(config: CycleConfig) -> ScreeningConfig | None:
    """RONI's settings from the roni section (its options, error-rate knobs and the task's class count); None when
    screening is disabled."""
    from trainguard.defenses.roni import ScreeningConfig

    if not config.roni.enabled:
        return None
    classes = {"num_classes": len(config.validation.labels)} if config.task.kind == "classification" else {}
    return ScreeningConfig(**{**classes, **config.roni.screening_options()})


def roni_holdout(config: CycleConfig, holdout: LabeledData) -> tuple[LabeledData, LabeledData]:
    """The held-out rows RONI calibrates on (`roni.calibration_fraction` of them) and those it measures impacts on."""
    return split_holdout(holdout, config.roni.calibration_fraction, config.training.seed)


def _counted(count: int, thing: str) -> str:
    return f"{count} {thing}{'' if count == 1 else 's'}"


def _margin_skipped(config: CycleConfig) -> str | None:
    """Why the margin check does not run for this config (None: it runs): it reads class probabilities of the model
    on its inputs alone."""
    if config.task.kind != "classification":
        return f"skipped: the margin check needs class probabilities; task {config.task.kind} has none"
    if config.model_forward is not None:
        return "skipped: the margin check calls the model on its inputs alone; model_forward names extra inputs"
    return None


def _judge(config: CycleConfig, result: TrainingResult) -> tuple[bool, str]:
    """The model gate's verdict, then the config's absolute floors on clean and robust held-out accuracy."""
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
