"""The mutable context of one running cycle: its config, its signed state (updated after every decision), its
tracking and the report it builds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainguard.pipeline.config import CycleConfig
from trainguard.pipeline.cycle_report import CycleReportDict, write_report
from trainguard.pipeline.cycle_state import CycleRecord, CycleState, ShardDecision
from trainguard.pipeline.distributed import Meeting
from trainguard.pipeline.errors import StateError
from trainguard.pipeline.receipts import write_receipt
from trainguard.pipeline.state_log import StateStore
from trainguard.pipeline.tracking import CycleTracker


@dataclass
class RunningCycle:
    """The mutable context of one running cycle: config, persisted state, tracking and the report it builds."""

    config: CycleConfig
    config_path: Path
    config_sha256: str
    store: StateStore
    state: CycleState
    tracker: CycleTracker
    meeting: Meeting = field(default_factory=lambda: Meeting(None))
    report: CycleReportDict = field(init=False)
    """The report this cycle builds, section by section (set as the cycle starts, when its number is known)."""

    @property
    def number(self) -> int:
        """This cycle's number (the last cycle of the state: running, or just finished)."""
        return self.record.cycle

    @property
    def record(self) -> CycleRecord:
        """This cycle's record: the last of the state, running or just finished."""
        latest = self.state.latest
        if latest is None:
            raise StateError("the cycle state holds no cycle while one runs", path=str(self.store.path))
        return latest

    @property
    def running(self) -> CycleRecord:
        """This cycle's record while it runs (before the gate's decision finishes it)."""
        current = self.state.current
        if current is None:
            raise StateError(f"cycle {self.number} is no longer running", path=str(self.store.path))
        return current

    def decide(self, decisions: Sequence[ShardDecision]) -> None:
        self.state = self.store.update(self.state.decide(decisions))

    def step(self, name: str, metrics: dict[str, float] | None = None) -> None:
        self.state = self.store.update(self.state.step_done(name, metrics))

    def write_report(self) -> Path:
        """Writes this cycle's local report (see `cycle_report.write_report`), naming the link of the signed state
        it was made under, and the signed receipt that binds the two."""
        link = self.store.link
        pipeline = self.state.pipeline
        if link is not None and pipeline is not None:
            self.report["state"] = {"pipeline": pipeline.id, "seq": link.seq, "link": link.digest}
        work_dir = self.config.output.work_dir
        path, digest = write_report(work_dir, self.number, self.report)
        if link is not None and self.state.current is None:
            write_receipt(work_dir, self.state, link, digest, self.store.key)
        return path
