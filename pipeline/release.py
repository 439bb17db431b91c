"""Releasing an accepted model: signed (OpenSSF model signing) with its SLSA attestation, recorded as the model the
next cycle starts from, and registered in MLflow as the `champion`, with a description of its cycle, data and
checks; the model's own code is signed with it. A released model directory is never overwritten."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from trainguard.pipeline.attestation import (
    CycleFacts,
    Resource,
    attestor,
    dvc_resource,
    file_resource,
    git_resource,
    read_log_resource,
)
from trainguard.pipeline.config import CycleConfig
from trainguard.pipeline.cycle_report import DataRoots, refusals
from trainguard.pipeline.cycle_state import HeldoutRecord, ModelRecord, utc_now
from trainguard.pipeline.errors import CycleAbortedError
from trainguard.pipeline.intake import Intake
from trainguard.pipeline.model_code import find_model_code, model_imports
from trainguard.pipeline.model_sign import write_signed_model
from trainguard.pipeline.running_cycle import RunningCycle
from trainguard.pipeline.tracking import ModelRelease, TrackedRun
from trainguard.pipeline.training import TrainingResult
from trainguard.provenance.keys import public_key_path


def release(
    cycle: RunningCycle,
    model: pl.LightningModule,
    intake: Intake,
    roots: DataRoots,
    result: TrainingResult,
    parent: TrackedRun,
    example: Any,
) -> Path:
    """Signs the accepted model with its SLSA attestation, makes it the model the next cycle starts from, and
    registers it in MLflow as the `champion`; the attestation names the data by `roots`. A released model directory
    is never overwritten."""
    config = cycle.config
    directory = config.output.paths.model(cycle.number)
    if directory.exists() or directory.is_symlink():
        raise CycleAbortedError(f"{directory} already holds a released model; it is never overwritten", "release")
    started = cycle.running.started
    manifests: list[Resource] = [
        Resource(uri=m.path.resolve().as_uri(), digest={"sha256": m.manifest_sha256}, name=m.manifest.dataset)
        for m in intake.manifests
    ]
    base = cycle.state.accepted_model
    facts = CycleFacts(
        model_digests={},
        manifests=manifests,
        config=file_resource(cycle.config_path),
        resolved_config=config.resolved(),
        shards=cycle.running.shards,
        read_log=read_log_resource(**cycle.report["training"]["read_log"]),
        allowed=roots.allowed,
        accepted=roots.accepted,
        invocation_id=str(uuid.uuid4()),
        started=started,
        finished=utc_now(),
        code=git_resource(Path.cwd()),
        dvc=dvc_resource(Path.cwd(), [p for m in intake.manifests for p in (m.path, m.data_dir)]),
        base_model=Resource(uri=Path(base.path).resolve().as_uri(), digest={"sha256": base.sha256}) if base else None,
        roni={
            k: v
            for k, v in cycle.report.get("roni", {}).items()
            if k in ("level", "error_control", "calibration", "decisions", "sources")
        },
        gate=cycle.report["gate"],
        excluded_rows=cycle.report["training"]["excluded_rows"],
        state=_state_link(cycle),
    )
    files = write_signed_model(
        model,
        directory,
        config.output.model_signing_key,
        class_path=config.model.class_path,
        init_args=config.model.init_args,
        metadata=serving_metadata(config),
        attest=attestor(facts, config.output.attestation_key_path),
        code=find_model_code(model_imports(config.model.class_path, config.model_forward)).files,
    )
    record = ModelRecord(
        path=str(directory), sha256=files.digests["model.safetensors"], attestation=str(files.attestation)
    )
    heldout = HeldoutRecord(
        manifest_sha256=intake.holdout_sha256,
        clean_accuracy=result.verdict.after.accuracy,
        robust_accuracy=result.robust_accuracy,
        metrics=result.verdict.after.to_dict(),
    )
    cycle.state = cycle.store.update(cycle.state.accept(record, heldout))
    from trainguard.pipeline.cycle.outputs import heldout_metrics  # here: the cycle package imports this module

    evaluated = heldout_metrics(result.robust_accuracy)
    parent.register_model(_model_release(cycle, intake, directory, files.digests, example, evaluated))
    cycle.report["model"] = {
        "dir": str(directory),
        "digests": dict(files.digests),
        "attestation": str(files.attestation),
        "registered_version": None,  # MLflow's number, recorded once the registration is done
    }
    return directory


def _model_release(
    cycle: RunningCycle,
    intake: Intake,
    directory: Path,
    digests: Mapping[str, str],
    example: Any,
    evaluated: frozenset[str],
) -> ModelRelease:
    """What the registered version says about itself: which cycle, which data (manifest digests), which checks; its
    params (the resolved config) and which of the cycle's metrics were measured on the held-out set."""
    config = cycle.config
    shards = cycle.record.shards
    refused = refusals(shards)
    data = ", ".join(f"{m.manifest.dataset} (manifest sha256 {m.manifest_sha256})" for m in intake.manifests)
    refused_by = ", ".join(f"{n} by {check}" for check, n in sorted(refused.items())) or "none"
    gate = cycle.report["gate"]
    checks = ", ".join((*cycle.record.steps, "gate"))
    tags = {
        "trainguard.cycle": str(cycle.number),
        "trainguard.config_sha256": cycle.config_sha256,
        "trainguard.model_sha256": digests["model.safetensors"],
        "trainguard.checks": checks,
        "trainguard.shards_accepted": str(sum(d.accepted for d in shards)),
        "trainguard.shards_refused": refused_by,
        "trainguard.gate": str(gate["reason"])[:4000],
        **{f"trainguard.manifest.{m.manifest.dataset}.sha256": m.manifest_sha256 for m in intake.manifests},
    }
    description = (
        f"Cycle {cycle.number} of `{config.name}`, accepted by the gate ({gate['reason']}). Data: {data}; "
        f"{tags['trainguard.shards_accepted']} shards accepted, refused: {refused_by}. Checks passed: {checks}. "
        f"Weights sha256 {digests['model.safetensors']}, signed (OpenSSF model signing) with an SLSA attestation; "
        "`trainguard.load_model(NAME, key=...)` verifies both against your key and this version's recorded digest."
    )
    return ModelRelease(
        model_dir=directory,
        model_key=public_key_path(config.output.model_signing_key),
        attestation_key=public_key_path(config.output.attestation_key_path),
        example=example,
        description=description,
        tags=tags,
        params=config.resolved(),
        evaluated=evaluated,
    )


def _state_link(cycle: RunningCycle) -> dict[str, Any]:
    """Where in its pipeline's signed history the model was made: the pipeline, the cycle and the state's link."""
    link, pipeline = cycle.store.link, cycle.state.pipeline
    if link is None or pipeline is None:
        raise CycleAbortedError("the cycle state has no link to attest the model under", "release")
    return {"pipeline": pipeline.id, "cycle": cycle.number, "seq": link.seq, "link": link.digest}


def serving_metadata(config: CycleConfig) -> dict[str, str]:
    """What a served model needs beyond its class: the task (how outputs become predictions) and the
    `model_forward` hook that hands it its extra inputs, signed with the weights in `model.json`."""
    hook = {"model_forward": config.model_forward} if config.model_forward is not None else {}
    return {"task": config.task.kind, **hook}
