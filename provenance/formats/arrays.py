"""NumPy shards from verified bytes: `.npy` holds one table, `.npz` holds an inputs array of any shape and its
targets. Headers are checked (shape, dtype, signed records, decode bound) before any data is read; never unpickles.

`.npy` is a table: a structured array whose `label` field is the target and whose other fields are the features,
or a 2-D array whose `label_column` is the target. Arrays of other shapes go in a `.npz` of two members, inputs
(N, ...) and targets (N,) or (N, ...), named `inputs`/`targets` (or `x`/`y`): pairing separate `.npy` files would
need a naming rule and two shards that must be read, signed and allowed together.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from typing_extensions import override

from trainguard.provenance.errors import RecordsMismatchError, ShardFormatError
from trainguard.provenance.formats import DEFAULT_BOUND, BoundedDecoder, DecodeBound, Samples, check_decode

NPZ_NAMES = (("inputs", "targets"), ("x", "y"))
"""The member pairs an `.npz` shard may hold by default (exactly one pair, nothing else)."""
_NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)


@dataclass(frozen=True)
class NpyHeader:
    """What an npy header declares: the shape and dtype of the array, where its data starts, and its data size."""

    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_npy_header(stream: BinaryIO) -> NpyHeader:
    """The header at the start of `stream` (npy format 1.0 or 2.0); raises ValueError on anything else and on
    object dtypes, which only pickle could load."""
    version = np.lib.format.read_magic(stream)
    header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in header:
        raise ValueError(f"npy format version {version} is not supported")
    shape, _, dtype = header[version](stream)
    if dtype.hasobject:
        raise ValueError(f"dtype {dtype} holds Python objects, which need pickle (never used)")
    return NpyHeader(tuple(int(n) for n in shape), dtype, stream.tell())


def parse_array(
    name: str, data: bytes, *, records: int | None = None, bound: DecodeBound = DEFAULT_BOUND
) -> np.ndarray:
    """A numpy array from verified npy bytes: the header's shape is checked against `records` (when signed) and the
    decode bound before the data is read; never unpickles."""
    try:
        header = read_npy_header(io.BytesIO(data))
        check_decode(name, header.rows, header.nbytes, records, bound.limit(len(data)))
        return np.asarray(np.load(io.BytesIO(data), allow_pickle=False))
    except (ValueError, OSError, EOFError) as error:
        raise ShardFormatError(f"shard {name}: not a readable .npy array: {error}", shard=name) from None


@dataclass(frozen=True)
class NpyDecoder(BoundedDecoder):
    """A `.npy` table: a structured array (field `label` is the target, the other fields float32 features) or a
    2-D numeric array (column `label_column` is the target, the others float32 features)."""

    label: str = "label"
    label_column: int = -1

    @override
    def __call__(
        self, name: str, data: bytes, *, records: int | None = None, bound: DecodeBound = DEFAULT_BOUND
    ) -> Samples:
        table = parse_array(name, data, records=records, bound=bound)
        if table.dtype.names is not None:
            return self._structured(name, table)
        if table.ndim != 2 or table.dtype.kind not in "biuf" or table.shape[1] < 2:
            raise ShardFormatError(
                f"shard {name}: a .npy shard is a table (structured, or 2-D numeric with a label column); this one is "
                f"{table.dtype} of shape {table.shape} (put arrays of other shapes in a .npz of inputs and targets)",
                shard=name,
            )
        column = self.label_column % table.shape[1]
        return Samples(np.delete(table, column, axis=1).astype(np.float32), table[:, column])

    def _structured(self, name: str, table: np.ndarray) -> Samples:
        from numpy.lib import recfunctions

        fields = [f for f in table.dtype.names or () if f != self.label]
        if self.label not in (table.dtype.names or ()) or not fields:
            raise ShardFormatError(
                f"shard {name}: needs a field {self.label!r} and feature fields; has {list(table.dtype.names or ())}",
                shard=name,
            )
        kinds = {f: table.dtype.fields[f][0] for f in [*fields, self.label]}  # type: ignore[index]
        odd = [f"{f} ({kind})" for f, kind in kinds.items() if kind.kind not in "biuf" or kind.shape]
        if odd:
            raise ShardFormatError(f"shard {name}: fields must be numeric scalars: {odd[:3]}", shard=name)
        inputs = recfunctions.structured_to_unstructured(table[fields], dtype=np.float32)
        return Samples(inputs, table[self.label].copy())


@dataclass(frozen=True)
class NpzDecoder(BoundedDecoder):
    """A `.npz` of exactly one inputs/targets pair of `names` (N, ...) and (N,) or (N, ...): every member's header
    is checked (name, dtype, shape, signed records, decode bound) before any member is decompressed."""

    names: Sequence[tuple[str, str]] = NPZ_NAMES

    @override
    def __call__(
        self, name: str, data: bytes, *, records: int | None = None, bound: DecodeBound = DEFAULT_BOUND
    ) -> Samples:
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                inputs, targets = self._members(name, archive)
                headers = [_member_header(name, archive, m) for m in (inputs, targets)]
                if headers[0].rows != headers[1].rows:
                    raise RecordsMismatchError(
                        f"shard {name}: {headers[0].rows} inputs ({inputs.filename}) but {headers[1].rows} targets "
                        f"({targets.filename})",
                        shard=name,
                    )
                decoded = sum(h.nbytes for h in headers)
                check_decode(name, headers[0].rows, decoded, records, bound.limit(len(data)))
                arrays = []
                for member in (inputs, targets):
                    with archive.open(member) as stream:
                        arrays.append(np.lib.format.read_array(stream, allow_pickle=False))
        except _NPZ_ERRORS as error:
            raise ShardFormatError(f"shard {name}: not a readable .npz archive: {error}", shard=name) from None
        return Samples(*arrays)

    def _members(self, name: str, archive: zipfile.ZipFile) -> tuple[zipfile.ZipInfo, zipfile.ZipInfo]:
        """The inputs and targets members: exactly one of the configured pairs, and no other member."""
        members = archive.infolist()
        present = [m.filename for m in members]
        for pair in self.names:
            expected = [f"{n}.npy" for n in pair]
            if sorted(present) == sorted(expected):
                by_name = {m.filename: m for m in members}
                return by_name[expected[0]], by_name[expected[1]]
        pairs = " or ".join("/".join(pair) for pair in self.names)
        unexpected = sorted(set(present) - {f"{n}.npy" for pair in self.names for n in pair})
        detail = f"unexpected members {unexpected[:5]}" if unexpected else f"members {present[:5]}"
        raise ShardFormatError(
            f"shard {name}: a .npz shard holds exactly the arrays {pairs}; found {detail}", shard=name
        )


def _member_header(name: str, archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> NpyHeader:
    """The npy header of one member, which must be a numeric array of at least one axis whose declared
    uncompressed size is exactly its header plus its data (the size that caps decompression)."""
    if member.flag_bits & 0x1:
        raise ValueError(f"member {member.filename} is encrypted")
    if member.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ValueError(f"member {member.filename} uses compression method {member.compress_type}")
    with archive.open(member) as stream:
        try:
            header = read_npy_header(stream)  # type: ignore[arg-type]
        except ValueError as error:
            raise ValueError(f"member {member.filename}: {error}") from None
    if not header.shape or header.dtype.kind not in "biufc":
        raise ShardFormatError(
            f"shard {name}: member {member.filename} is {header.dtype} of shape {header.shape}; expected a numeric "
            "array of shape (N, ...)",
            shard=name,
        )
    if member.file_size != header.offset + header.nbytes:
        raise ValueError(
            f"member {member.filename} declares {member.file_size} bytes, its header "
            f"{header.offset + header.nbytes} bytes"
        )
    return header
