"""The cycle's local report: one JSON file per cycle and the latest as `report.json` (DVC's metrics file), written
before anything is sent to MLflow, so the local record never depends on the tracking server."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainguard.files import atomic_write
from trainguard.pipeline.cycle_state import ShardDecision
from trainguard.pipeline.workdir import WorkDir


def write_report(work_dir: Path, cycle: int, report: dict[str, Any]) -> tuple[Path, str]:
    """Writes the report atomically, as `reports/cycle-NNNN.json` and as the latest `report.json`; returns the
    first and the SHA-256 of the bytes written."""
    text = (json.dumps(report, indent=2, sort_keys=True, default=str) + "\n").encode()
    paths = WorkDir(work_dir)
    path = paths.report(cycle)
    for target in (path, paths.latest_report):
        atomic_write(target, text)
    return path, hashlib.sha256(text).hexdigest()


def refusals(shards: Sequence[ShardDecision]) -> dict[str, int]:
    """How many shards each check refused."""
    refused: dict[str, int] = {}
    for decision in shards:
        if not decision.accepted:
            refused[decision.check] = refused.get(decision.check, 0) + 1
    return refused
