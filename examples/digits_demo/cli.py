"""The digits example's commands: `demo` (the defended cycle with two attacks), `prepare` (the digits shards) and
`publish` (the data owner's step of the DVC pipeline), run as `python -m digits_demo demo|prepare|publish` with
`examples/` on the path (`make demo` does)."""

from __future__ import annotations

import json
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
    from digits_demo.demo import run_demo

    code = run_demo(config)
    if code:
        raise SystemExit(code)


@click.command()
@click.argument("out", type=PATH)
@click.option("--sources", default="alice,bob,carol,dave", show_default=True, help="Comma-separated contributor ids.")
@click.option("--shards-per-source", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--shard-size", type=click.IntRange(min=1), default=50, show_default=True)
@click.option(
    "--batch",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Which batch of new contributions (one per cycle).",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--format",
    "shard_format",
    type=click.Choice(["parquet", "images"]),
    default="parquet",
    show_default=True,
    help="parquet tables, or WebDataset tars of 8x8 PNG digits.",
)
def prepare(
    out: Path, sources: str, shards_per_source: int, shard_size: int, batch: int, seed: int, shard_format: str
) -> None:
    """Write digits shards: a trusted base and held-out set, and one batch of contributed shards."""
    from digits_demo.prepare import Layout, prepare_digits
    from trainguard.files import atomic_write
    from trainguard.pipeline.errors import ConfigError

    names = tuple(s.strip() for s in sources.split(",") if s.strip())
    if not names:
        raise ConfigError("--sources names no contributor", key="sources")
    layout = Layout(sources=names, shards_per_source=shards_per_source, shard_size=shard_size)
    try:
        prepared = prepare_digits(out, layout, batch, seed, shard_format)
    except ValueError as error:
        raise ConfigError(str(error), key="batch") from error
    sources_file = out / "train-sources.json"
    known = json.loads(sources_file.read_text()) if sources_file.exists() else {}
    atomic_write(sources_file, (json.dumps(known | prepared.contributed(), indent=2, sort_keys=True) + "\n").encode())
    click.echo(f"wrote {len(prepared.shards)} shards under {out} (contributors in {sources_file})")


@click.command()
@click.argument("root", type=PATH, default=Path("demo-work"))
@click.option("--batch", type=click.IntRange(min=0), required=True, help="Which batch of contributions to add.")
@click.option("--seed", type=int, default=0, show_default=True, help="The digits shuffle; keep it across batches.")
def publish(root: Path, batch: int, seed: int) -> None:
    """The data owner's step: add a batch of contributed shards to ROOT/data, sign, and `dvc add` it."""
    from digits_demo.owner import publish as publish_batch

    published = publish_batch(root, batch, seed=seed)
    click.echo(
        f"published batch {batch}: {published.contributed} contributed shards under {published.data}, signed; "
        f"now `git add {published.dvc_file}`, commit, and `dvc push`"
    )
