"""Sub-commands of the `trainguard` CLI, one module per area; each imports heavy libraries lazily."""

from __future__ import annotations

from pathlib import Path

import click

PATH = click.Path(path_type=Path)
"""A path option or argument, as a `pathlib.Path`; existence is checked where the path is used."""


def register_all(app: click.Group) -> None:
    """Adds every sub-command to the root group."""
    from trainguard.pipeline.commands import check, cycle, data, model, shard, status

    for command in (
        data.keygen,
        data.sign,
        data.cosign,
        data.verify,
        check.check,
        cycle.cycle,
        status.status,
        status.history,
        status.reset_rollback,
        status.sources,
        model.verify_model,
        model.load_model,
        shard.shard,
    ):
        app.add_command(command)
