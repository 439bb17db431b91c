"""Parquet shards from verified bytes: numeric feature columns, fixed-shape tensor columns and image-bytes columns,
each decoded only after the footer is checked against the signed `records` and the decode bound.

Byte-array columns are read dictionary-encoded and counted at their decoded size before they are decoded, so a
small dictionary value repeated over many rows cannot expand unchecked; image columns (PNG/JPEG bytes per row) are
bounded per image by `max_pixels` and together by the same decode bound, both read from each image's header before
any pixel is decoded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from typing_extensions import override

from trainguard.provenance.errors import ShardFormatError
from trainguard.provenance.formats import DEFAULT_BOUND, BoundedDecoder, DecodeBound, Samples, check_decode
from trainguard.provenance.formats.images import MAX_PIXELS, NATIVE_MODES, image_pixels, open_image

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow.parquet as pq

_LEAF_BYTES = {"BOOLEAN": 1, "INT32": 4, "INT64": 8, "INT96": 12, "FLOAT": 4, "DOUBLE": 8}
"""Decoded bytes per value of each fixed-width parquet physical type (booleans as numpy holds them)."""


def read_table(
    name: str,
    data: bytes,
    columns: list[str] | None = None,
    *,
    records: int | None = None,
    bound: DecodeBound = DEFAULT_BOUND,
) -> pa.Table:
    """An arrow table from verified parquet bytes: the footer is checked against `records` (when signed) and the
    decode bound before any row group is decoded, and each row group counts against it as decoded, its dictionary
    columns at the size they will take decoded, before they are."""
    import pyarrow.parquet as pq

    limit = bound.limit(len(data))
    try:
        metadata = pq.read_metadata(pa.BufferReader(data))
        stored = metadata.schema.to_arrow_schema()
        expanded = [f.name for f in stored if _byte_array(f.type)]
        parquet = pq.ParquetFile(pa.BufferReader(data), metadata=metadata, read_dictionary=expanded)
        check_decode(name, metadata.num_rows, _declared_nbytes(metadata), records, limit)
        tables, decoded = [], 0
        for index in range(metadata.num_row_groups):
            table = parquet.read_row_group(index, columns=columns)
            decoded += _decoded_nbytes(table)
            check_decode(name, None, decoded, None, limit)
            tables.append(table)
        table = pa.concat_tables(tables) if tables else stored.empty_table().select(columns or stored.names)
        check_decode(name, table.num_rows, decoded, records, limit)
        return _decode_dictionaries(table, stored, expanded)
    except (pa.ArrowException, ValueError, KeyError) as error:
        raise ShardFormatError(f"shard {name}: not readable as parquet: {error}", shard=name) from None


def _declared_nbytes(metadata: pq.FileMetaData) -> int:
    """What the footer says the shard decodes to: its uncompressed size, or its values at their width (run-length
    and dictionary encodings make many values of a few bytes; byte arrays count one byte each here, their real size
    when read), whichever is larger."""
    widths = [
        metadata.schema.column(i).length or 1
        if metadata.schema.column(i).physical_type == "FIXED_LEN_BYTE_ARRAY"
        else _LEAF_BYTES.get(metadata.schema.column(i).physical_type, 1)
        for i in range(metadata.num_columns)
    ]
    uncompressed, values = 0, 0
    for index in range(metadata.num_row_groups):
        group = metadata.row_group(index)
        uncompressed += group.total_byte_size
        values += sum(group.column(i).num_values * widths[i] for i in range(group.num_columns))
    return max(uncompressed, values)


def _decoded_nbytes(table: pa.Table) -> int:
    """The bytes `table` takes once its dictionary columns are decoded, computed from the dictionaries and their
    indices without decoding them."""
    import pyarrow.compute as pc

    total = 0
    for column in table.columns:
        for chunk in column.chunks:
            if not pa.types.is_dictionary(chunk.type):
                total += chunk.nbytes
            elif _byte_array(chunk.type.value_type):
                lengths = pc.take(pc.binary_length(chunk.dictionary), chunk.indices)
                total += 8 * len(chunk) + (pc.sum(lengths).as_py() or 0)
            elif _fixed_width(chunk.type.value_type):
                total += len(chunk) * max(1, chunk.type.value_type.bit_width // 8)
            else:  # a dictionary of nested values: at most the whole dictionary per row
                total += len(chunk) * chunk.dictionary.nbytes
    return total


def _decode_dictionaries(table: pa.Table, stored: pa.Schema, expanded: list[str]) -> pa.Table:
    """`table` with the columns read dictionary-encoded only for counting back in their stored type."""
    for column in expanded:
        if column in table.column_names:
            index = table.column_names.index(column)
            table = table.set_column(index, column, table.column(column).cast(stored.field(column).type))
    return table


def _byte_array(kind: pa.DataType) -> bool:
    return any(
        check(kind)
        for check in (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_string, pa.types.is_large_string)
    )


def parse_frame(
    name: str,
    data: bytes,
    columns: list[str] | None = None,
    *,
    records: int | None = None,
    bound: DecodeBound = DEFAULT_BOUND,
) -> pd.DataFrame:
    """A data frame from verified parquet (or npy) bytes, decoded within `records` and the decode bound."""
    if name.endswith(".parquet"):
        return read_table(name, data, columns, records=records, bound=bound).to_pandas()
    if name.endswith(".npy"):
        import pandas as pd

        from trainguard.provenance.formats.arrays import parse_array

        frame = pd.DataFrame(parse_array(name, data, records=records, bound=bound))
        return frame if columns is None else frame[columns]
    raise ShardFormatError(f"shard {name}: unsupported format (use .parquet or .npy)", shard=name)


@dataclass(frozen=True)
class ParquetDecoder(BoundedDecoder):
    """A parquet shard as samples: targets from the `label` column; inputs from one column named by `inputs` (a
    fixed-shape tensor, a fixed_size_list reshaped to `shape`, or PNG/JPEG bytes decoded to (N, C, H, W) float32 in
    [0, 1]) or from numeric scalar columns (`inputs` a list, or None for every other column) as (N, F) float32."""

    label: str = "label"
    inputs: str | Sequence[str] | None = None
    shape: tuple[int, ...] | None = None
    max_pixels: int = MAX_PIXELS

    @override
    def __call__(
        self, name: str, data: bytes, *, records: int | None = None, bound: DecodeBound = DEFAULT_BOUND
    ) -> Samples:
        limit = bound.limit(len(data))
        table = read_table(name, data, records=records, bound=bound)
        targets = self._column(name, table, self.label, None, limit)
        if isinstance(self.inputs, str):
            return Samples(self._column(name, table, self.inputs, self.shape, limit), targets)
        names = list(self.inputs) if self.inputs is not None else [c for c in table.column_names if c != self.label]
        if not names:
            raise ShardFormatError(f"shard {name}: no feature columns besides {self.label!r}", shard=name)
        check_decode(name, None, 4 * table.num_rows * len(names), None, limit)  # as float32 features
        features = [self._column(name, table, c, None, limit) for c in names]
        odd = [f"{c} {f.shape[1:]}" for c, f in zip(names, features, strict=True) if f.ndim != 1]
        if odd:
            raise ShardFormatError(
                f"shard {name}: feature columns must be numeric scalars (name one tensor or image column as `inputs`): "
                f"{odd[:3]}",
                shard=name,
            )
        return Samples(np.column_stack(features).astype(np.float32), targets)

    def _column(self, name: str, table: pa.Table, column: str, shape: tuple[int, ...] | None, limit: int) -> np.ndarray:
        """One column as an array (N, ...) by its arrow type."""
        if column not in table.column_names:
            raise ShardFormatError(f"shard {name}: no column {column!r} (has {table.column_names[:8]})", shard=name)
        values = table.column(column).combine_chunks()
        kind = values.type
        if values.null_count:
            raise ShardFormatError(f"shard {name}: column {column!r} has {values.null_count} null values", shard=name)
        if isinstance(kind, pa.FixedShapeTensorType):
            try:
                array: np.ndarray = values.to_numpy_ndarray()
            except pa.ArrowException as error:
                raise ShardFormatError(
                    f"shard {name}: tensor column {column!r} ({kind}) does not convert: {error}",
                    shard=name,
                ) from None
            if shape is not None and array.shape[1:] != tuple(shape):
                raise ShardFormatError(
                    f"shard {name}: tensor column {column!r} has shape {array.shape[1:]}, declared {tuple(shape)}",
                    shard=name,
                )
            return array
        if pa.types.is_fixed_size_list(kind) and _numeric(kind.value_type):
            dims = tuple(shape) if shape is not None else (kind.list_size,)
            if math.prod(dims) != kind.list_size:
                raise ShardFormatError(
                    f"shard {name}: column {column!r} holds {kind.list_size} values per row, declared shape {dims}",
                    shard=name,
                )
            return np.asarray(values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), *dims))
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return _decode_images(name, column, values.to_pylist(), self.max_pixels, limit)
        if _numeric(kind):
            return np.asarray(values.to_numpy(zero_copy_only=False))
        raise ShardFormatError(
            f"shard {name}: column {column!r} is {kind}; expected numbers, a fixed-shape tensor, a fixed_size_list "
            "of numbers or image bytes",
            shard=name,
        )


def _decode_images(name: str, column: str, blobs: list[bytes], max_pixels: int, limit: int) -> np.ndarray:
    """PNG/JPEG bytes, one image per row, as (N, C, H, W) float32 in [0, 1]; every header is checked (pixel cap,
    one common size, total decoded size) before any image is decoded."""
    images = [open_image(name, _where(column, row), blob, max_pixels=max_pixels) for row, blob in enumerate(blobs)]
    shapes = [(NATIVE_MODES.get(i.mode, 3), i.height, i.width) for i in images]
    if len(set(shapes)) > 1:
        row = next(r for r, s in enumerate(shapes) if s != shapes[0])
        raise ShardFormatError(
            f"shard {name}: images of column {column!r} differ in shape: row 0 is {shapes[0]}, row {row} is "
            f"{shapes[row]} (C, H, W)",
            shard=name,
        )
    decoded = len(images) * math.prod(shapes[0]) * 4 if images else 0
    check_decode(name, None, decoded, None, limit)
    pixels = [image_pixels(name, _where(column, row), image) for row, image in enumerate(images)]
    return np.stack(pixels) if pixels else np.zeros((0, 1, 0, 0), np.float32)


def _where(column: str, row: int) -> str:
    return f"column {column!r} row {row}"


def _numeric(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind))


def _fixed_width(kind: pa.DataType) -> bool:
    try:
        return bool(kind.bit_width > 0)
    except ValueError:  # variable-width types (strings, lists) have no bit width
        return False
