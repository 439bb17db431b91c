"""Releasing an accepted model: signed (OpenSSF model signing) with its SLSA attestation, recorded as the model the
next cycle starts from, and registered in MLflow. A released model directory is never overwritten."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytorch_lightning as pl

from trainguard.pipeline.attestation import (
    CycleFacts,
    Resource,
    attestor,
    file_resource,
    git_resource,
    read_log_resource,
)
from trainguard.pipeline.cycle_state import HeldoutRecord, ModelRecord, utc_now
from trainguard.pipeline.errors import CycleAbortedError
from trainguard.pipeline.intake import Intake
from trainguard.pipeline.model_sign import write_signed_model
from trainguard.pipeline.running_cycle import RunningCycle
from trainguard.pipeline.tracking import TrackedRun
from trainguard.pipeline.training import TrainingResult
from trainguard.provenance.allowlist import AllowList


def release(
    cycle: RunningCycle,
    model: pl.LightningModule,
    intake: Intake,
    allow: AllowList,
    result: TrainingResult,
    parent: TrackedRun,
) -> Path:
    """Signs the accepted model with its SLSA attestation, makes it the model the next cycle starts from, and
    registers it in MLflow. A released model directory is never overwritten."""
    config = cycle.config
    directory = config.output.work_dir / "models" / f"cycle-{cycle.number:04d}"
    if directory.exists() or directory.is_symlink():
        raise CycleAbortedError(f"{directory} already holds a released model; it is never overwritten", "release")
    data_dirs = {m.manifest_sha256: m.data_dir for m in intake.manifests}
    started = cycle.state.current.started
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
        shards=cycle.state.current.shards,
        read_log=read_log_resource(**cycle.report["training"]["read_log"]),
        allowed=[
            Resource(
                uri=(data_dirs[s.manifest_sha256] / s.name).resolve().as_uri(),
                digest={"sha256": s.sha256},
                name=s.key,
                annotations={"manifestSha256": s.manifest_sha256},
            )
            for s in sorted(allow.shards)
        ],
        invocation_id=str(uuid.uuid4()),
        started=started,
        finished=utc_now(),
        code=git_resource(Path.cwd()),
        base_model=Resource(uri=Path(base.path).resolve().as_uri(), digest={"sha256": base.sha256}) if base else None,
        roni={
            k: v for k, v in cycle.report.get("roni", {}).items() if k in ("threshold", "calibration_size", "decisions")
        },
        gate=cycle.report["gate"],
    )
    files = write_signed_model(
        model,
        directory,
        config.output.model_signing_key,
        class_path=config.model.class_path,
        init_args=config.model.init_args,
        attest=attestor(facts, config.output.attestation_key_path),
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
    version = parent.register_model(directory, tags={"trainguard.cycle": str(cycle.number)})
    cycle.report["model"] = {
        "dir": str(directory),
        "digests": dict(files.digests),
        "attestation": str(files.attestation),
        "registered_version": version,
    }
    return directory
