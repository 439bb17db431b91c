"""`trainguard demo`: the defended retraining cycle on the embedded default (digits), with two attacks."""

from __future__ import annotations

from pathlib import Path

import click

from trainguard.pipeline.commands import PATH


@click.command()
@click.option(
    "--config",
    "-c",
    type=PATH,
    default=Path("configs/digits-images.yaml"),
    show_default=True,
    help="The demo's cycle config.",
)
def demo(config: Path) -> None:
    """Sign digits shards (one poisoned, one tampered), then run one defended cycle and sign the model."""
    from trainguard.pipeline.demo import run_demo

    code = run_demo(config)
    if code:
        raise SystemExit(code)
