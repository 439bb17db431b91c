"""`trainguard demo`: the defended retraining cycle on the embedded default (digits), with two attacks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    config: Annotated[Path, typer.Option("--config", "-c", help="The demo's cycle config.")] = Path(
        "configs/digits.yaml"
    ),
) -> None:
    """Sign digits shards (one poisoned, one tampered), then run one defended cycle and sign the model."""
    from pipeline.demo import run_demo

    code = run_demo(config)
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
