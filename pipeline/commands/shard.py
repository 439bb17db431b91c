"""`trainguard shard`: turn a folder of labelled images into WebDataset tar shards, or a CSV table into parquet
shards, of a chosen number of samples each, written atomically and optionally signed in the same run."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click

from trainguard.pipeline.commands import PATH

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
@click.option("--out", type=PATH, required=True, help="Folder to write the shards to (must be empty or new).")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True, help="Samples per shard.")
@click.option(
    "--labels",
    type=PATH,
    help="CSV with columns path,label (paths relative to IMAGES); default: the "
    "label of IMAGES/<label>/*.png is its sub-folder's name.",
)
@click.option("--from-csv", "table", type=PATH, help="Shard this CSV table into parquet files instead of images.")
@click.option("--label-column", default="label", show_default=True, help="The label column of --from-csv.")
@click.option("--key", type=PATH, help="Sign the shards with this private key (PEM), writing --manifest.")
@click.option("--manifest", type=PATH, help="Manifest to write with --key (default: OUT/manifest.json).")
@click.option("--dataset", help="Dataset name for the manifest (default: the out folder's name).")
@click.option("--source", help="Contributor id of every shard in the manifest.")
def shard(
    images: Path | None,
    out: Path,
    shard_size: int,
    labels: Path | None,
    table: Path | None,
    label_column: str,
    key: Path | None,
    manifest: Path | None,
    dataset: str | None,
    source: str | None,
) -> None:
    """Write IMAGES (class-per-sub-folder, or listed in --labels) as WebDataset .tar shards, or a --from-csv table
    as .parquet shards, SHARD_SIZE samples each; with --key, sign them like `trainguard sign`."""
    from trainguard.provenance.errors import DataDirError
    from trainguard.provenance.paths import printable

    if (images is None) == (table is None):
        raise click.UsageError("give either IMAGES (a folder of images) or --from-csv TABLE")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataDirError(f"out folder {printable(str(out))} exists and is not empty", path=str(out))
    if images is not None:
        written, samples = _image_shards(images, labels, out, shard_size)
    else:
        written, samples = _table_shards(table, label_column, out, shard_size)  # type: ignore[arg-type]
    click.echo(f"wrote {len(written)} shards ({samples} samples, at most {shard_size} each) to {printable(str(out))}")
    if key is not None:
        _sign(out, key, manifest or out / "manifest.json", dataset, source)


def _image_shards(root: Path, labels: Path | None, out: Path, shard_size: int) -> tuple[list[Path], int]:
    """WebDataset tars of `shard_size` images each: `<index>.<suffix>` holds the image's own bytes (checked to
    decode), `<index>.cls` its label."""
    import io

    from webdataset import TarWriter

    from trainguard.files import atomic_write

    listed = _listed(root, labels) if labels is not None else _by_folder(root)
    if not listed:
        raise _bad_input(f"images folder {root} holds no {'/'.join(IMAGE_SUFFIXES)} images")
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


def _table_shards(table: Path, label_column: str, out: Path, shard_size: int) -> tuple[list[Path], int]:
    """Parquet files of `shard_size` rows each from a CSV table with a `label_column`."""
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
    written = []
    for part, start in enumerate(range(0, len(frame), shard_size)):
        buffer = io.BytesIO()
        frame.iloc[start : start + shard_size].to_parquet(buffer, index=False)
        path = out / f"part-{part:05d}.parquet"
        atomic_write(path, buffer.getvalue())
        written.append(path)
    return written, len(frame)


def _sign(out: Path, key: Path, manifest: Path, dataset: str | None, source: str | None) -> None:
    from trainguard.provenance.keys import load_signing_key
    from trainguard.provenance.paths import printable
    from trainguard.provenance.signing import sign_dataset, write_manifest

    signing_key = load_signing_key(key)
    envelope, signed = sign_dataset(out, signing_key, dataset=dataset, source=source, exclude=(manifest,))
    write_manifest(envelope, manifest)
    click.echo(
        f"signed {len(signed.shards)} shards of dataset {signed.dataset!r} version {signed.version} -> "
        f"{printable(str(manifest))}; keyid {signing_key.keyid}"
    )


def _bad_input(message: str) -> Exception:
    from trainguard.provenance.errors import DataDirError

    return DataDirError(message)
