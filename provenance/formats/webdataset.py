"""WebDataset tar shards: members grouped by key (`000001.png` + `000001.cls`) into one input and one target each,
decoded from verified bytes only, by webdataset's own tar iteration fed an in-memory stream.

`WebDatasetDecoder` is a `Decoder` (the whole shard's verified bytes); `read_webdataset` streams a shard from
`ShardReader.iter_chunks`, so a tampered large tar stops at its first bad chunk. Every sample must hold exactly one
input (.png/.jpg/.jpeg/.webp via Pillow, or .npy without pickle) and one target (.cls integer text, or .json
`{"label": int}` or a list of numbers); any other member, a missing one, a truncated or compressed tar is refused.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from typing_extensions import override

from trainguard.provenance.errors import RecordsMismatchError, ShardError, ShardFormatError, shard_error
from trainguard.provenance.formats import DEFAULT_BOUND, BoundedDecoder, DecodeBound, Samples, check_decode, decoding
from trainguard.provenance.formats.images import MAX_PIXELS, NATIVE_MODES, ImageMode, image_pixels, open_image

if TYPE_CHECKING:
    import numpy as np

    from trainguard.provenance.reader import ShardReader

IMAGES = ("png", "jpg", "jpeg", "webp")
INPUTS = (*IMAGES, "npy")
TARGETS = ("cls", "json")
_BLOCK = 512
_END_OF_ARCHIVE = bytes(2 * _BLOCK)
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
_CLASS = re.compile(rb"\s*(-?\d{1,18})\s*")


@dataclass(frozen=True)
class WebDatasetDecoder(BoundedDecoder):
    """Decodes a WebDataset tar into `Samples`: images as (N, C, H, W) float32 in [0, 1] in `mode`, .npy inputs of
    `npy_dtype`; all inputs of one `shape` (the first sample's when None); at most `records` samples (exactly that
    many when given, or when the reader passes the signed count), each image at most `max_pixels` pixels, all of
    them within the decode bound, each image counted from its header before its pixels are decoded."""

    mode: ImageMode = "RGB"
    shape: tuple[int, ...] | None = None
    records: int | None = None
    max_pixels: int = MAX_PIXELS
    npy_dtype: str = "float32"

    @override
    def __call__(
        self, name: str, data: bytes, *, records: int | None = None, bound: DecodeBound = DEFAULT_BOUND
    ) -> Samples:
        counted = self.records if records is None else records
        return self.decode_chunks(name, (data,), size=len(data), records=counted, bound=bound)

    def decode_chunks(
        self,
        name: str,
        chunks: Iterable[bytes],
        *,
        size: int,
        records: int | None = None,
        bound: DecodeBound = DEFAULT_BOUND,
    ) -> Samples:
        """The samples of a tar of `size` signed bytes given as consecutive verified pieces; every piece is
        consumed (so a verifying iterator reaches its whole-file digest check) before the samples are returned."""
        stream = _VerifiedStream(name, chunks)
        builder = _SampleBuilder(name, self, records, bound.limit(size))
        try:
            with decoding(name):
                for sample in _grouped(name, stream):
                    builder.add(sample)
        except ShardError:
            if stream.failure is not None:  # webdataset rewrites the message of an error raised through it
                raise stream.failure from None
            raise
        stream.drain()
        stream.check_end()
        return builder.samples()


def read_webdataset(reader: ShardReader, name: str, decoder: WebDatasetDecoder | None = None) -> Samples:
    """The samples of tar shard `name`, streamed chunk by chunk from `reader` (each chunk verified before it is
    parsed), within the shard's signed `records` and the reader's decode bound."""
    chosen = decoder or WebDatasetDecoder()
    shard = reader.entry(name)
    records = chosen.records if shard.records is None else shard.records
    chunks = reader.iter_chunks(name)
    return chosen.decode_chunks(name, chunks, size=shard.size, records=records, bound=reader.bound)


def _grouped(name: str, stream: io.RawIOBase) -> Iterator[dict[str, Any]]:
    """webdataset's own member iteration and grouping; a member name without a suffix keeps it as an empty
    suffix (webdataset would skip it silently) so that it is refused as unknown."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    members = tar_file_expander([{"url": name, "stream": stream}], eof_value=None)
    samples: Iterator[dict[str, Any]] = group_by_keys(members, keys=_key_and_suffix)
    return samples


