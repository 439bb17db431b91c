"""Where a cycle starts from: the signed state checked fresh (or rebuilt with `--reinit`), and the skip of a cycle
with nothing new since the last accepted one."""

from __future__ import annotations

from pathlib import Path

from trainguard.pipeline import console
from trainguard.pipeline.config import CycleConfig
from trainguard.pipeline.cycle.outcome import CycleOutcome
from trainguard.pipeline.cycle_state import CycleRecord, CycleState
from trainguard.pipeline.intake import manifest_refs
from trainguard.pipeline.model_sign import file_sha256
from trainguard.pipeline.receipts import check_fresh, rebuild_state
from trainguard.pipeline.state_log import StateStore


def _current_state(store: StateStore, work_dir: Path, reinit: bool) -> CycleState:
    """The signed state, checked (`StateStore.load`) and refused when a signed receipt beside it shows it is not
    the newest link of its history; with `reinit`, a new history rebuilt from the signed log and receipts, only
    where the state is lost (missing, stale, foreign or unreadable)."""
    if reinit:
        state, carried = rebuild_state(store, work_dir)
        console.note(carried)
        return state
    state = store.load()
    check_fresh(state, store.link, work_dir, store.key)
    return state


def _unchanged_since_accepted(config: CycleConfig, config_sha256: str, state: CycleState) -> CycleRecord | None:
    """The last accepted cycle when it ran this config on the manifests now in place (same sha256 each), else None."""
    if state.current is not None:
        return None
    last = next((c for c in reversed(state.cycles) if c.status == "accepted"), None)
    if last is None or last.config_sha256 != config_sha256 or not last.manifests:
        return None
    paths = [ref.manifest.resolve() for ref in manifest_refs(config)]
    if not all(path.is_file() for path in paths):
        return None
    return last if {str(path): file_sha256(path) for path in paths} == last.manifests else None


def _skipped(config: CycleConfig, last: CycleRecord) -> CycleOutcome:
    """The outcome of a cycle with nothing new: no state change, no run, the accepted model stays."""
    return CycleOutcome(
        cycle=last.cycle,
        status="skipped",
        reason=f"nothing new since cycle {last.cycle} (same config and manifests); `--force` retrains",
        report=config.output.paths.report(last.cycle),
        model_dir=Path(last.candidate.path) if last.candidate else None,
        tracking="nothing logged",
        metrics=dict(last.metrics),
    )
