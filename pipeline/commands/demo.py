"""`trainguard demo`: the main job on the embedded default (digits shards from several contributors)."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    work_dir: Path = typer.Option(Path("demo-work"), help="Where the demo writes data, keys and models."),
    epochs: int = typer.Option(5, min=1, help="Training epochs."),
) -> None:
    """Prepare digits shards, train a small Lightning classifier, log it all to MLflow."""
    from pipeline.demo import run_demo

    run_demo(work_dir, epochs)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
