"""`trainguard shard`: turn a folder of labelled images into WebDataset tar shards, or a CSV table into parquet
shards, of a chosen number of samples each, written atomically and optionally signed in the same run."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from trainguard.pipeline.commands import PATH
from trainguard.pipeline.commands.data import role_options
from trainguard.provenance.paths import printable

if TYPE_CHECKING:
    from trainguard.provenance.keys import SigningKey
    from trainguard.provenance.manifest import Manifest

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
IMAGE_LIMIT = 1024**3
"""The largest image file read."""


@dataclass(frozen=True)
class LabelledImage:
    """One image file to shard, by its path relative to the images folder, with its integer label."""

    relative: str
    label: int


@click.command()
@click.argument("images", type=PATH, required=False)
@click.option(
    "--out",
    type=PATH,
    required=True,
    help="Folder to write the shards to: empty, new, or this command's earlier output signed by --key (re-sharding "
    "replaces its shards and signs the next version).",
)
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Samples per shard.")
@click.option(
    "--labels",
    type=PATH,
    help="CSV with columns path,label (paths relative to IMAGES); default: the "
    "label of IMAGES/<label>/*.png is its sub-folder's name.",
)
@click.option("--from-csv", "table", type=PATH, help="Shard this CSV table into parquet files instead of images.")
@click.option("--label-column", default="label", show_default=True, help="The label column of --from-csv.")
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the permutation that deals the rows across shards (signed into the manifest).",
)
@click.option(
    "--keep-order",
    is_flag=True,
    help="Keep the rows in their source order (a class-per-folder tree then fills each shard with few classes).",
)
@click.option("--key", type=PATH, help="Sign the shards with this private key (PEM), writing --manifest.")
@click.option(
    "--manifest",
    type=PATH,
    help="Manifest to write with --key (default: OUT/manifest.json); one there already, signed by --key, is "
    "followed by the next version.",
)
@click.option("--dataset", help="Dataset name for the manifest (default: the out folder's name).")
@click.option("--source", help="Contributor id of every shard in the manifest.")
@role_options
def shard(
    images: Path | None,
    out: Path,
    shard_size: int,
    labels: Path | None,
    table: Path | None,
    label_column: str,
    seed: int,
    keep_order: bool,
    key: Path | None,
    manifest: Path | None,
    dataset: str | None,
    source: str | None,
    role: str,
    roles: str | None,
) -> None:
    """Write IMAGES (class-per-sub-folder, or listed in --labels) as WebDataset .tar shards, or a --from-csv table
    as .parquet shards, SHARD_SIZE samples each, the rows shuffled across shards (--seed; --keep-order to keep
    them in order); with --key, sign them like `trainguard sign`, the next version of a manifest already there."""
    from trainguard.provenance.keys import load_signing_key

    if (images is None) == (table is None):
        raise click.UsageError("give either IMAGES (a folder of images) or --from-csv TABLE")
    signing_key = load_signing_key(key) if key is not None else None
    manifest = manifest or out / "manifest.json"
    replaced = _replaceable(out, manifest, signing_key)
    order = None if keep_order else seed
    staging = out if not replaced else Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if images is not None:
            written, samples = _image_shards(images, labels, staging, shard_size, order)
        else:
            written, samples = _table_shards(table, label_column, staging, shard_size, order)  # type: ignore[arg-type]
        if replaced:
            _swap_in(out, staging, replaced, written)
    finally:
        if staging != out:
            shutil.rmtree(staging, ignore_errors=True)
    shuffled = "in source order" if order is None else f"shuffled with seed {order}"
    click.echo(
        f"wrote {len(written)} shards ({samples} samples, at most {shard_size} each, {shuffled}) to "
        f"{printable(str(out))}"
    )
    if signing_key is not None:
        _sign(out, signing_key, manifest, dataset, source, role, roles, order)


def _replaceable(out: Path, manifest: Path, key: SigningKey | None) -> tuple[str, ...]:
    """The shards of an earlier run to replace: `out` may be new or empty, or hold exactly the shards the manifest
    at `manifest` lists (and that manifest's own files, `manifest_files`), when `key` signed it. Anything else in
    `out` is refused unread."""
    from trainguard.provenance.bins import manifest_files
    from trainguard.provenance.errors import DataDirError
    from trainguard.provenance.paths import printable, walk_entries

    earlier = _earlier(manifest, key)
    if not out.exists():
        return ()
    if not out.is_dir():
        raise DataDirError(f"out folder {printable(str(out))} exists and is not a folder", path=str(out))
    present = {name for name, _ in walk_entries(out, manifest_files(manifest))}
    if not present:
        return ()
    listed = {s.name for s in earlier.shards} if earlier is not None else set()
    if earlier is None or not present <= listed:
        why = "" if earlier is None else f" beyond the shards {printable(str(manifest))} lists"
        raise DataDirError(
            f"out folder {printable(str(out))} exists and is not empty{why} (re-sharding replaces only the shards "
            "of a manifest signed by --key)",
            path=str(out),
        )
    return tuple(sorted(present))


def _earlier(manifest: Path, key: SigningKey | None) -> Manifest | None:
    """The manifest already at `manifest`, when there is one and `key` signed it (refused otherwise: its version
    is the one re-signing must follow, and its shards are the ones re-sharding may replace)."""
    from trainguard.provenance.dsse import verify_envelope
    from trainguard.provenance.errors import DataDirError, ProvenanceError
    from trainguard.provenance.manifest import PAYLOAD_TYPE, parse_statement
    from trainguard.provenance.paths import printable
    from trainguard.provenance.verify import read_envelope

    if key is None or not (manifest.exists() or manifest.is_symlink()):
        return None
    try:
        _, envelope = read_envelope(manifest)
        if envelope.payload_type != PAYLOAD_TYPE:
            raise DataDirError(f"payloadType is {envelope.payload_type!r}")
        verify_envelope(envelope, [key.public], 1)
        return parse_statement(envelope.payload)
    except ProvenanceError as error:
        raise DataDirError(
            f"{printable(str(manifest))} is not a manifest signed by --key ({error}); move it away or pass another "
            "--manifest",
            path=str(manifest),
        ) from None


def _swap_in(out: Path, staging: Path, old: Sequence[str], written: Sequence[Path]) -> None:
    """Replaces the earlier run's shards in `out` with the new ones written to `staging` (same file system)."""
    for name in old:
        (out / name).unlink()
    for path in written:
        os.replace(path, out / path.name)


def _dealt(count: int, seed: int | None) -> list[int]:
    """The order rows are written in: a permutation drawn from `seed`, or the source order for None."""
    import numpy as np

    return list(range(count)) if seed is None else np.random.default_rng(seed).permutation(count).tolist()


def _image_shards(
    root: Path, labels: Path | None, out: Path, shard_size: int, seed: int | None
) -> tuple[list[Path], int]:
    """WebDataset tars of `shard_size` images each, in the order `_dealt` draws: `<index>.<suffix>` holds the
    image's own bytes (checked to decode), `<index>.cls` its label."""
    import io

    from webdataset import TarWriter

    from trainguard.files import atomic_write

    listed = _listed(root, labels) if labels is not None else _by_folder(root)
    if not listed:
        raise _bad_input(f"images folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} images")
    listed = [listed[i] for i in _dealt(len(listed), seed)]
    written = []
    for part, start in enumerate(range(0, len(listed), shard_size)):
        buffer = io.BytesIO()
        with TarWriter(buffer, encoder=False, mtime=0.0) as writer:
            for index, image in enumerate(listed[start : start + shard_size], start):
                suffix = Path(image.relative).suffix.lower().lstrip(".")
                data = _image_bytes(root, image.relative)
                writer.write({"__key__": f"{index:08d}", suffix: data, "cls": str(image.label).encode()})
        path = out / f"part-{part:05d}.tar"
        atomic_write(path, buffer.getvalue())
        written.append(path)
    return written, len(listed)


def _by_folder(root: Path) -> list[LabelledImage]:
    """Every image under `root/<label>/`, labelled by its folder (integers as they are, names by sorted order)."""
    from trainguard.provenance.paths import walk_entries

    if not root.is_dir():
        raise _bad_input(f"images folder {root} does not exist or is not a directory")
    found = []
    for relative, kind in sorted(walk_entries(root)):
        parts = relative.split("/")
        if kind != "file" or len(parts) != 2 or not relative.lower().endswith(IMAGE_SUFFIXES):
            raise _bad_input(f"{root / relative}: expected only image files in <label>/ sub-folders ({kind})")
        found.append(parts)
    classes = _class_ids([folder for folder, _ in found])
    return [LabelledImage(f"{folder}/{name}", classes[folder]) for folder, name in found]


def _listed(root: Path, labels: Path) -> list[LabelledImage]:
    """The images a `path,label` CSV lists, relative to `root`."""
    import csv

    from trainguard.files import read_regular
    from trainguard.provenance.paths import name_problem

    try:
        rows = list(csv.DictReader(read_regular(labels).decode("utf-8").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise _bad_input(f"--labels {labels}: not a readable CSV: {error}") from None
    if not rows or set(rows[0]) != {"path", "label"}:
        raise _bad_input(f"--labels {labels}: expected a header row `path,label` and one row per image")
    for line, row in enumerate(rows, 2):
        problem = name_problem(row["path"] or "")
        if problem is not None or not row["path"].lower().endswith(IMAGE_SUFFIXES):
            raise _bad_input(f"--labels {labels} line {line}: {row['path']!r} is not a safe relative image path")
    classes = _class_ids([row["label"] for row in rows])
    return [LabelledImage(row["path"], classes[row["label"]]) for row in rows]


def _class_ids(names: Sequence[str]) -> dict[str, int]:
    """Labels that are all integers map to themselves; otherwise each distinct name to its sorted position."""
    distinct = sorted(set(names))
    if all(_is_int(name) for name in distinct):
        return {name: int(name) for name in distinct}
    classes = {name: index for index, name in enumerate(distinct)}
    click.echo("classes: " + ", ".join(f"{index}={name}" for name, index in classes.items()))
    return classes


def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def _image_bytes(root: Path, relative: str) -> bytes:
    """The image file's bytes, refused unless it is a regular file inside `root` that decodes within the default
    pixel limit."""
    from trainguard.provenance.errors import ShardError
    from trainguard.provenance.formats.images import decode_image

    try:
        data = _read_inside(root, relative)
        decode_image(str(root), f"member {relative}", data)
    except OSError as error:
        raise _bad_input(f"image {root / relative}: {error.strerror or error}") from None
    except ShardError as error:
        raise _bad_input(f"image {root / relative}: {str(error).split(': ', 1)[1]}") from None
    return data


def _read_inside(root: Path, relative: str) -> bytes:
    """The bytes of the regular file `root/relative` (at most IMAGE_LIMIT), opened one component at a time from
    `root` without following a symbolic link, so no link (a class folder or image, planted before or during the
    run) can make a file outside IMAGES a shard's member."""
    nofollow = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
    *folders, name = relative.split("/")
    where = os.open(root, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY)
    try:
        for index, part in enumerate(folders):
            inner = _open_component(part, nofollow | os.O_DIRECTORY, where, "/".join(folders[: index + 1]))
            os.close(where)
            where = inner
        fd = _open_component(name, nofollow | os.O_NONBLOCK, where, relative)
    finally:
        os.close(where)
    with os.fdopen(fd, "rb") as stream:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = stream.read(IMAGE_LIMIT + 1) if info.st_size <= IMAGE_LIMIT else b""
    if info.st_size > IMAGE_LIMIT or len(data) > IMAGE_LIMIT:
        raise OSError(errno.EFBIG, f"larger than the {IMAGE_LIMIT}-byte limit")
    return data


def _open_component(part: str, flags: int, where: int, shown: str) -> int:
    """`part` of the folder open as `where`, refusing a symbolic link by name (`shown`, relative to IMAGES)."""
    try:
        return os.open(part, flags, dir_fd=where)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
            os.stat(part, dir_fd=where, follow_symlinks=False).st_mode
        ):
            raise OSError(errno.ELOOP, f"{shown} is a symbolic link, refused (it may lead outside IMAGES)") from None
        raise


def _table_shards(
    table: Path, label_column: str, out: Path, shard_size: int, seed: int | None
) -> tuple[list[Path], int]:
    """Parquet files of `shard_size` rows each, in the order `_dealt` draws, from a CSV table with a
    `label_column`."""
    import io

    import numpy as np
    import pandas as pd

    from trainguard.files import atomic_write, read_regular

    try:
        frame = pd.read_csv(io.BytesIO(read_regular(table, limit=16 * 1024**3)))
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise _bad_input(f"--from-csv {table}: not a readable CSV table: {error}") from None
    if label_column not in frame.columns:
        raise _bad_input(f"--from-csv {table}: no column {label_column!r} (columns: {', '.join(frame.columns)})")
    if frame.empty:
        raise _bad_input(f"--from-csv {table}: holds no rows")
    # CSV numbers parse as float64; stored as float32, the precision training reads them at and validation expects
    frame = frame.astype({c: np.float32 for c in frame.columns if frame[c].dtype == np.float64})
    frame = frame.iloc[_dealt(len(frame), seed)]
    written = []
    for part, start in enumerate(range(0, len(frame), shard_size)):
        buffer = io.BytesIO()
        frame.iloc[start : start + shard_size].to_parquet(buffer, index=False)
        path = out / f"part-{part:05d}.parquet"
        atomic_write(path, buffer.getvalue())
        written.append(path)
    return written, len(frame)


def _sign(
    out: Path,
    key: SigningKey,
    manifest: Path,
    dataset: str | None,
    source: str | None,
    role: str,
    roles: str | None,
    seed: int | None,
) -> None:
    """Signs `out` as `trainguard sign` does, the version one past the manifest already at `manifest`."""
    from trainguard.provenance.signing import sign_dataset, write_manifest

    envelope, signed = sign_dataset(
        out,
        key,
        dataset=dataset,
        source=source,
        role=role,
        roles=roles,
        previous=manifest,
        exclude=(manifest,),
        shuffle_seed=seed,
    )
    write_manifest(envelope, manifest, key.public)
    click.echo(
        f"signed {len(signed.shards)} shards of dataset {signed.dataset!r} version {signed.version} -> "
        f"{printable(str(manifest))}; keyid {key.keyid}"
    )


def _bad_input(message: str) -> Exception:
    from trainguard.provenance.errors import DataDirError

    return DataDirError(message)
