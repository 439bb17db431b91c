"""`trainguard cycle`: one defended retraining cycle from a YAML config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def cycle(
    config: Annotated[Path, typer.Option("--config", "-c", help="Cycle config (YAML), e.g. configs/digits.yaml.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
) -> None:
    """Verify -> validate -> screen (RONI) -> train (adversarially) -> gate -> sign the model and its attestation."""
    from pipeline.config import load_config
    from pipeline.errors import CycleAbortedError

    load_config(config)  # a bad config fails here, before torch is even imported
    from pipeline.cycle import run_cycle

    try:
        outcome = run_cycle(config)
    except CycleAbortedError as error:
        if as_json:
            typer.echo(json.dumps({"status": "failed", "check": error.check, "reason": str(error)}))
        raise
    if as_json:
        typer.echo(
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
    if outcome.status != "accepted":
        raise typer.Exit(1)


def print_outcome(outcome: object) -> None:
    """A short human summary of a cycle: refused shards by check, the gate's verdict, where things are."""
    from pipeline.cycle import CycleOutcome

    assert isinstance(outcome, CycleOutcome)
    for decision in outcome.shards:
        if not decision.accepted:
            typer.echo(f"  refused {decision.shard} ({decision.source}) by {decision.check}: {decision.reason}")
    accepted = sum(d.accepted for d in outcome.shards)
    typer.echo(f"cycle {outcome.cycle}: {accepted} shards accepted, {len(outcome.shards) - accepted} refused")
    typer.echo(f"cycle {outcome.cycle} {outcome.status}: {outcome.reason}")
    if outcome.model_dir:
        typer.echo(f"signed model and attestation: {outcome.model_dir}")
    typer.echo(f"report: {outcome.report}; {outcome.tracking}")


def register(app: typer.Typer) -> None:
    app.command("cycle")(cycle)
