"""`trainguard demo`: the main job on the embedded default (digits shards from several contributors)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def demo(
    work_dir: Annotated[Path, typer.Option(help="Where the demo writes data, keys and models.")] = Path("demo-work"),
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs.")] = 5,
) -> None:
    """Prepare digits shards, train a small Lightning classifier, log it all to MLflow."""
    from pipeline.demo import run_demo

    run_demo(work_dir, epochs)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
