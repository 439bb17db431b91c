"""`trainguard status` and `trainguard history`: the cycles a config ran, their decisions and models, and where
the cycle's state, reports and models live; `trainguard reset-rollback`: the one, logged way back to older data."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click

from trainguard.pipeline.commands import PATH

if TYPE_CHECKING:
    from trainguard.pipeline.cycle_state import SourceAction
    from trainguard.pipeline.workdir import WorkDir


@click.command()
@click.option("--config", "-c", type=PATH, required=True, help="The cycle config (YAML).")
@click.option("--last", type=click.IntRange(min=1), default=5, show_default=True, help="How many cycles to show.")
def status(config: Path, last: int) -> None:
    """The last cycles (decision, reason, model), the accepted model, and where state and reports are."""
    loaded, store = _store(config)
    state = store.load()
    _cycles(state.cycles[-last:], loaded.output.paths, interrupted=state.current is not None and _unlocked(store))
    accepted = state.accepted_model
    click.echo(f"accepted model: {accepted.path if accepted else 'none yet'}")
    for namespace, entry in sorted(state.rollback.items()):
        click.echo(f"anti-rollback: {namespace} at version {entry.version}")
    click.echo(f"cycle state (signed; also holds the manifests' anti-rollback records): {loaded.output.state_path}")
    click.echo(f"reports: {loaded.output.paths.reports}; models: {loaded.output.paths.models}")


@click.command()
@click.option("--config", "-c", type=PATH, required=True, help="The cycle config (YAML).")
def history(config: Path) -> None:
    """Every cycle of the config's state, with its shard decisions."""
    loaded, store = _store(config)
    records = store.history()
    _cycles(records, loaded.output.paths)
    for record in records:
        refused = [d for d in record.shards if not d.accepted]
        click.echo(f"cycle {record.cycle}: {len(record.shards) - len(refused)} shards accepted, {len(refused)} refused")
        for decision in refused:
            click.echo(f"  refused {decision.shard} ({decision.source}) by {decision.check}: {decision.reason}")


@click.command("reset-rollback")
@click.option("--config", "-c", type=PATH, required=True, help="The cycle config (YAML).")
@click.option("--reason", required=True, help="Why older data may be accepted again (recorded in the signed state).")
@click.argument("namespace")
def reset_rollback(config: Path, reason: str, namespace: str) -> None:
    """Forgets the anti-rollback record NAMESPACE (as `trainguard status` lists it), so an older manifest version
    of that key set and dataset is accepted again: an operator's decision, signed into the state's history."""
    loaded, store = _store(config)
    with store.locked():
        state = store.load()
        if state.current is not None:
            raise click.UsageError(f"cycle {state.current.cycle} is running; reset anti-rollback between cycles")
        entry = state.rollback.get(namespace)
        store.update(state.reset_rollback(namespace, reason))
    version = entry.version if entry else "?"
    click.echo(
        f"reset anti-rollback record {namespace} (was version {version}), recorded in {loaded.output.state_path}"
    )


@click.command()
@click.option("--config", "-c", type=PATH, required=True, help="The cycle config (YAML).")
@click.option("--reason", default="", help="Why (recorded in the signed state); required to act on a source.")
@click.argument("action", type=click.Choice(["list", "clear", "quarantine", "release"]))
@click.argument("source", required=False)
def sources(config: Path, reason: str, action: str, source: str | None) -> None:
    """The sources' standing, and the operator's signed decisions on one: `clear` forgets its evidence and earlier
    verdicts, so the next cycle screens its shards afresh; `quarantine` refuses all its shards until `release`."""
    loaded, store = _store(config)
    if action == "list":
        state = store.load()
        for name, record in sorted(state.evidence.items()):
            low = min(record.p_values.values(), default=1.0)
            click.echo(f"{name}: {len(record.p_values)} screened shard(s) offered, lowest p-value {low:.3g}")
        for name, why in sorted(state.quarantined.items()):
            click.echo(f"{name}: quarantined by the operator: {why}")
        return
    if source is None or not reason:
        raise click.UsageError(f"`sources {action}` needs a SOURCE and --reason")
    with store.locked():
        store.update(store.load().operate_source(source, cast("SourceAction", action), reason))
    click.echo(f"source {source}: {action} recorded in the signed state {loaded.output.state_path}")


def _store(config: Path) -> tuple[Any, Any]:
    """The config and its signed cycle state's store (checked with the cycle's key when read)."""
    from trainguard.pipeline.config import load_config
    from trainguard.pipeline.state_log import StateStore
    from trainguard.provenance.keys import load_signing_key

    loaded = load_config(config, check_components=False)
    key = load_signing_key(loaded.output.attestation_key_path)
    return loaded, StateStore(loaded.output.state_path, key, loaded.pipeline_identity)


def _unlocked(store: Any) -> bool:
    """Whether no process holds the cycle lock: a `running` cycle then was interrupted (killed, ctrl-C)."""
    from trainguard.pipeline.errors import StateError

    try:
        with store.locked():
            return True
    except StateError:
        return False


def _cycles(records: Any, paths: WorkDir, *, interrupted: bool = False) -> None:
    """A table of `records`; the last one, when `interrupted`, says so and how to go on."""
    from trainguard.pipeline.console import rows_table

    def model(record: Any) -> str:
        released = paths.model(record.cycle)
        if record.status == "accepted" and released.is_dir():
            return str(released)
        return f"{record.candidate.path} (not released)" if record.candidate else "-"

    rows = [(str(r.cycle), r.status, r.started, model(r), " ".join(r.reason.split())[:120]) for r in records]
    if rows and interrupted:
        cycle, _, started, candidate, _ = rows[-1]
        rows[-1] = (cycle, "interrupted", started, candidate, "no process runs it: the same config resumes it")
    if not rows:
        click.echo("no cycle has run yet")
        return
    rows_table(("cycle", "decision", "started", "model", "reason"), rows)
