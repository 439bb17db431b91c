"""LitData optimized datasets (`litdata.optimize` output: `index.json` and `chunk-*.bin`), verified chunk by chunk.

The seam is litdata's downloader registry: `VerifiedStreamingDataset` is a `litdata.StreamingDataset` whose input
dir is a `trainguard://` URL and whose local dir is a private cache folder. litdata fetches `index.json` and every
chunk through `VerifyingDownloader.download_file`, which copies the shard into the cache in one pass (large reads,
each block hashed and written) and publishes the copy only once the whole signed digest matched, so litdata only ever
parses verified bytes and never opens the user's data dir. Downloads run in litdata's prefetch thread, one chunk at a
time ahead of the reader (each readable as soon as it is verified), in each DataLoader worker; every verified read
and every refusal is appended to a journal file that the main process reads back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming.downloader import Downloader, register_downloader
from litdata.streaming.reader import PrepareChunksThread
from litdata.streaming.resolver import Dir
from typing_extensions import override

from trainguard.provenance.errors import (
    RecordsMismatchError,
    ShardError,
    ShardFormatError,
    UnlistedShardError,
    UnsafePathError,
)
from trainguard.provenance.formats import DEFAULT_BOUND, DecodeBound, Samples, check_decode, decoding, undecodable
from trainguard.provenance.paths import name_problem
from trainguard.provenance.reader import (
    JournalLog,
    ReadLog,
    ShardReader,
    first_refusal,
    journal_entries,
    journal_records,
    journal_refusal,
)

if TYPE_CHECKING:
    from trainguard.provenance.allowlist import AllowList
    from trainguard.provenance.verify import VerifiedManifest

SCHEME = "trainguard://"
INDEX = "index.json"
SAFE_FORMATS = frozenset(
    {"str", "text", "bool", "int", "float", "pil", "jpeg", "bytes", "numpy", "no_header_numpy", "tensor",
     "no_header_tensor"}
)  # fmt: skip
"""litdata serializers that decode without pickle (`pickle`, `graph` and the `file`/media decoders are refused)."""
_SOURCE = "trainguard-source"
_REFUSED_OPTIONS = frozenset({"input_dir", "cache_dir", "index_path", "storage_options", "window_direct_io"})


@dataclass(frozen=True)
class VerifiedSource:
    """What a process needs to verify chunks on its own: the verified manifest, the folder of the optimized dataset
    within its data dir, the allow-list (if any) and the journal file that reads and refusals are appended to."""

    verified: VerifiedManifest
    prefix: str
    journal: Path
    allow: AllowList | None = None

    def shard(self, filename: str) -> str:
        """The manifest name of an optimized dataset's file."""
        return f"{self.prefix}/{filename}" if self.prefix else filename