def _key_and_suffix(member: str) -> tuple[str, str]:
    from webdataset.tariterators import base_plus_ext

    key, suffix = base_plus_ext(member)
    return (member, "") if key is None else (key, suffix)


class _VerifiedStream(io.RawIOBase):
    """A read-only file over verified pieces for tarfile's stream mode; keeps a copy of the error of a piece
    that failed verification, and the last bytes seen, for the end-of-archive check."""

    def __init__(self, name: str, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self.name = name
        self.failure: ShardError | None = None
        self.size = 0
        self.tail = b""
        self._chunks = iter(chunks)
        self._pending = memoryview(b"")

    @override
    def readable(self) -> bool:
        return True

    @override
    def __repr__(self) -> str:  # webdataset names the stream in the errors it re-raises: the shard, not an address
        return self.name

    @override
    def readinto(self, target: Any) -> int:
        while not self._pending:
            chunk = self._next()
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def drain(self) -> None:
        """Consumes (and so verifies) every remaining piece."""
        while self._next() is not None:
            pass

    def check_end(self) -> None:
        """Refuses a tar that does not end in whole blocks and the end-of-archive marker: tarfile's stream mode
        stops silently at a truncated header, which would drop the samples after it."""
        if self.size % _BLOCK or self.tail != _END_OF_ARCHIVE:
            message = f"shard {self.name}: truncated tar ({self.size} bytes, no end-of-archive marker)"
            raise ShardFormatError(message, shard=self.name)

    def _next(self) -> bytes | None:
        try:
            chunk = next(self._chunks)
        except StopIteration:
            return None
        except ShardError as error:
            self.failure = shard_error(error.reason, str(error), shard=error.shard)
            raise
        if self.size == 0 and chunk.startswith(_COMPRESSED):
            message = f"shard {self.name}: a compressed tar; sign and read uncompressed .tar shards"
            self.failure = ShardFormatError(message, shard=self.name)
            raise self.failure
        self.size += len(chunk)
        self.tail = (self.tail + chunk[-len(_END_OF_ARCHIVE) :])[-len(_END_OF_ARCHIVE) :]
        return chunk


class _SampleBuilder:
    """Checks and decodes grouped samples one by one, refusing the first that breaks the format or a limit."""

    def __init__(self, name: str, decoder: WebDatasetDecoder, records: int | None, limit: int) -> None:
        self.name = name
        self.decoder = decoder
        self.records = records
        self.limit = limit
        self.shape = decoder.shape
        self.inputs: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.seen: set[str] = set()
        self.decoded = 0

    def add(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"]
        if key in self.seen:
            self._refuse(f"sample {key} appears twice (a sample's members must be adjacent and unique)")
        self.seen.add(key)
        members = {suffix: data for suffix, data in sample.items() if not suffix.startswith("__")}
        unknown = sorted(set(members) - set(INPUTS) - set(TARGETS))
        if unknown:
            expected = ", ".join(f".{s}" for s in (*INPUTS, *TARGETS))
            member = f"{key}.{unknown[0]}" if unknown[0] else key
            self._refuse(f"member {member}: unknown suffix (expected one of {expected})")
        inputs = [s for s in INPUTS if s in members]
        targets = [s for s in TARGETS if s in members]
        if len(inputs) != 1:
            self._refuse(f"sample {key} has {_count(inputs, 'input')} (expected one of .{', .'.join(INPUTS)})")
        if len(targets) != 1:
            self._refuse(f"sample {key} has {_count(targets, 'target')} (expected one .cls or .json)")
        if self.records is not None and len(self.inputs) >= self.records:
            message = f"shard {self.name}: holds more than the signed {self.records} records"
            raise RecordsMismatchError(message, shard=self.name)
        features = self._input(f"{key}.{inputs[0]}", inputs[0], members[inputs[0]])
        target_member = f"{key}.{targets[0]}"
        target = self._target(target_member, targets[0], members[targets[0]])
        self._count(target_member, target.nbytes)
        self.inputs.append(features)
        self.targets.append(target)

    def samples(self) -> Samples:
        import numpy as np

        if not self.inputs:
            self._refuse("holds no samples")
        if self.records is not None and len(self.inputs) != self.records:
            message = f"shard {self.name}: holds {len(self.inputs)} samples, signed {self.records} records"
            raise RecordsMismatchError(message, shard=self.name)
        return Samples(np.stack(self.inputs), np.stack(self.targets))

    def _input(self, member: str, suffix: str, data: bytes) -> np.ndarray:
        """The member's input, counted against the decode bound before it is decoded: an image by its header, an
        array by its header too (`_array` refuses one that declares more than the member holds)."""
        options = self.decoder
        if suffix == "npy":
            features = _array(self.name, member, data, options.npy_dtype)
            self._count(member, features.nbytes)
        else:
            where = f"member {member}"
            image = open_image(self.name, where, data, max_pixels=options.max_pixels)
            self._count(member, 4 * NATIVE_MODES[options.mode] * image.width * image.height)
            features = image_pixels(self.name, where, image, options.mode)
        if self.shape is None:
            self.shape = features.shape
        elif features.shape != self.shape:
            self._refuse(f"member {member} has shape {features.shape}, expected {self.shape}")
        return features

    def _target(self, member: str, suffix: str, data: bytes) -> np.ndarray:
        import numpy as np

        if suffix == "cls":
            match = _CLASS.fullmatch(data)
            if match is None:
                self._refuse(f"member {member} is not an integer class label")
            target = np.asarray(int(match[1]), dtype=np.int64)
        else:
            target = _json_target(self.name, member, data)
        if self.targets and (target.shape, target.dtype) != (self.targets[0].shape, self.targets[0].dtype):
            first = self.targets[0]
            self._refuse(
                f"member {member} is a {target.dtype} target of shape {target.shape}, the first sample's "
                f"is {first.dtype} of shape {first.shape}"
            )
        return target

    def _count(self, member: str, nbytes: int) -> None:
        """Counts `nbytes` more decoded bytes, refusing the shard at `member` once they pass the decode bound."""
        self.decoded += nbytes
        check_decode(self.name, None, self.decoded, None, self.limit, where=f"member {member}")

    def _refuse(self, problem: str) -> NoReturn:
        raise ShardFormatError(f"shard {self.name}: {problem}", shard=self.name)


def _count(found: list[str], what: str) -> str:
    return f"no {what}" if not found else f"{len(found)} {what}s (.{', .'.join(found)})"


def _array(name: str, member: str, data: bytes, dtype: str) -> np.ndarray:
    """A .npy member's array: its header's dtype must be `dtype` and its declared size fit the member, checked
    before any data is read; never unpickles."""
    import numpy as np

    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        headers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in headers:
            raise ValueError(f"npy format version {version} is not supported")
        shape, _, found = headers[version](stream)
        if found != np.dtype(dtype):
            message = f"shard {name}: member {member} holds {found} values, expected {dtype}"
            raise ShardFormatError(message, shard=name)
        if math.prod(shape) * found.itemsize > len(data) - stream.tell():
            raise ValueError(f"its header declares {shape} values, more than it holds")
        return np.asarray(np.load(io.BytesIO(data), allow_pickle=False))
    except (ValueError, OSError, EOFError) as error:
        message = f"shard {name}: member {member} is not a readable .npy array: {error}"
        raise ShardFormatError(message, shard=name) from None


def _json_target(name: str, member: str, data: bytes) -> np.ndarray:
    """`{"label": int}` as an int64 class label, or a list of numbers as a float32 (multi-label) target."""
    import numpy as np

    from trainguard.strictjson import StrictJSONError, loads

    try:
        document = loads(data)
    except (StrictJSONError, ValueError, UnicodeDecodeError):
        document = None
    if isinstance(document, dict) and set(document) == {"label"} and _is_int(document["label"]):
        return np.asarray(document["label"], dtype=np.int64)
    if isinstance(document, list) and all(_is_number(v) for v in document):
        return np.asarray(document, dtype=np.float32)
    message = f'shard {name}: member {member} is not {{"label": <int>}} or a list of numbers'
    raise ShardFormatError(message, shard=name)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)
