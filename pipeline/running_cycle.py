"""The mutable context of one running cycle: its config, its signed state (updated after every decision), its
tracking and the report it builds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainguard.pipeline.config import CycleConfig
from trainguard.pipeline.cycle_report import write_report
from trainguard.pipeline.cycle_state import CycleState, ShardDecision, StateStore
from trainguard.pipeline.distributed import Meeting
from trainguard.pipeline.tracking import CycleTracker


@dataclass
class RunningCycle:
    """The mutable context of one running cycle: config, persisted state and tracking."""

    config: CycleConfig
    config_path: Path
    config_sha256: str
    store: StateStore
    state: CycleState
    tracker: CycleTracker
    report: dict[str, Any]
    meeting: Meeting = field(default_factory=lambda: Meeting(None))

    @property
    def number(self) -> int:
        """This cycle's number (the last cycle of the state: running, or just finished)."""
        return self.state.latest.cycle

    def decide(self, decisions: Sequence[ShardDecision]) -> None:
        self.state = self.store.update(self.state.decide(decisions))

    def step(self, name: str, metrics: dict[str, float] | None = None) -> None:
        self.state = self.store.update(self.state.step_done(name, metrics))

    def write_report(self) -> Path:
        """Writes this cycle's local report (see `cycle_report.write_report`)."""
        return write_report(self.config.output.work_dir, self.number, self.report)