class VerifyingDownloader(Downloader):  # type: ignore[misc]  # litdata ships no annotations
    """litdata's downloader for `trainguard://` dirs: writes a shard's verified bytes into litdata's cache."""

    def __init__(
        self,
        remote_dir: str,
        cache_dir: str,
        chunks: list[dict[str, Any]],
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(remote_dir, cache_dir, chunks, storage_options)
        if not storage_options or not isinstance(storage_options.get(_SOURCE), VerifiedSource):
            raise ValueError(f"{remote_dir}: {SCHEME} dirs are read through VerifiedStreamingDataset only")
        self._source: VerifiedSource = storage_options[_SOURCE]
        self._reader: ShardReader | None = None
        self._reader_pid = 0
        self._lock = threading.Lock()

    @override
    def __getstate__(self) -> dict[str, Any]:
        state: dict[str, Any] = super().__getstate__()
        state.pop("_reader", None)
        state.pop("_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reader, self._reader_pid, self._lock = None, 0, threading.Lock()

    def reader(self) -> ShardReader:
        """This process's reader of the verified manifest (a forked worker builds its own)."""
        with self._lock:
            if self._reader is None or self._reader_pid != os.getpid():
                source = self._source
                log = JournalLog(source.journal)
                self._reader, self._reader_pid = ShardReader(source.verified, log, source.allow), os.getpid()
            return self._reader

    def download_file(self, remote_filepath: str, local_filepath: str) -> None:
        name = self._source.shard(self._filename(remote_filepath))
        if os.path.exists(local_filepath):  # the cache is private: a file there was published below, verified
            return
        temporary = f"{local_filepath}.tmp.{os.getpid()}.{threading.get_ident()}"
        try:
            self.reader().copy_to(name, temporary)
        except BaseException as error:
            with contextlib.suppress(FileNotFoundError):
                os.remove(temporary)
            if isinstance(error, ShardError):
                journal_refusal(self._source.journal, error)
            raise
        self._publish_file(temporary, local_filepath)

    def _filename(self, remote_filepath: str) -> str:
        base = self._remote_dir.rstrip("/") + "/"
        filename = remote_filepath[len(base) :] if remote_filepath.startswith(base) else ""
        problem = name_problem(filename) or ("not a file of this dataset" if not filename else None)
        if problem is not None:
            raise UnsafePathError(f"shard {filename!r}: {problem}", shard=filename)
        return filename


class VerifiedStreamingDataset(StreamingDataset):  # type: ignore[misc]  # litdata ships no annotations
    """A `litdata.StreamingDataset` over the optimized dataset at `prefix` in a verified manifest's data dir: its
    index and every chunk are verified as litdata fetches them, and litdata parses only the verified cache copies.

    `options` are StreamingDataset's (shuffle, seed, drop_last, max_cache_size, transform, ...); the cache lives in
    a fresh private folder under `cache_dir` (default: the system temp dir), removed when the dataset is collected.
    Each item litdata decodes is held to `bound` against the largest signed chunk (an item comes from one chunk), and
    whatever litdata raises decoding verified chunks is refused as a ShardError naming the dataset.
    """

    def __init__(
        self,
        verified: VerifiedManifest,
        prefix: str = "",
        *,
        allow: AllowList | None = None,
        cache_dir: Path | None = None,
        bound: DecodeBound = DEFAULT_BOUND,
        **options: Any,
    ) -> None:
        refused = sorted(_REFUSED_OPTIONS & options.keys())
        if refused:
            raise ValueError(f"VerifiedStreamingDataset sets {', '.join(refused)} itself: it reads only verified bytes")
        if cache_dir is not None:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="trainguard-litdata-", dir=cache_dir))
        weakref.finalize(self, _remove_private, root, os.getpid())
        chunks = root / "chunks"
        chunks.mkdir()
        self.source = VerifiedSource(verified, prefix.strip("/"), root / "journal.jsonl", allow)
        url = f"{SCHEME}{verified.manifest_sha256[:16]}"
        super().__init__(Dir(path=str(chunks), url=url), storage_options={_SOURCE: self.source}, **options)
        self.posix_fast = None  # litdata maps local chunks in place; these must be read from the verified copies
        self.item_limit = bound.limit(check_index(self.source, (chunks / INDEX).read_bytes()))
        """The most bytes one item may decode to."""

    @property
    def dataset_name(self) -> str:
        """`dataset/prefix`, as errors and samples name this dataset."""
        return "/".join(part for part in (self.source.verified.manifest.dataset, self.source.prefix) if part)

    def __next__(self) -> Any:
        return self._served(super().__next__)

    def __getitem__(self, index: Any) -> Any:
        return self._served(lambda: super(VerifiedStreamingDataset, self).__getitem__(index))

    def _served(self, fetch: Callable[[], Any]) -> Any:
        """The item `fetch` gets from litdata, within the item limit; a chunk's refusal that litdata wrapped is raised
        as it was, and anything else litdata raised as the dataset's refusal, journalled for the main process."""
        try:
            item = fetch()
        except (StopIteration, ShardError):
            raise
        except Exception as error:
            refusal = _wrapped_refusal(error) or undecodable(self.dataset_name, error, "litdata decoding")
            journal_refusal(self.source.journal, refusal)
            raise refusal from None
        try:
            check_decode(self.dataset_name, None, _item_nbytes(item), None, self.item_limit, where="an item")
        except ShardError as refusal:
            journal_refusal(self.source.journal, refusal)
            raise
        return item

    def read_log(self) -> ReadLog:
        """Every verified read of this dataset, in every process (DataLoader workers included), in journal order."""
        return journal_records(self.source.journal)

    def readers(self) -> dict[str, set[int]]:
        """Which processes verified each shard (the ids of DataLoader workers, or of this process)."""
        readers: dict[str, set[int]] = {}
        for entry in journal_entries(self.source.journal):
            if "read" in entry:
                readers.setdefault(entry["read"]["name"], set()).add(entry["pid"])
        return readers

    def refusal(self) -> ShardError | None:
        """The first refusal of a chunk in any process, as the ShardError it raised there."""
        return first_refusal(self.source.journal)


