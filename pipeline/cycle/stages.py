"""The cycle's stages between verification and release: validation and source caps, the row-level detectors, the
model the cycle starts from, RONI and the margin check, and the gate's verdict."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
import torch

from trainguard.defenses.heldout import HeldoutMetrics, LabeledData
from trainguard.defenses.task import Task
from trainguard.pipeline import console
from trainguard.pipeline.config import CycleConfig
from trainguard.pipeline.cycle_report import RoniSection, decision_rows, margin_rows, screening_section
from trainguard.pipeline.cycle_state import ShardDecision
from trainguard.pipeline.errors import CycleAbortedError
from trainguard.pipeline.holdout_split import split_holdout
from trainguard.pipeline.intake import Intake, SignedShard, accepted, admit, concat, quarantined_by_operator
from trainguard.pipeline.model_sign import load_verified_state_dict
from trainguard.pipeline.running_cycle import RunningCycle
from trainguard.pipeline.tracking import TrackedRun
from trainguard.pipeline.training import TrainingResult, bootstrap
from trainguard.provenance.formats import Decoder
from trainguard.provenance.keys import public_key_path

if TYPE_CHECKING:
    from trainguard.defenses.margin import SourceMargin
    from trainguard.defenses.roni import ScreeningConfig


def _decoders(config: CycleConfig) -> dict[str, Decoder]:
    """The configured decoder of each suffix (tables need none)."""
    return {suffix: component.instantiate() for suffix, component in config.data.decoders.items()}


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


def _screen_inputs(cycle: RunningCycle, intake: Intake, stage: TrackedRun) -> list[SignedShard]:
    """Validation and source caps; returns the shards RONI must still judge (new content, not yet decided)."""
    config = cycle.config
    kept, invalid, capped = admit(intake, config)
    cycle.decide([*invalid, *capped])
    stage.log_metrics({"validate/quarantined": len(invalid), "limits/refused": len(capped)})
    cycle.report["validation"] = decision_rows(invalid)
    cycle.report["limits"] = decision_rows(capped)
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
    files = write_screening(screening, cycle.config.output.paths.screening(cycle.number))
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
    roni: RoniSection = {}
    roni.update(screening_section(screening))
    roni.update(
        {
            "local_report": str(files.json_path),
            "plot": str(files.plot_path),
            "margin": margin_rows(margins) if skipped is None else skipped,
            "flagged_sources": sorted(flagged),
            "flagged_for_review": [m.source for m in for_review],
        }
    )
    cycle.report["roni"] = roni
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
