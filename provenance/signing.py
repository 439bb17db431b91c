"""Signing a dataset directory: hash every shard, build the manifest, sign it in a DSSE envelope (and a Sigstore
bundle beside it); co-signing."""

from __future__ import annotations

import csv
import fnmatch
import json
import os
import re
import tarfile
import zipfile
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from trainguard.files import atomic_write, read_regular
from trainguard.provenance.bins import manifest_files, sign_binned, statement_header, uses_bins, write_binned
from trainguard.provenance.dsse import Envelope, add_signature, sign_envelope
from trainguard.provenance.errors import DataDirError, MalformedError, ProvenanceError
from trainguard.provenance.hashing import FileDigest, ProgressCallback, Whole, digest_files
from trainguard.provenance.keys import SigningKey, VerifyingKey
from trainguard.provenance.manifest import (
    DEFAULT_CHUNK_SIZE,
    PAYLOAD_TYPE,
    ROLES,
    Manifest,
    ShardEntry,
    parse_rfc3339,
    parse_statement,
    statement_bytes,
)
from trainguard.provenance.paths import name_problem, walk_entries
from trainguard.provenance.sigstore_bundle import bundle_json, bundle_path, write_bundle
from trainguard.provenance.verify import read_envelope

_DURATION = re.compile(r"(\d+)([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
SIGNED_WHOLE: tuple[Whole, ...] = ("sha256", "blake3")
"""Every shard is signed with both whole-file digests: SHA-256 names it everywhere, BLAKE3 makes verifying it fast."""


def parse_expiry(text: str, now: datetime) -> datetime:
    """`30d`, `12h`, `2w`, `90m` from now, or an RFC 3339 time; must lie in the future."""
    match = _DURATION.fullmatch(text.strip())
    moment = now + timedelta(**{_UNITS[match[2]]: int(match[1])}) if match else parse_rfc3339(text, "--expires")
    if moment <= now:
        raise MalformedError(f"--expires {text!r} is not in the future")
    return moment


def load_map(value: str | Mapping[str, str] | None, what: str) -> dict[str, str]:
    """A name-or-glob -> value map given as a mapping, inline JSON, or a JSON file path."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        document: object = dict(value)
    else:
        try:
            text = value if value.lstrip().startswith("{") else read_regular(Path(value)).decode("utf-8")
            document = json.loads(text)
        except OSError as error:
            raise MalformedError(f"{what} {value!r}: cannot read: {error.strerror}") from None
        except ValueError as error:
            raise MalformedError(f"{what} {value!r}: not a JSON object or JSON file: {error}") from None
    if not isinstance(document, dict) or not all(isinstance(v, str) for v in document.values()):
        raise MalformedError(f"{what} must map shard names or globs to strings")
    return document


def lookup(name: str, mapping: Mapping[str, str]) -> str | None:
    """Exact name first, then the longest matching glob (`alice/*`), then the first folder prefix (`alice/`)."""
    if name in mapping:
        return mapping[name]
    globs = [p for p in mapping if fnmatch.fnmatchcase(name, p) or (p.endswith("/") and name.startswith(p))]
    return mapping[max(globs, key=len)] if globs else None


def previous_version(out: Path) -> int | None:
    """The version of an existing manifest at `out` (so re-signing grows it), or None."""
    if not out.exists():
        return None
    try:
        _, envelope = read_envelope(out)
        return statement_header(envelope.payload).version
    except ProvenanceError:
        return None


def sign_dataset(data_dir: Path, key: SigningKey, **options: Any) -> tuple[Envelope, Manifest]:
    """Hashes every file of a data folder into a manifest and signs it, so training can verify each shard later.

    The manifest is `build_manifest`'s, signed as one single-file DSSE envelope (write it with `write_manifest`; the
    CLI's `trainguard sign` also writes binned manifests for very many shards).

    Args:
        data_dir: The folder of shards; every regular file under it is signed (symlinks and special files are
            refused).
        key: The private key that signs.
        **options: `build_manifest`'s keywords: `dataset` (default: the folder's name), `version` (default: one
            more than the manifest at `previous`, else 1), `expires` (`"30d"`, `"12h"`, ... or an RFC 3339 time;
            default 30 days), `source`/`role` (every shard's, role default `train`) and `sources`/`roles` (maps
            from names or globs, as mappings, inline JSON or JSON files), `exclude` (paths left out), `chunk_size`,
            `workers`, `on_bytes`, `dvc_md5` (cross-check against DVC's md5s), `now` and `shuffle_seed`.

    Returns:
        The signed envelope and the manifest it holds.

    Raises:
        DataDirError: The folder is missing or empty, or holds an unsafe name, a link, a special file or an
            unreadable file.
        MalformedError: An option is invalid (an expiry not in the future, a map that is not JSON, a shard
            without a source, an unknown role, a dataset or source that is not a simple name).
        DvcMismatchError: With `dvc_md5`, a shard DVC does not track or whose md5 differs.

    Example::

        from pathlib import Path
        from trainguard import sign_dataset
        from trainguard.provenance import load_signing_key, write_manifest

        key = load_signing_key(Path("keys/owner.key"))
        envelope, manifest = sign_dataset(
            Path("data/train"), key, dataset="digits-contributed", sources={"alice/*": "alice"}, expires="90d"
        )
        write_manifest(envelope, Path("data/train.manifest.json"), key.public)
    """
    manifest = build_manifest(data_dir, **options)
    return sign_envelope(PAYLOAD_TYPE, statement_bytes(manifest), key), manifest


def write_signed(
    manifest: Manifest, key: SigningKey, out: Path, *, layout: str = "auto", bins: int | None = None
) -> Path:
    """Signs `manifest` and writes it at `out` in the chosen layout: `single` (one envelope), `bins` (a signed top
    level and `bins` hashed bin files beside it) or `auto` (bins above BIN_THRESHOLD shards); either way with the
    signed envelope's Sigstore bundle beside it."""
    if uses_bins(len(manifest.shards), layout):
        binned = sign_binned(manifest, key, bins)
        write_binned(binned, out)
        write_bundle(binned.envelope, key.public, out)
        return Path(out)
    return write_manifest(sign_envelope(PAYLOAD_TYPE, statement_bytes(manifest), key), out, key.public)


def build_manifest(
    data_dir: Path,
    *,
    dataset: str | None = None,
    version: int | None = None,
    expires: str = "30d",
    source: str | None = None,
    sources: str | Mapping[str, str] | None = None,
    role: str = "train",
    roles: str | Mapping[str, str] | None = None,
    previous: Path | None = None,
    exclude: tuple[Path, ...] = (),
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    workers: int | None = None,
    on_bytes: ProgressCallback | None = None,
    dvc_md5: Mapping[str, str] | None = None,
    now: datetime | None = None,
    shuffle_seed: int | None = None,
) -> Manifest:
    """Hashes every regular file under `data_dir` into a manifest; refuses symlinks and special files.

    Sources and roles come from `sources`/`roles` maps (names or globs) with `source`/`role` as the fallback.
    The version defaults to one more than the manifest at `previous`, else 1. `shuffle_seed` records the seed the
    rows were dealt across the shards with (`trainguard shard`). An excluded manifest's own files (`manifest_files`:
    its Sigstore bundle and bins folder, written beside it, maybe inside the data folder) are excluded with it.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataDirError(f"data dir {data_dir} does not exist or is not a directory", path=str(data_dir))
    moment = (now or datetime.now(UTC)).replace(microsecond=0)
    expiry = parse_expiry(expires, moment)
    name = dataset or data_dir.resolve().name
    source_map, role_map = load_map(sources, "--sources"), load_map(roles, "--roles")
    files: dict[str, Path] = {}
    for relative, kind in walk_entries(data_dir, tuple(own for path in exclude for own in manifest_files(path))):
        where = repr(str(data_dir / relative))
        problem = name_problem(relative)
        if problem is not None:
            raise DataDirError(f"{where}: unsafe shard name: {problem}", path=relative)
        if kind != "file":
            raise DataDirError(f"{where}: a {kind} cannot be signed as a shard", path=relative)
        files[relative] = data_dir / relative
    if not files:
        raise DataDirError(f"data dir {data_dir} holds no files to sign", path=str(data_dir))
    sizes = {relative: os.lstat(path).st_size for relative, path in files.items()}
    md5 = dvc_md5 is not None
    digests = digest_files(
        files, workers=workers, chunk_size=chunk_size, md5=md5, on_bytes=on_bytes, sizes=sizes, whole=SIGNED_WHOLE
    )
    shards = []
    for relative in sorted(files):
        digest = digests[relative]
        if isinstance(digest, ProvenanceError):
            raise DataDirError(str(digest), path=relative)
        if dvc_md5 is not None:
            _cross_check(relative, digest, dvc_md5)
        shards.append(_entry(relative, files[relative], digest, source_map, source, role_map, role, chunk_size))
    if version is None:
        last = previous_version(previous) if previous is not None else None
        version = 1 if last is None else last + 1
    manifest = Manifest(name, version, moment, expiry, tuple(shards), chunk_size, shuffle_seed)
    parse_statement(statement_bytes(manifest))  # what we sign must parse back: names, sources and roles are valid
    return manifest


def _entry(
    relative: str,
    path: Path,
    digest: FileDigest,
    source_map: Mapping[str, str],
    source: str | None,
    role_map: Mapping[str, str],
    role: str,
    chunk_size: int,
) -> ShardEntry:
    shard_source = lookup(relative, source_map) or source
    if shard_source is None:
        raise MalformedError(f"shard {relative} has no source: pass --source ID or list it in --sources")
    shard_role = lookup(relative, role_map) or role
    if shard_role not in ROLES:
        raise MalformedError(f"shard {relative}: role {shard_role!r} is not one of {', '.join(ROLES)}")
    chunks = digest.chunks if digest.size > chunk_size else ()
    assert digest.sha256 is not None and digest.blake3 is not None  # SIGNED_WHOLE asks for both
    return ShardEntry(
        relative, digest.sha256, digest.size, shard_source, shard_role, record_count(path), chunks, digest.blake3
    )


def _cross_check(relative: str, digest: FileDigest, dvc_md5: Mapping[str, str]) -> None:
    from trainguard.provenance.errors import DvcMismatchError

    tracked = dvc_md5.get(relative)
    if tracked is None:
        raise DvcMismatchError(f"shard {relative}: not tracked by DVC (run `dvc add` first)", shard=relative)
    if tracked != digest.md5:
        raise DvcMismatchError(
            f"shard {relative}: md5 {digest.md5} differs from DVC's {tracked}: data changed since `dvc add`",
            shard=relative,
        )


def record_count(path: Path) -> int | None:
    """How many samples a shard holds, read from its metadata where the format has it: parquet rows, the first
    axis of an npy (or an npz's inputs), CSV data rows, WebDataset sample keys; None for other formats."""
    counters = {".parquet": _parquet_rows, ".npy": _npy_rows, ".npz": _npz_rows, ".csv": _csv_rows, ".tar": _tar_keys}
    count = counters.get(path.suffix)
    try:
        return count(path) if count is not None else None
    except (OSError, ValueError, KeyError, tarfile.TarError, zipfile.BadZipFile):
        return None  # a shard we cannot parse is still signed; its format is the owner's business


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)


def _npy_rows(path: Path) -> int:
    from trainguard.provenance.formats.arrays import read_npy_header

    with path.open("rb") as stream:
        shape = read_npy_header(stream).shape
    return int(shape[0]) if shape else 1


def _npz_rows(path: Path) -> int:
    from trainguard.provenance.formats.arrays import NPZ_NAMES, read_npy_header

    with zipfile.ZipFile(path) as archive:
        members = set(archive.namelist())
        inputs = next(f"{pair[0]}.npy" for pair in NPZ_NAMES if f"{pair[0]}.npy" in members)
        with archive.open(inputs) as stream:
            shape = read_npy_header(stream).shape  # type: ignore[arg-type]
    return int(shape[0]) if shape else 1


def _csv_rows(path: Path) -> int:
    with path.open(newline="", encoding="utf-8") as stream:
        return max(0, sum(1 for _ in csv.reader(stream)) - 1)


def _tar_keys(path: Path) -> int:
    """WebDataset samples: distinct keys (`dir/000001` of `dir/000001.png`) among the regular members."""
    with tarfile.open(path, "r:") as tar:
        names = [member.name for member in tar if member.isfile()]
    return len({f"{folder}/{base.split('.', 1)[0]}" for folder, _, base in (n.rpartition("/") for n in names)})


def cosign_manifest(path: Path, key: SigningKey) -> Envelope:
    """Adds `key`'s signature to the manifest at `path` (rewritten atomically), for k-of-n trust policies.

    The Sigstore bundle beside it is left as it is: it carries one signature (the first signer's), which the
    unchanged payload keeps valid.

    Args:
        path: A signed manifest file, single-file or the top level of a binned manifest.
        key: The private key that co-signs.

    Returns:
        The envelope as written, with `key`'s signature added.

    Raises:
        MalformedError: The file cannot be read or parsed, its payloadType is not a manifest's, or its statement
            is malformed.
        AlreadySignedError: `key` has already signed it.
    """
    _, envelope = read_envelope(path)
    if envelope.payload_type != PAYLOAD_TYPE:
        raise MalformedError(f"{path}: payloadType is {envelope.payload_type!r}, not {PAYLOAD_TYPE}")
    statement_header(envelope.payload)  # either layout: a binned top level is co-signed like a single file
    signed = add_signature(envelope, key)
    write_manifest(signed, path)
    return signed


def write_manifest(envelope: Envelope, out: Path, signer: VerifyingKey | None = None) -> Path:
    """Writes the envelope atomically (unpredictable temp file + rename: a planted link is never followed), and
    with `signer` the Sigstore bundle of its signature beside it (`NAME.json` -> `NAME.sigstore.json`).

    Args:
        envelope: The signed envelope, e.g. from `sign_dataset` or `add_signature`.
        out: The manifest file to write (replaced if it exists).
        signer: The public key whose signature the bundle carries; None writes the envelope alone.

    Returns:
        `out`, as a Path.

    Raises:
        UntrustedSignerError: `signer` has no valid signature in the envelope (nothing is written).
    """
    out = Path(out)
    bundle = bundle_json(envelope, signer) if signer is not None else None
    atomic_write(out, envelope.to_json())
    if bundle is not None:
        atomic_write(bundle_path(out), bundle)
    return out
