"""`trainguard keygen | sign | cosign | verify`: signed, hash-verified training-data shards (provenance)."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class KeyTypeChoice(StrEnum):
    ed25519 = "ed25519"
    ecdsa_p256 = "ecdsa-p256"


def keygen(
    out: Annotated[Path, typer.Option("--out", help="Writes OUT.key (mode 0600) and OUT.pub, e.g. keys/alice.")],
    key_type: Annotated[
        KeyTypeChoice, typer.Option("--type", help="ecdsa-p256 for Sigstore / OpenSSF model-signing tooling.")
    ] = KeyTypeChoice.ed25519,
    force: Annotated[bool, typer.Option(help="Overwrite an existing key pair.")] = False,
) -> None:
    """Generate a signing key pair; the private key is encrypted when $TRAINGUARD_KEY_PASSPHRASE is set."""
    from provenance.keys import PASSPHRASE_ENV, generate_signing_key, write_keypair

    key = generate_signing_key(key_type.value)
    passphrase = os.environ.get(PASSPHRASE_ENV, "").encode() or None
    private, public = write_keypair(key, out, passphrase, overwrite=force)
    encrypted = "encrypted" if passphrase else "unencrypted"
    typer.echo(f"wrote {private} ({encrypted}, mode 0600) and {public}; keyid {key.keyid}")


def sign(
    data_dir: Annotated[Path, typer.Argument(help="Dataset root: every file below it becomes a shard.")],
    key: Annotated[Path, typer.Option("--key", help="Private key (PEM).")],
    out: Annotated[Path, typer.Option("--out", help="Manifest to write (DSSE envelope, in-toto Statement v1).")],
    dataset: Annotated[str | None, typer.Option(help="Dataset name (default: the data dir's name).")] = None,
    version: Annotated[
        int | None, typer.Option(min=0, help="Manifest version (default: the one at --out plus 1, else 1).")
    ] = None,
    expires: Annotated[str, typer.Option(help="Lifetime (30d, 12h, 2w) or an RFC 3339 time.")] = "30d",
    source: Annotated[str | None, typer.Option(help="Contributor id of every shard not in --sources.")] = None,
    sources: Annotated[
        str | None, typer.Option(help="JSON file or inline JSON: shard name, glob or folder/ -> contributor id.")
    ] = None,
    role: Annotated[str, typer.Option(help="Role of every shard not in --roles: train or holdout.")] = "train",
    roles: Annotated[str | None, typer.Option(help="JSON file or inline JSON: shard name or glob -> role.")] = None,
    chunk_mib: Annotated[int, typer.Option(min=1, help="Chunk size (MiB) for chunk digests of large shards.")] = 8,
    dvc: Annotated[bool, typer.Option(help="Cross-check every shard against DVC's md5 (.dvc / dvc.lock).")] = False,
) -> None:
    """Hash every shard under DATA_DIR and write a signed manifest."""
    from provenance.keys import load_signing_key
    from provenance.signing import sign_dataset, write_manifest

    signing_key = load_signing_key(key)
    dvc_md5 = None
    if dvc:
        from provenance.dvc import dvc_tracked_md5

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
    write_manifest(envelope, out)
    typer.echo(
        f"signed {len(manifest.shards)} shards ({manifest.total_bytes} bytes) of dataset {manifest.dataset!r} "
        f"version {manifest.version} -> {out}; keyid {signing_key.keyid}"
    )


def cosign(
    manifest: Annotated[Path, typer.Argument(help="Manifest to add a signature to.")],
    key: Annotated[Path, typer.Option("--key", help="The co-signer's private key (PEM).")],
) -> None:
    """Add a signature to an existing manifest (for k-of-n trust policies)."""
    from provenance.keys import load_signing_key
    from provenance.signing import cosign_manifest

    signing_key = load_signing_key(key)
    envelope = cosign_manifest(manifest, signing_key)
    typer.echo(f"added signature of keyid {signing_key.keyid} to {manifest} ({len(envelope.signatures)} signatures)")


def verify(
    manifest: Annotated[Path, typer.Argument(help="Signed manifest.")],
    trust: Annotated[Path, typer.Option("--trust", help="Trust policy file (k of n) or a single .pub (1 of 1).")],
    data_dir: Annotated[Path | None, typer.Option(help="Shards root (default: the manifest's folder).")] = None,
    state: Annotated[
        Path | None, typer.Option(help="Anti-rollback state file (default under $TRAINGUARD_HOME).")
    ] = None,
    allow_extra: Annotated[bool, typer.Option(help="Ignore files the manifest does not list.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a machine-readable report on stdout.")] = False,
    dvc: Annotated[bool, typer.Option(help="Also cross-check md5 against DVC's record of the data dir.")] = False,
    workers: Annotated[int | None, typer.Option(min=1, help="Hashing threads (default: one per core).")] = None,
) -> None:
    """Verify signatures, expiry, rollback and every shard; exit 1 listing each failing shard and its reason."""
    from provenance.verify import verify_dataset

    with _progress("verifying", quiet=as_json) as advance:
        report = verify_dataset(
            manifest,
            trust,
            data_dir=data_dir,
            state=state,
            allow_extra=allow_extra,
            workers=workers,
            on_bytes=advance,
            dvc=dvc,
        )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for failure in report.failures:
            typer.echo(f"FAIL {failure.line()}", err=True)
        if report.ok:
            typer.echo(
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


def _one_line_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Provenance errors leave as the CLI's one line and exit code, without the root handler's import of every
    package's errors (which would import torch on the failure path)."""

    @functools.wraps(command)
    def run(*args: object, **kwargs: object) -> None:
        from provenance.errors import ProvenanceError

        try:
            command(*args, **kwargs)
        except ProvenanceError as error:
            if "--verbose" in sys.argv or "-v" in sys.argv:
                raise
            typer.echo(f"trainguard: error: {error}", err=True)
            raise typer.Exit(error.exit_code) from None

    return run


def register(app: typer.Typer) -> None:
    for command in (keygen, sign, cosign, verify):
        app.command(command.__name__)(_one_line_errors(command))