class VerifiedStreamingDataLoader(StreamingDataLoader):  # type: ignore[misc]  # litdata ships no annotations
    """litdata's StreamingDataLoader over a VerifiedStreamingDataset; a refusal in a worker surfaces as its own
    ShardError (torch re-raises a worker's error rebuilt from its traceback text, without `shard` and `reason`)."""

    dataset: VerifiedStreamingDataset

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from super().__iter__()
        except Exception:
            refusal = self.dataset.refusal()
            if refusal is None:
                raise
            raise refusal from None


def check_index(source: VerifiedSource, data: bytes) -> int:
    """Refuses a (verified) `index.json` that names a chunk the manifest does not list, a chunk of another size
    than signed, or items that litdata would decode with pickle or a media decoder outside trainguard's checks;
    returns the signed size of its largest chunk."""
    name = source.shard(INDEX)
    try:
        index = json.loads(data)
        config, chunks = index["config"], index["chunks"]
        formats = {str(kind).split(":")[0] for kind in config["data_format"]}
        compressed = bool(config.get("compression"))
        listed = [(str(chunk["filename"]), int(chunk["chunk_bytes"])) for chunk in chunks]
    except (ValueError, KeyError, TypeError) as error:
        raise ShardFormatError(f"shard {name}: not a litdata index: {error!r}", shard=name) from None
    unsafe = sorted(formats - SAFE_FORMATS)
    if unsafe:
        raise ShardFormatError(
            f"shard {name}: items use litdata serializer(s) {', '.join(unsafe)}, which trainguard does not decode "
            f"(optimize items of {', '.join(sorted(SAFE_FORMATS))})",
            shard=name,
        )
    reader = ShardReader(source.verified, ReadLog(), source.allow)
    largest = 0
    for filename, size in listed:
        chunk = source.shard(filename)
        try:
            entry = reader.entry(chunk)
        except UnlistedShardError:
            message = f"shard {chunk}: named by {name} but not listed in the manifest (re-sign the optimized dataset)"
            raise UnlistedShardError(message, shard=chunk) from None
        if not compressed and entry.size != size:
            message = f"shard {chunk}: {name} gives {size} bytes, the manifest signed {entry.size}"
            raise ShardFormatError(message, shard=chunk)
        largest = max(largest, entry.size)
    return largest


def decode_litdata_items(
    name: str, items: Iterable[Mapping[str, Any]], *, inputs: str = "image", targets: str = "label"
) -> Samples:
    """`Samples` of litdata items such as `{"image": ndarray | PIL image | tensor, "label": int}`: arrays and tensors
    keep their shape, PIL images become (C, H, W); every input must share one shape."""
    with decoding(name):
        return _samples(name, items, inputs, targets)


