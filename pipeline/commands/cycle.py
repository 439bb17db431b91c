"""`trainguard cycle`: one defended retraining cycle from a YAML config."""

from __future__ import annotations

import json
from pathlib import Path

import click

from trainguard.pipeline.commands import PATH


@click.command()
@click.option(
    "--config",
    "-c",
    type=PATH,
    required=True,
    help="Cycle config (YAML), e.g. configs/digits.yaml.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.option(
    "--reinit",
    is_flag=True,
    help="Start a new signed state where none exists beside released models (numbering continues after them).",
)
@click.option("--force", is_flag=True, help="Train even when nothing is new since the last accepted cycle.")
def cycle(config: Path, as_json: bool, reinit: bool, force: bool) -> None:
    """Verify -> validate -> screen (RONI) -> train (adversarially) -> gate -> sign the model and its attestation."""
    from trainguard.pipeline.config import load_config
    from trainguard.pipeline.errors import CycleAbortedError

    loaded = load_config(config)  # a bad config fails here, before torch is even imported
    processes = _processes(loaded.training.devices, loaded.training.strategy)
    if processes > 1:
        _relaunch(processes)
    from trainguard.pipeline.cycle import run_cycle

    try:
        outcome = run_cycle(config, reinit=reinit, force=force)
    except CycleAbortedError as error:
        if as_json:
            click.echo(json.dumps({"status": "failed", "check": error.check, "reason": str(error)}))
        raise
    if as_json:
        click.echo(
            json.dumps(
                {
                    "cycle": outcome.cycle,
                    "status": outcome.status,
                    "reason": outcome.reason,
                    "report": str(outcome.report),
                    "model_dir": str(outcome.model_dir) if outcome.model_dir else None,
                    "tracking": outcome.tracking,
                    "metrics": outcome.metrics,
                },
                indent=2,
            )
        )
    else:
        print_outcome(outcome)
    if outcome.status not in ("accepted", "follower", "skipped"):
        raise SystemExit(1)


def _processes(devices: object, strategy: str) -> int:
    """How many processes a DDP config asks for on this node when no launcher started this one (else 1)."""
    from trainguard.pipeline.distributed import launch_from_env

    if launch_from_env() is not None or not strategy.startswith("ddp") or not isinstance(devices, int):
        return 1
    return devices


def _relaunch(processes: int) -> None:
    """Runs this same command as `processes` ranks under torch's launcher (one node), and exits with its code:
    rank 0 leads the cycle, the others train their share."""
    import os
    import sys

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    os.execv(sys.executable, [*command, "-m", "trainguard.pipeline.cli", *sys.argv[1:]])


def print_outcome(outcome: object) -> None:
    """A short human summary of a cycle: refused shards by check, the gate's verdict, where things are."""
    from trainguard.pipeline.cycle import CycleOutcome

    assert isinstance(outcome, CycleOutcome)
    if outcome.status == "skipped":
        click.echo(f"cycle skipped: {outcome.reason}")
        return
    for decision in outcome.shards:
        if not decision.accepted:
            click.echo(f"  refused {decision.shard} ({decision.source}) by {decision.check}: {decision.reason}")
    accepted = sum(d.accepted for d in outcome.shards)
    click.echo(f"cycle {outcome.cycle}: {accepted} shards accepted, {len(outcome.shards) - accepted} refused")
    click.echo(f"cycle {outcome.cycle} {outcome.status}: {outcome.reason}")
    if outcome.model_dir:
        click.echo(f"signed model and attestation: {outcome.model_dir}")
    click.echo(f"report: {outcome.report}; {outcome.tracking}")
