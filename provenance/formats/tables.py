"""Parquet shards from verified bytes: numeric feature columns, fixed-shape tensor columns and image-bytes columns,
each decoded only after the footer is checked against the signed `records` and the decode limits.

Image columns (PNG/JPEG bytes per row) are bounded per image by `max_pixels`, read from each image's header before
any pixel is decoded, and in total by the absolute decode limit only: compressed images legitimately decode to more
than DECODE_RATIO times their size as float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from trainguard.provenance.errors import ShardError
from trainguard.provenance.formats import DECODE_LIMIT, BoundedDecoder, Samples, check_decode, decode_bound
from trainguard.provenance.formats.images import MAX_PIXELS, NATIVE_MODES, image_pixels, open_image

if TYPE_CHECKING:
    import pandas as pd


def read_table(
    name: str, data: bytes, columns: list[str] | None = None, *, records: int | None = None, limit: int = DECODE_LIMIT
) -> pa.Table:
    """An arrow table from verified parquet bytes: the footer is checked against `records` (when signed) and the
    decode limits before any row group is decoded, and each decoded row group counts against them."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
        metadata = parquet.metadata
        schema = parquet.schema_arrow
        widths = sum(max(1, f.type.bit_width // 8) if _fixed_width(f.type) else 1 for f in schema)
        uncompressed = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
        bound = decode_bound(len(data), limit)
        check_decode(name, metadata.num_rows, max(uncompressed, metadata.num_rows * widths), records, bound)
        tables, decoded = [], 0
        for index in range(metadata.num_row_groups):
            table = parquet.read_row_group(index, columns=columns)
            decoded += table.nbytes
            check_decode(name, None, decoded, None, bound)
            tables.append(table)
        table = pa.concat_tables(tables) if tables else schema.empty_table().select(columns or schema.names)
        check_decode(name, table.num_rows, decoded, records, bound)
        return table
    except (pa.ArrowException, ValueError, KeyError) as error:
        raise ShardError(f"shard {name}: not readable as parquet: {error}", shard=name, reason="format") from None


def parse_frame(
    name: str,
    data: bytes,
    columns: list[str] | None = None,
    *,
    records: int | None = None,
    limit: int = DECODE_LIMIT,
) -> pd.DataFrame:
    """A data frame from verified parquet (or npy) bytes, decoded within `records` and the decode limits."""
    if name.endswith(".parquet"):
        return read_table(name, data, columns, records=records, limit=limit).to_pandas()
    if name.endswith(".npy"):
        import pandas as pd

        from trainguard.provenance.formats.arrays import parse_array

        frame = pd.DataFrame(parse_array(name, data, records=records, limit=limit))
        return frame if columns is None else frame[columns]
    raise ShardError(f"shard {name}: unsupported format (use .parquet or .npy)", shard=name, reason="format")


@dataclass(frozen=True)
class ParquetDecoder(BoundedDecoder):
    """A parquet shard as samples: targets from the `label` column; inputs from one column named by `inputs` (a
    fixed-shape tensor, a fixed_size_list reshaped to `shape`, or PNG/JPEG bytes decoded to (N, C, H, W) float32 in
    [0, 1]) or from numeric scalar columns (`inputs` a list, or None for every other column) as (N, F) float32."""

    label: str = "label"
    inputs: str | Sequence[str] | None = None
    shape: tuple[int, ...] | None = None
    max_pixels: int = MAX_PIXELS

    def __call__(self, name: str, data: bytes, *, records: int | None = None, limit: int = DECODE_LIMIT) -> Samples:
        table = read_table(name, data, records=records, limit=limit)
        targets = self._column(name, table, self.label, None, limit)
        if isinstance(self.inputs, str):
            return Samples(self._column(name, table, self.inputs, self.shape, limit), targets)
        names = list(self.inputs) if self.inputs is not None else [c for c in table.column_names if c != self.label]
        if not names:
            raise ShardError(f"shard {name}: no feature columns besides {self.label!r}", shard=name, reason="format")
        features = [self._column(name, table, c, None, limit) for c in names]
        odd = [f"{c} {f.shape[1:]}" for c, f in zip(names, features, strict=True) if f.ndim != 1]
        if odd:
            raise ShardError(
                f"shard {name}: feature columns must be numeric scalars (name one tensor or image column as `inputs`): "
                f"{odd[:3]}",
                shard=name,
                reason="format",
            )
        return Samples(np.column_stack(features).astype(np.float32), targets)

    def _column(self, name: str, table: pa.Table, column: str, shape: tuple[int, ...] | None, limit: int) -> np.ndarray:
        """One column as an array (N, ...) by its arrow type."""
        if column not in table.column_names:
            raise ShardError(
                f"shard {name}: no column {column!r} (has {table.column_names[:8]})", shard=name, reason="format"
            )
        values = table.column(column).combine_chunks()
        kind = values.type
        if values.null_count:
            raise ShardError(
                f"shard {name}: column {column!r} has {values.null_count} null values", shard=name, reason="format"
            )
        if isinstance(kind, pa.FixedShapeTensorType):
            try:
                array = values.to_numpy_ndarray()
            except pa.ArrowException as error:
                raise ShardError(
                    f"shard {name}: tensor column {column!r} ({kind}) does not convert: {error}",
                    shard=name,
                    reason="format",
                ) from None
            if shape is not None and array.shape[1:] != tuple(shape):
                raise ShardError(
                    f"shard {name}: tensor column {column!r} has shape {array.shape[1:]}, declared {tuple(shape)}",
                    shard=name,
                    reason="format",
                )
            return array
        if pa.types.is_fixed_size_list(kind) and _numeric(kind.value_type):
            dims = tuple(shape) if shape is not None else (kind.list_size,)
            if math.prod(dims) != kind.list_size:
                raise ShardError(
                    f"shard {name}: column {column!r} holds {kind.list_size} values per row, declared shape {dims}",
                    shard=name,
                    reason="format",
                )
            return values.flatten().to_numpy(zero_copy_only=False).reshape(len(values), *dims)
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return _decode_images(name, column, values.to_pylist(), self.max_pixels, limit)
        if _numeric(kind):
            return values.to_numpy(zero_copy_only=False)
        raise ShardError(
            f"shard {name}: column {column!r} is {kind}; expected numbers, a fixed-shape tensor, a fixed_size_list "
            "of numbers or image bytes",
            shard=name,
            reason="format",
        )


def _decode_images(name: str, column: str, blobs: list[bytes], max_pixels: int, limit: int) -> np.ndarray:
    """PNG/JPEG bytes, one image per row, as (N, C, H, W) float32 in [0, 1]; every header is checked (pixel cap,
    one common size, total decoded size) before any image is decoded."""
    images = [open_image(name, _where(column, row), blob, max_pixels=max_pixels) for row, blob in enumerate(blobs)]
    shapes = [(NATIVE_MODES.get(i.mode, 3), i.height, i.width) for i in images]
    if len(set(shapes)) > 1:
        row = next(r for r, s in enumerate(shapes) if s != shapes[0])
        raise ShardError(
            f"shard {name}: images of column {column!r} differ in shape: row 0 is {shapes[0]}, row {row} is "
            f"{shapes[row]} (C, H, W)",
            shard=name,
            reason="format",
        )
    decoded = len(images) * math.prod(shapes[0]) * 4 if images else 0
    check_decode(name, None, decoded, None, limit)
    pixels = [image_pixels(name, _where(column, row), image) for row, image in enumerate(images)]
    return np.stack(pixels) if pixels else np.zeros((0, 1, 0, 0), np.float32)


def _where(column: str, row: int) -> str:
    return f"column {column!r} row {row}"


def _numeric(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def _fixed_width(kind: object) -> bool:
    try:
        return kind.bit_width > 0  # type: ignore[attr-defined]
    except ValueError:  # variable-width types (strings, lists) have no bit width
        return False
