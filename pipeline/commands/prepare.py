"""`trainguard prepare`: writes the embedded digits data set as curator and per-contributor parquet shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def prepare(
    out: Annotated[Path, typer.Argument(help="Data root: writes trusted/, train/<source>/ and train-sources.json.")],
    sources: Annotated[str, typer.Option(help="Comma-separated contributor ids.")] = "alice,bob,carol,dave",
    shards_per_source: Annotated[int, typer.Option(min=1)] = 3,
    shard_size: Annotated[int, typer.Option(min=1)] = 50,
    batch: Annotated[int, typer.Option(min=0, help="Which batch of new contributions (one per cycle).")] = 0,
    seed: int = 0,
) -> None:
    """Write digits shards: a trusted base and held-out set, and one batch of contributed shards."""
    from pipeline.errors import ConfigError
    from pipeline.prepare import Layout, prepare_digits

    names = tuple(s.strip() for s in sources.split(",") if s.strip())
    if not names:
        raise ConfigError("--sources names no contributor", key="sources")
    layout = Layout(sources=names, shards_per_source=shards_per_source, shard_size=shard_size)
    try:
        prepared = prepare_digits(out, layout, batch, seed)
    except ValueError as error:
        raise ConfigError(str(error), key="batch") from error
    sources_file = out / "train-sources.json"
    known = json.loads(sources_file.read_text()) if sources_file.exists() else {}
    sources_file.write_text(json.dumps(known | prepared.contributed(), indent=2, sort_keys=True) + "\n")
    typer.echo(f"wrote {len(prepared.shards)} shards under {out} (contributors in {sources_file})")


def register(app: typer.Typer) -> None:
    app.command("prepare")(prepare)
