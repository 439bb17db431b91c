"""What a cycle leaves besides its state: the headline numbers, DVC's metrics file and plot data, the decision table
(parquet, beside the report) and what it logs to MLflow (verification tags and metrics, that table, the plots)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from trainguard.files import atomic_write
from trainguard.pipeline import plots
from trainguard.pipeline.attestation import git_resource
from trainguard.pipeline.cycle.outcome import CycleOutcome
from trainguard.pipeline.cycle_report import MerkleTreeRef, decided, decision_rows, refusals
from trainguard.pipeline.cycle_state import HeldoutRecord
from trainguard.pipeline.intake import Intake
from trainguard.pipeline.running_cycle import RunningCycle
from trainguard.pipeline.tracking import CycleTracker, TrackedRun, cycle_tags
from trainguard.pipeline.training import TrainingResult

CHECKS = ("verify", "validate", "limits", "roni")
"""The checks that refuse shards, each with a `shards/refused_<check>` metric even when it refused none (stable
columns for `dvc exp show`); a check not listed here gets its metric when it refuses something."""
DECISIONS_TABLE = "shards/decisions.parquet"
"""The MLflow artifact of the cycle's decision table: one row per shard decision (columns of `ShardDecision`)."""


def _tracking_status(tracker: CycleTracker) -> str:
    if tracker.offline:
        return f"MLflow unreachable ({tracker.offline_reason}); decisions kept in the local report and state"
    if not tracker.wait_at_end:
        return f"logging to MLflow at {tracker.uri} in the background (done before the process exits)"
    return f"logged to MLflow at {tracker.uri}"


def _settled(cycle: RunningCycle, parent: TrackedRun, outcome: CycleOutcome) -> CycleOutcome:
    """The outcome once MLflow has everything (when the tracker waited for it): the report names the registered
    version and says whether MLflow has it all (rewritten if the uploads found the server gone)."""
    if not cycle.tracker.wait_at_end:
        return outcome
    tracking = _tracking_status(cycle.tracker)
    model = cycle.report.get("model")
    if model is not None:
        model["registered_version"] = parent.registered_version
    if model is not None or tracking != cycle.report["tracking"]:
        cycle.report["tracking"] = tracking
        cycle.write_report()
    return replace(outcome, tracking=tracking)


HELDOUT_METRICS = ("val/acc", "gate/accuracy_before", "val/gradient_masking")
"""The headline's metrics measured on the held-out set (clean accuracy after and before training, the gradient-masking
flag); its robust accuracies, also measured there, are named `plots.ROBUST_PREFIX` + epsilon (`heldout_metrics`)."""


def heldout_metrics(epsilons: Iterable[str]) -> frozenset[str]:
    """The names of the headline's metrics measured on the held-out set, given the epsilons of its robust accuracy.

    Args:
        epsilons: The perturbation sizes robust accuracy was measured at, as its metrics name them.

    Returns:
        `HELDOUT_METRICS` and a `plots.ROBUST_PREFIX` name per epsilon.
    """
    return frozenset((*HELDOUT_METRICS, *(f"{plots.ROBUST_PREFIX}{eps}" for eps in epsilons)))


def _headline(cycle: RunningCycle, result: TrainingResult, screening_seconds: float, status: str) -> dict[str, float]:
    """The cycle's numbers, named alike in MLflow, the JSON report and DVC's metrics file: clean and robust
    held-out accuracy, shards offered, accepted and refused by check, and the screening's error level and time."""
    shards = cycle.record.shards
    refused = refusals(shards)
    accuracy, accuracy_before, gradient_masking = HELDOUT_METRICS
    metrics = {
        "cycle/number": float(cycle.number),
        "cycle/accepted": float(status == "accepted"),
        accuracy: result.verdict.after.accuracy,
        accuracy_before: result.verdict.before.accuracy,
        **{f"{plots.ROBUST_PREFIX}{eps}": acc for eps, acc in result.robust_accuracy.items()},
        "shards/offered": float(len(shards)),
        "shards/accepted": float(len(shards) - sum(refused.values())),
        "shards/refused": float(sum(refused.values())),
        **{f"shards/refused_{check}": float(refused.get(check, 0)) for check in (*CHECKS, *refused)},
        "roni/seconds": screening_seconds,
    }
    if result.gradient_masking is not None:
        metrics[gradient_masking] = float(bool(result.gradient_masking["flagged"]))
    if cycle.config.roni.enabled:
        metrics["roni/level"] = cycle.config.roni.level
    return {name: value for name, value in metrics.items() if value == value}  # NaN (not measured) left out


def _write_decisions(cycle: RunningCycle, accepted: MerkleTreeRef) -> Path | None:
    """Writes every shard decision of the cycle as a parquet file beside the report and names it (with the accepted
    shards' Merkle root, `accepted`) in the report's data section; returns the file (None when the cycle has no data
    section)."""
    section = cycle.report.get("data")
    if section is None:
        return None
    work_dir = cycle.config.output.work_dir
    data = decided(work_dir, cycle.number, section, cycle.record.shards, accepted)
    cycle.report["data"] = data
    return work_dir / data["decisions"]["path"]


def _write_dvc_outputs(cycle: RunningCycle, result: TrainingResult, headline: dict[str, float]) -> dict[str, list[Any]]:
    """Writes DVC's metrics file and the cycle's plot data (`plots/<name>.json`); returns the plot rows by name."""
    paths = cycle.config.output.paths
    atomic_write(paths.metrics, (json.dumps(headline, indent=2, sort_keys=True) + "\n").encode())
    rows = {
        "robust_accuracy": plots.robust_rows(result.robust_accuracy),
        "gate_classes": plots.gate_rows(result.verdict.before, result.verdict.after),
        "cycles": plots.cycle_rows(cycle.state.cycles),
    }
    for name, data in rows.items():
        atomic_write(paths.plot(name), (json.dumps(data, indent=1) + "\n").encode())
    return rows


def _log_plots(parent: TrackedRun, rows: dict[str, list[Any]], prior: HeldoutRecord | None, number: int) -> None:
    """The same plots as figures in MLflow (`plots/<name>.png`), drawn off the cycle's path by the tracker (only
    when there is a run to log them to)."""
    last = plots.robust_rows(prior.robust_accuracy) if prior is not None else []
    figures = {
        "robust_accuracy": partial(plots.robust_figure, rows["robust_accuracy"], last, number),
        "gate_classes": partial(plots.gate_figure, rows["gate_classes"]),
        "cycles": partial(plots.cycles_figure, rows["cycles"]),
    }
    for name, draw in figures.items():
        parent.log_figure(draw, f"plots/{name}.png")


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
    training = {ref.manifest.resolve() for ref in cycle.config.dataset.training}
    parent.log_datasets(
        [r for r in intake.reports if Path(r.manifest_path).resolve() in training],
        evaluation=next(r for r in intake.reports if r.manifest_sha256 == intake.holdout_sha256),
    )
    cycle.report["verification"] = {
        "manifests": [r.to_dict() for r in intake.reports],
        "signers": list(intake.signer_keyids),
        "refused": decision_rows(intake.refused),
    }
    cycle.step("verification")
