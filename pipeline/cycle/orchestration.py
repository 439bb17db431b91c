"""`run_cycle`: rank 0 leads the cycle (`_lead`, `_run`), the other ranks of a launcher follow it (`_follow`); any
failure ends the cycle as `failed`, recorded, with a one-line reason."""

from __future__ import annotations

import hashlib
import time
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl

from trainguard.pipeline import console
from trainguard.pipeline.config import CycleConfig, load_config
from trainguard.pipeline.cycle.outcome import CycleOutcome
from trainguard.pipeline.cycle.outputs import (
    DECISIONS_TABLE,
    _headline,
    _log_plots,
    _log_verification,
    _settled,
    _tracking_status,
    _write_decisions,
    _write_dvc_outputs,
)
from trainguard.pipeline.cycle.reads import _allow_list, _checked_read_log, _refused_at_read, _training_data
from trainguard.pipeline.cycle.resume import _current_state, _skipped, _unchanged_since_accepted
from trainguard.pipeline.cycle.stages import (
    _decoders,
    _detect,
    _incoming_model,
    _judge,
    _labeled,
    _screen,
    _screen_inputs,
)
from trainguard.pipeline.cycle_report import (
    DataRoots,
    TrainingSection,
    accepted_tree,
    allowed_tree,
    data_section,
    gate_section,
)
from trainguard.pipeline.distributed import Meeting, Stopped, follow, join, launch_from_env
from trainguard.pipeline.errors import CycleAbortedError
from trainguard.pipeline.intake import feature_columns, verify_and_read
from trainguard.pipeline.plan import TrainingPlan
from trainguard.pipeline.preflight import preflight
from trainguard.pipeline.release import release
from trainguard.pipeline.running_cycle import RunningCycle
from trainguard.pipeline.source_lines import source_lines
from trainguard.pipeline.state_log import StateStore
from trainguard.pipeline.tracking import CycleTracker, TrackedRun
from trainguard.pipeline.training import train
from trainguard.provenance.allowlist import AllowList
from trainguard.provenance.errors import ProvenanceError
from trainguard.provenance.keys import load_signing_key


def run_cycle(
    config_path: Path, *, reinit: bool = False, force: bool = False, wait_for_mlflow: bool = True
) -> CycleOutcome:
    """Runs one cycle of the config at `config_path`; raises CycleAbortedError when a check (or anything else)
    stops it. `reinit` starts a new state where none exists beside released models, numbering after them. A cycle
    with nothing new (the config and the manifests' digests of the last accepted cycle) is `skipped` unless `force`.

    Started by a launcher (torchrun, SLURM), rank 0 runs the cycle and the other ranks only train their share.

    Args:
        config_path: The cycle's YAML config.
        reinit: Whether a new signed state is rebuilt from the signed log and receipts where the state is lost.
        force: Whether a cycle with nothing new still runs.
        wait_for_mlflow: Whether it returns only once MLflow has everything; if not, it returns once the decision is
            recorded locally and the uploads finish in the background (`tracking.wait_for_uploads`, and before the
            process exits), as the `trainguard cycle` command runs it.

    Returns:
        How the cycle ended (`status`: accepted, rejected, skipped, or follower on a rank other than 0), its
        report, its model folder and its metrics.

    Raises:
        ConfigError: The config is invalid, or a file it names does not exist.
        PreflightError: An up-front check failed; nothing was changed.
        StateError: The cycle's signed state is unreadable, tampered with, stale or another pipeline's.
        CycleAbortedError: A check (or anything else) stopped the cycle after it began; the failure is recorded.

    Example::

        from pathlib import Path
        from trainguard import run_cycle

        outcome = run_cycle(Path("configs/digits.yaml"))
        print(outcome.status, outcome.reason, outcome.model_dir)
    """
    config = load_config(config_path)
    launch = launch_from_env()
    if launch is not None:
        join(launch, timedelta(seconds=config.training.rank_timeout))
        if not launch.leader:
            return _follow(config)
    preflight(config)  # before the state records a running cycle: a mistake found here changes nothing
    meeting = Meeting(launch)
    try:
        return _lead(config, Path(config_path), reinit, force, meeting, wait_for_mlflow)
    except Exception as error:
        meeting.send(Stopped(" ".join(str(error).split())))  # the other ranks wait for a plan: say why none comes
        raise