def _samples(name: str, items: Iterable[Mapping[str, Any]], inputs: str, targets: str) -> Samples:
    xs, ys = [], []
    for position, item in enumerate(items):
        try:
            x, y = item[inputs], item[targets]
        except (KeyError, TypeError):
            keys = sorted(item) if isinstance(item, Mapping) else type(item).__name__
            message = f"shard {name}: item {position} has no {inputs!r} and {targets!r} fields (it has {keys})"
            raise ShardFormatError(message, shard=name) from None
        xs.append(_input_array(x))
        ys.append(np.asarray(y))
    if not xs:
        raise RecordsMismatchError(f"shard {name}: no items to decode", shard=name)
    shapes = sorted({x.shape for x in xs})
    if len(shapes) > 1:
        message = f"shard {name}: items have inputs of different shapes {shapes[:3]}; samples need one shape"
        raise ShardFormatError(message, shard=name)
    return Samples(np.stack(xs), np.stack(ys))


def iter_samples(
    dataset: VerifiedStreamingDataset, batch_size: int, *, inputs: str = "image", targets: str = "label"
) -> Iterator[Samples]:
    """The dataset's items as `Samples` batches of `batch_size` (the last one may be smaller)."""
    batch: list[Mapping[str, Any]] = []
    for item in dataset:
        batch.append(item)
        if len(batch) == batch_size:
            yield decode_litdata_items(dataset.dataset_name, batch, inputs=inputs, targets=targets)
            batch = []
    if batch:
        yield decode_litdata_items(dataset.dataset_name, batch, inputs=inputs, targets=targets)


def _input_array(value: Any) -> np.ndarray:
    from PIL import Image

    if isinstance(value, Image.Image):
        pixels = np.asarray(value)
        return pixels[np.newaxis] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return np.asarray(value)


def _item_nbytes(value: Any) -> int:
    """The bytes an item litdata decoded takes: its arrays, tensors, images, bytes and text, in any nesting."""
    from PIL import Image

    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, Image.Image):
        return value.width * value.height * len(value.getbands())
    if isinstance(value, Mapping):
        return sum(_item_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_item_nbytes(v) for v in value)
    nbytes = getattr(value, "nbytes", 0)  # torch tensors
    return nbytes if isinstance(nbytes, int) else 0


def _wrapped_refusal(error: BaseException) -> ShardError | None:
    """The ShardError behind `error` when litdata wrapped it (its prefetch thread's crash is re-raised as a
    RuntimeError); None when `error` is itself a ShardError or has none behind it."""
    cause = error.__cause__ or error.__context__
    while cause is not None and not isinstance(cause, ShardError):
        cause = cause.__cause__ or cause.__context__
    return None if isinstance(error, ShardError) else cause


def _remove_private(root: Path, owner: int) -> None:
    if os.getpid() == owner:  # a forked worker collecting its copy must not remove the parent's cache
        shutil.rmtree(root, ignore_errors=True)


def _prefetch_verified_chunks_one_at_a_time() -> None:
    """litdata's prefetch thread downloads the chunks of a remote dir in concurrent batches (up to 8) and marks none
    readable until the whole batch is done. A trainguard:// "download" is hashing and copying a local file: CPU work
    that concurrency on a few cores does not speed up, so the reader waited for 8 chunks to be verified before its
    first item. For a VerifyingDownloader the thread downloads one chunk at a time instead, each readable as soon as
    it is verified (still ahead of the reader); every other dataset keeps litdata's choice. Scheduling only: what is
    published, and when, is still decided by `VerifyingDownloader.download_file`."""
    gather = getattr(PrepareChunksThread, "_async_prefetch", None)
    if not callable(gather) or getattr(gather, "trainguard", False):
        return  # another litdata release (it keeps its own scheduling), or this module was loaded already

    def _async_prefetch(self: PrepareChunksThread) -> bool:
        return not isinstance(getattr(self._config, "_downloader", None), VerifyingDownloader) and gather(self)

    _async_prefetch.trainguard = True  # type: ignore[attr-defined]
    PrepareChunksThread._async_prefetch = _async_prefetch


_prefetch_verified_chunks_one_at_a_time()
register_downloader(SCHEME, VerifyingDownloader, overwrite=True)
