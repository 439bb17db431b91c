"""Every path a cycle builds under its work folder (`output.work_dir`), in one place: the numbered `cycle-NNNN`
files and folders (reports, receipts, released models, read logs, RONI's screening) and the latest cycle's files
(`report.json`, `metrics.json`, `plots/`, the default `state.json`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = "metrics.json"
"""The latest cycle's headline numbers, numbers only (DVC's metrics file, tracked by git so experiments compare)."""
RECEIPT_SUFFIX = ".receipt.json"


def cycle_name(cycle: int) -> str:
    """`cycle-NNNN`: the name of cycle `cycle`'s files and folders (four digits at least)."""
    return f"cycle-{cycle:04d}"


def cycle_number(name: str, suffix: str = "") -> int | None:
    """The cycle number of a name `cycle_name` built (with `suffix` after it), or None for any other name."""
    match = re.fullmatch(rf"cycle-(\d{{4,9}}){re.escape(suffix)}", name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class WorkDir:
    """A cycle's work folder and the paths under it."""

    root: Path

    @property
    def reports(self) -> Path:
        """The folder of the cycles' reports and receipts."""
        return self.root / "reports"

    @property
    def models(self) -> Path:
        """The folder of the released models."""
        return self.root / "models"

    @property
    def latest_report(self) -> Path:
        """The latest cycle's report (DVC's metrics file)."""
        return self.root / "report.json"

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def state(self) -> Path:
        """The cross-cycle state when the config names no `state_file`."""
        return self.root / "state.json"

    @property
    def overridden_config(self) -> Path:
        """The config as the command line overrode it (`trainguard cycle --trainer.max_epochs=2`): the cycle runs
        from it, so its report and attestation name the config that ran."""
        return self.root / "config-overridden.yaml"

    def report(self, cycle: int) -> Path:
        return self.reports / f"{cycle_name(cycle)}.json"

    def receipt(self, cycle: int) -> Path:
        return self.reports / f"{cycle_name(cycle)}{RECEIPT_SUFFIX}"

    def allow_table(self, cycle: int) -> Path:
        """Cycle `cycle`'s allow-list, one parquet row per shard training could read (beside its report)."""
        return self.reports / f"{cycle_name(cycle)}.allow.parquet"

    def decisions_table(self, cycle: int) -> Path:
        """Every shard decision of cycle `cycle`, one parquet row each (beside its report)."""
        return self.reports / f"{cycle_name(cycle)}.decisions.parquet"

    def model(self, cycle: int) -> Path:
        """Where cycle `cycle`'s model is released (never overwritten)."""
        return self.models / cycle_name(cycle)

    def read_log(self, cycle: int) -> Path:
        """What training read in cycle `cycle`, one JSON line per shard."""
        return self.root / "reads" / f"{cycle_name(cycle)}.jsonl"

    def screening(self, cycle: int) -> Path:
        """The folder of cycle `cycle`'s RONI report and plot."""
        return self.root / "roni" / cycle_name(cycle)

    def plot(self, name: str) -> Path:
        """The data of the latest cycle's plot `name` (DVC plots)."""
        return self.root / "plots" / f"{name}.json"