def _lead(
    config: CycleConfig, config_path: Path, reinit: bool, force: bool, meeting: Meeting, wait_for_mlflow: bool
) -> CycleOutcome:
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
            config.tracking.experiment_name,
            config.tracking.registered_model_name,
            config.tracking.uri,
            wait_at_end=wait_for_mlflow,
        )
        cycle = RunningCycle(config, config_path, config_sha256, store, state, tracker, meeting)
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
                outcome = _run(cycle, parent)
            except Exception as error:  # any failure ends the cycle as `failed`, recorded, with a one-line reason
                aborted = _aborted(error)
                cycle.state = store.update(cycle.state.fail(str(aborted)))
                cycle.report.update({"status": "failed", "reason": str(aborted), "failed_check": aborted.check})
                cycle.write_report()
                parent.finish("failed", str(aborted), name=f"{run_name}-failed")
                if aborted is error:
                    raise
                raise aborted from error
        return _settled(cycle, parent, outcome)


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
        report=config.output.paths.report(plan.cycle),
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
    manifests = [(m.manifest.dataset, m.manifest_sha256) for m in intake.manifests]
    cycle.report["data"] = data_section(config.output.work_dir, cycle.number, manifests, allow)
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
        roots = _data_roots(cycle, allow, trained)
        cycle.step("training", result.metrics)
        training_section: TrainingSection = {
            "adversarial": result.adversarial,
            "metrics": result.metrics,
            "robust_accuracy": result.robust_accuracy,
            "read_log": read_log,
            "excluded_rows": {key: list(rows) for key, rows in sorted(plan.excluded_rows.items())},
        }
        if result.gradient_masking is not None:
            training_section["gradient_masking"] = result.gradient_masking
        if result.robust_cost is not None:
            training_section["robust_cost"] = result.robust_cost
        cycle.report["training"] = training_section
    with parent.stage("gate") as stage:
        accepted_model, reason = _judge(config, result)
        stage.log_metrics({"gate/accuracy_before": result.verdict.before.accuracy})
        stage.log_metrics({"gate/accuracy_after": result.verdict.after.accuracy})
        stage.set_tags({"trainguard.gate": "accepted" if accepted_model else "rejected", "trainguard.reason": reason})
        cycle.report["gate"] = gate_section(result.verdict, accepted_model, reason)
        example = holdout.x[:5].numpy()
        model_dir = release(cycle, model, intake, roots, result, parent, example) if accepted_model else None
        if not accepted_model:
            cycle.state = cycle.store.update(cycle.state.reject(reason))
    status = "accepted" if accepted_model else "rejected"
    headline = _headline(cycle, result, screening_seconds, status)
    lines = source_lines(cycle.record.shards, cycle.report)
    cycle.report.update(
        {
            "source_lines": list(lines),
            "status": status,
            "reason": reason,
            "metrics": headline,
            "model_dir": str(model_dir) if model_dir else None,
            "tracking": _tracking_status(cycle.tracker),
        }
    )
    decisions = _write_decisions(cycle, roots.accepted)
    report = cycle.write_report()  # before any upload: the local record never waits on the server
    rows = _write_dvc_outputs(cycle, result, headline)
    parent.log_metrics(headline, step=cycle.number)
    if decisions is not None:
        parent.log_table_file(decisions, DECISIONS_TABLE)
    _log_plots(parent, rows, prior, cycle.number)
    parent.log_artifact(report, "report")
    parent.finish(status, reason)
    return CycleOutcome(
        cycle=cycle.number,
        status=status,
        reason=reason,
        report=report,
        model_dir=model_dir,
        tracking=cycle.report["tracking"],
        metrics=result.metrics,
        shards=cycle.state.cycles[-1].shards,
        sources=lines,
    )


def _data_roots(cycle: RunningCycle, allow: AllowList, trained: AllowList) -> DataRoots:
    """The Merkle roots of what training read and of the shards accepted, once the cycle's decisions are final (after
    training): the attestation and the report's data section both name them. The allow-list's root is the data
    section's when training read all of it."""
    planned = cycle.report["data"]["allowed"]
    allowed = planned if trained.shards == allow.shards else allowed_tree(trained)
    return DataRoots(allowed=allowed, accepted=accepted_tree(cycle.running.shards))


def _counted(count: int, thing: str) -> str:
    return f"{count} {thing}{'' if count == 1 else 's'}"
