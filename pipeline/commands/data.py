"""`trainguard keygen | sign | cosign | verify`: signed, hash-verified training-data shards (provenance)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from trainguard.pipeline.commands import PATH

if TYPE_CHECKING:
    from trainguard.provenance.keys import KeyType


def role_options(command: Callable[..., None]) -> Callable[..., None]:
    """`--role` and `--roles`, the roles a signed manifest gives its shards (`sign` and `shard` take the same)."""
    roles = click.option("--roles", help="JSON file or inline JSON: shard name or glob -> role.")
    role = click.option(
        "--role",
        default="train",
        show_default=True,
        help="Role of every shard not in --roles: train (screened), trusted or holdout (the signing key's trust "
        "policy must grant it).",
    )
    return role(roles(command))


@click.command()
@click.option("--out", type=PATH, required=True, help="Writes OUT.key (mode 0600) and OUT.pub, e.g. keys/alice.")
@click.option(
    "--type",
    "key_type",
    type=click.Choice(["ed25519", "ecdsa-p256"]),
    default="ed25519",
    show_default=True,
    help="ecdsa-p256 for Sigstore / OpenSSF model-signing tooling.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing key pair.")
def keygen(out: Path, key_type: KeyType, force: bool) -> None:
    """Generate a signing key pair; the private key is encrypted when $TRAINGUARD_KEY_PASSPHRASE is set."""
    from trainguard.provenance.keys import PASSPHRASE_ENV, generate_signing_key, write_keypair

    key = generate_signing_key(key_type)
    passphrase = os.environ.get(PASSPHRASE_ENV, "").encode() or None
    private, public = write_keypair(key, out, passphrase, overwrite=force)
    encrypted = "encrypted" if passphrase else "unencrypted"
    click.echo(f"wrote {private} ({encrypted}, mode 0600) and {public}; keyid {key.keyid}")


@click.command()
@click.argument("data_dir", type=PATH)
@click.option("--key", type=PATH, required=True, help="Private key (PEM).")
@click.option("--out", type=PATH, required=True, help="Manifest to write (DSSE envelope, in-toto Statement v1).")
@click.option("--dataset", help="Dataset name (default: the data dir's name).")
@click.option(
    "--version",
    type=click.IntRange(min=0),
    help="Manifest version (default: the one at --out plus 1, else 1).",
)
@click.option("--expires", default="30d", show_default=True, help="Lifetime (30d, 12h, 2w) or an RFC 3339 time.")
@click.option("--source", help="Contributor id of every shard not in --sources.")
@click.option("--sources", help="JSON file or inline JSON: shard name, glob or folder/ -> contributor id.")
@role_options
@click.option(
    "--chunk-mib",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Chunk size (MiB) for chunk digests of large shards.",
)
@click.option("--dvc", is_flag=True, help="Cross-check every shard against DVC's md5 (.dvc / dvc.lock).")
def sign(
    data_dir: Path,
    key: Path,
    out: Path,
    dataset: str | None,
    version: int | None,
    expires: str,
    source: str | None,
    sources: str | None,
    role: str,
    roles: str | None,
    chunk_mib: int,
    dvc: bool,
) -> None:
    """Hash every shard under DATA_DIR and write a signed manifest."""
    from trainguard.provenance.keys import load_signing_key
    from trainguard.provenance.paths import printable
    from trainguard.provenance.signing import sign_dataset, write_manifest

    signing_key = load_signing_key(key)
    dvc_md5 = None
    if dvc:
        from trainguard.provenance.dvc import dvc_tracked_md5

        dvc_md5 = dvc_tracked_md5(data_dir)
    with _progress("hashing", quiet=False) as advance:
        envelope, manifest = sign_dataset(
            data_dir,
            signing_key,
            dataset=dataset,
            version=version,
            expires=expires,
            source=source,
            sources=sources,
            role=role,
            roles=roles,
            previous=out,
            exclude=(out,),
            chunk_size=chunk_mib * 1024 * 1024,
            on_bytes=advance,
            dvc_md5=dvc_md5,
        )
    write_manifest(envelope, out, signing_key.public)
    click.echo(
        f"signed {len(manifest.shards)} shards ({manifest.total_bytes} bytes) of dataset {manifest.dataset!r} "
        f"version {manifest.version} -> {printable(str(out))}; keyid {signing_key.keyid}"
    )


@click.command()
@click.argument("manifest", type=PATH)
@click.option("--key", type=PATH, required=True, help="The co-signer's private key (PEM).")
def cosign(manifest: Path, key: Path) -> None:
    """Add a signature to an existing manifest (for k-of-n trust policies)."""
    from trainguard.provenance.keys import load_signing_key
    from trainguard.provenance.paths import printable
    from trainguard.provenance.signing import cosign_manifest

    signing_key = load_signing_key(key)
    envelope = cosign_manifest(manifest, signing_key)
    click.echo(
        f"added signature of keyid {signing_key.keyid} to {printable(str(manifest))} "
        f"({len(envelope.signatures)} signatures)"
    )


@click.command()
@click.argument("manifest", type=PATH)
@click.option("--trust", type=PATH, required=True, help="Trust policy file (k of n) or a single .pub (1 of 1).")
@click.option("--dataset", help="The dataset name the manifest must carry (refuses a validly signed other dataset).")
@click.option("--data-dir", "--data", "data_dir", type=PATH, help="Shards root (default: the manifest's folder).")
@click.option(
    "--state",
    type=PATH,
    help="Anti-rollback records (default: $TRAINGUARD_HOME, else .trainguard/provenance-state.json here).",
)
@click.option("--allow-extra", is_flag=True, help="Ignore files the manifest does not list.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable report on stdout.")
@click.option("--dvc", is_flag=True, help="Also cross-check md5 against DVC's record of the data dir.")
@click.option("--workers", type=click.IntRange(min=1), help="Hashing threads (default: one per core).")
def verify(
    manifest: Path,
    trust: Path,
    dataset: str | None,
    data_dir: Path | None,
    state: Path | None,
    allow_extra: bool,
    as_json: bool,
    dvc: bool,
    workers: int | None,
) -> None:
    """Verify signatures, expiry, rollback and every shard; exit 1 listing each failing shard and its reason."""
    from trainguard.provenance.ahead import HashAhead

    ahead = None if allow_extra or dvc else HashAhead.start(data_dir or manifest.parent, workers)
    from trainguard.provenance.verify import verify_dataset  # imported while the children hash

    with _progress("verifying", quiet=as_json) as advance:
        report = verify_dataset(
            manifest,
            trust,
            dataset=dataset,
            data_dir=data_dir,
            state=state,
            allow_extra=allow_extra,
            workers=workers,
            on_bytes=advance,
            dvc=dvc,
            ahead=ahead,
        )
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for failure in report.failures:
            click.echo(f"FAIL {failure.line()}", err=True)
        if any(f.reason == "missing" for f in report.failures):
            from trainguard.provenance.paths import printable

            where = "the manifest's folder" if data_dir is None else "--data"
            searched = printable(report.data_dir)
            click.echo(f"shards were looked for under {searched} ({where}; --data DIR to change)", err=True)
        if report.ok:
            click.echo(
                f"OK dataset {report.dataset!r} version {report.version}: {report.shards} shards, "
                f"{report.bytes_checked} bytes in {report.seconds:.2f} s; signed by {', '.join(report.signers)}"
            )
    report.raise_for_failures()


@contextmanager
def _progress(label: str, quiet: bool) -> Iterator[Callable[[int], None] | None]:
    """A rich progress bar on stderr when it is a terminal (never in --json or non-TTY runs)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=None)
        yield lambda count: progress.advance(task, count)
