"""Sub-commands of the `trainguard` CLI, one module per area; each imports heavy libraries lazily."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

PATH = click.Path(path_type=Path)
"""A path option or argument, as a `pathlib.Path`; existence is checked where the path is used."""

OVERRIDABLE: dict[str, Any] = {"ignore_unknown_options": True}
"""The context settings of a command that takes config overrides: options it does not know are overrides."""
OVERRIDES_HELP = (
    "Any key of the config can be set on the command line, as LightningCLI does: "
    "--trainer.max_epochs=2, --model.lr 0.01, --roni.level=0.05, --trainer.callbacks+=pkg.MyCallback; "
    "--print-config shows the result."
)
_Command = TypeVar("_Command", bound=Callable[..., Any])


def config_overrides(command: _Command) -> _Command:
    """Adds the `overrides` argument: every argument the command does not know, left for the config's parser
    (jsonargparse, `load_config(overrides=...)`), which names the key of any it cannot apply. The command needs
    `context_settings=OVERRIDABLE`."""
    return click.argument("overrides", nargs=-1, type=click.UNPROCESSED, metavar="[--SECTION.KEY=VALUE]...")(command)


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
