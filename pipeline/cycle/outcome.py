"""How a cycle ended: `CycleOutcome`, what `run_cycle` returns and the console prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trainguard.pipeline.cycle_state import ShardDecision


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
