"""CSV shards from verified bytes, read with pyarrow.csv against a declared schema: every column has an explicit
dtype (nothing is inferred), the header must name exactly the declared columns, and a value that does not fit its
column's dtype is refused naming the column and both dtypes.

A column declared float32 (or float16) is parsed as float64 and narrowed: a finite value that would overflow to inf
is always refused; with `cast=False`, so is any value the narrower dtype cannot hold exactly.
(The module is not named `csv` so that it never stands in for the standard library's.)
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from typing_extensions import override

from trainguard.provenance.errors import MalformedError, ShardError, ShardFormatError
from trainguard.provenance.formats import DEFAULT_BOUND, BoundedDecoder, DecodeBound, Samples, check_decode

_DTYPES = frozenset(
    ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64"]
)
_NARROW = frozenset(["float16", "float32"])
_COLUMN_ERROR = re.compile(r"In CSV column #(\d+)")


@dataclass(frozen=True)
class CsvDecoder(BoundedDecoder):
    """A CSV shard with a header row and the declared `columns` ({name: numpy dtype name}): targets are the `label`
    column, inputs the other columns in declared order as (N, F), in the dtype numpy promotes theirs to (float32
    when every feature is float32)."""

    columns: Mapping[str, str]
    label: str = "label"
    delimiter: str = ","
    cast: bool = True

    def __post_init__(self) -> None:
        unknown = {c: t for c, t in self.columns.items() if t not in _DTYPES}
        if unknown:
            raise MalformedError(f"CSV schema: unsupported dtypes {unknown} (use one of {', '.join(sorted(_DTYPES))})")
        if self.label not in self.columns or len(self.columns) < 2:
            raise MalformedError(f"CSV schema: declare the label column {self.label!r} and at least one feature column")

    @override
    def __call__(
        self, name: str, data: bytes, *, records: int | None = None, bound: DecodeBound = DEFAULT_BOUND
    ) -> Samples:
        parse = pacsv.ParseOptions(delimiter=self.delimiter)
        header = self._header(name, data, parse)
        types = {c: pa.float64() if t in _NARROW else pa.from_numpy_dtype(np.dtype(t)) for c, t in self.columns.items()}
        convert = pacsv.ConvertOptions(
            column_types=types, null_values=[], strings_can_be_null=False, quoted_strings_can_be_null=False
        )
        try:
            table = pacsv.read_csv(io.BytesIO(data), parse_options=parse, convert_options=convert)
        except pa.ArrowException as error:
            raise self._misfit(name, data, parse, header, error) from None
        # Parsed numbers take at most 8 bytes per value of at least 2 bytes of text, so this check after parsing
        # cannot be preceded by a larger allocation than about four times the verified bytes.
        check_decode(name, table.num_rows, table.nbytes, records, bound.limit(len(data)))
        arrays = {c: self._narrow(name, c, table.column(c).to_numpy()) for c in self.columns}
        features = [arrays[c] for c in self.columns if c != self.label]
        return Samples(np.column_stack(features), arrays[self.label])

    def _header(self, name: str, data: bytes, parse: pacsv.ParseOptions) -> list[str]:
        """The header's column names; refuses one that does not name exactly the declared columns, before any value
        is converted."""
        as_text = pacsv.ConvertOptions(column_types=dict.fromkeys(self.columns, pa.string()))
        try:
            header: list[str] = pacsv.open_csv(
                io.BytesIO(data), parse_options=parse, convert_options=as_text
            ).schema.names
        except pa.ArrowException as error:
            raise ShardFormatError(f"shard {name}: not readable as CSV: {error}", shard=name) from None
        missing = [c for c in self.columns if c not in header]
        unexpected = [c for c in header if c not in self.columns]
        duplicated = sorted({c for c in header if header.count(c) > 1})
        if missing or unexpected or duplicated:
            problems = {"missing": missing, "undeclared": unexpected, "repeated": duplicated}
            detail = "; ".join(f"{k} columns {v[:5]}" for k, v in problems.items() if v)
            raise ShardFormatError(f"shard {name}: header does not match the schema: {detail}", shard=name)
        return header

    def _misfit(
        self, name: str, data: bytes, parse: pacsv.ParseOptions, header: list[str], error: pa.ArrowException
    ) -> ShardError:
        """The refusal of a value that does not convert: its column, the dtype its data has and the declared one."""
        found = _COLUMN_ERROR.search(str(error))
        if found is None:
            return ShardFormatError(f"shard {name}: not readable as CSV: {error}", shard=name)
        column = header[int(found.group(1))]
        try:
            only = pacsv.ConvertOptions(include_columns=[column])
            inferred = pacsv.read_csv(io.BytesIO(data), parse_options=parse, convert_options=only)
            holds = _dtype_name(inferred.schema.field(column).type)
        except pa.ArrowException:
            holds = "unreadable"
        detail = str(error).split(": ", 1)[-1]
        return ShardFormatError(
            f"shard {name}: column {column!r} holds {holds} data, declared {self.columns[column]} ({detail})",
            shard=name,
        )

    def _narrow(self, name: str, column: str, values: np.ndarray) -> np.ndarray:
        """The column in its declared dtype; a float64-parsed column narrowed only where that loses no finite value
        (and, with `cast=False`, no precision)."""
        declared = self.columns[column]
        if declared not in _NARROW:
            return values
        with np.errstate(over="ignore"):
            narrowed = values.astype(declared)
        overflow = np.isfinite(values) & ~np.isfinite(narrowed)
        inexact = (narrowed.astype(np.float64) != values) & ~np.isnan(values)
        bad = overflow if self.cast else overflow | inexact
        if bad.any():
            row = int(np.argmax(bad))
            what = "overflows" if overflow[row] else "cannot be held exactly by"
            raise ShardFormatError(
                f"shard {name}: column {column!r} holds float64 data, declared {declared}"
                f"{'' if self.cast else ' with cast: false'}: row {row} value {float(values[row])!r} {what} {declared}",
                shard=name,
            )
        return narrowed


def _dtype_name(kind: pa.DataType) -> str:
    """A numpy-style name for an inferred arrow type (`text` for strings)."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "text"
    try:
        return str(np.dtype(kind.to_pandas_dtype()).name)
    except (NotImplementedError, TypeError):
        return str(kind)
