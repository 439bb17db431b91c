"""`trainguard check`: every up-front check of a cycle config, without training or touching the cycle's state."""

from __future__ import annotations

from pathlib import Path

import click

from trainguard.pipeline.commands import OVERRIDABLE, OVERRIDES_HELP, PATH, config_overrides


@click.command(context_settings=OVERRIDABLE, epilog=OVERRIDES_HELP)
@click.argument("config", type=PATH)
@click.option("--print-config", is_flag=True, help="Print the config with every default filled in, then check it.")
@config_overrides
def check(config: Path, print_config: bool, overrides: tuple[str, ...]) -> None:
    """Check CONFIG: schema, class paths and init_args, files, keys, trust policies, manifests, one forward pass of
    the model on one verified sample with the defenses' loss; then every refusal of the cycle that needs no training,
    on the data in place: rollback against the cycle's state, every shard's digest, validation and source caps, class
    coverage and the held-out set's size for the gate. Exit 1 only where the cycle would stop; a shard it would
    refuse and go on without is a `refuse` line, a weakness a `warn` line."""
    from trainguard.pipeline.config import load_config
    from trainguard.pipeline.preflight import foresee, lines, preflight

    loaded = load_config(config, overrides=overrides)
    if print_config:
        click.echo(resolved_yaml(loaded), nl=False)
    click.echo(f"ok  {'config':<10} {config}: schema, class paths and init_args")
    for line in lines(preflight(loaded)):
        click.echo(line)
    found = foresee(loaded)
    for line in lines(found):
        click.echo(line)
    refused = sum(p.verdict == "refuse" for p in found)
    warned = sum(p.verdict == "warn" for p in found)
    notes = [f"{n} {what}" for n, what in ((refused, "shard(s) it would refuse"), (warned, "warning(s)")) if n]
    command = " ".join(("trainguard cycle --config", str(config), *overrides))
    click.echo(f"{config}: ready for `{command}`{'; ' + ', '.join(notes) if notes else ''}")


def resolved_yaml(config: object) -> str:
    """The config with defaults filled in, as YAML (what `--print-config` shows)."""
    import yaml

    from trainguard.pipeline.config import CycleConfig

    assert isinstance(config, CycleConfig)
    return str(yaml.safe_dump(config.resolved(), sort_keys=False))
