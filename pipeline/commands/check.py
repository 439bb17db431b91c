"""`trainguard check`: every up-front check of a cycle config, without training or touching the cycle's state."""

from __future__ import annotations

from pathlib import Path

import click

from trainguard.pipeline.commands import PATH


@click.command()
@click.argument("config", type=PATH)
@click.option("--print-config", is_flag=True, help="Print the config with every default filled in, then check it.")
def check(config: Path, print_config: bool) -> None:
    """Check CONFIG: schema, class paths and init_args, files, keys, trust policies, manifests, and one forward
    pass of the model on one verified sample with the defenses' loss."""
    from trainguard.pipeline.config import load_config
    from trainguard.pipeline.preflight import lines, preflight

    loaded = load_config(config)
    if print_config:
        click.echo(resolved_yaml(loaded), nl=False)
    click.echo(f"ok  {'config':<10} {config}: schema, class paths and init_args")
    for line in lines(preflight(loaded)):
        click.echo(line)
    click.echo(f"{config}: ready for `trainguard cycle --config {config}`")


def resolved_yaml(config: object) -> str:
    """The config with defaults filled in, as YAML (what `--print-config` shows)."""
    import yaml

    from trainguard.pipeline.config import CycleConfig

    assert isinstance(config, CycleConfig)
    return yaml.safe_dump(config.resolved(), sort_keys=False)
