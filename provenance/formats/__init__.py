"""Shard formats: each turns one shard's verified bytes into `Samples` — inputs of any shape and their targets —
within decode limits, and from nothing but those bytes (a decoder never opens a path).

One module per format (tables, arrays, WebDataset tars, LitData chunks); a decoder is any callable
`decode(name, data) -> Samples`, so a user's own format plugs in the same way. `decoder_for` picks the decoder of a
shard by its name's suffix; `default_decoders` builds the built-in mapping a caller extends or overrides.

Decoding is bounded: a built-in decoder reads headers first (parquet footer, npy header, zip directory) and checks
the row count against the shard's signed `records` and the decoded size against DECODE_RATIO times the file size
and an absolute limit before it decodes, so a small signed shard cannot decode to millions of rows or exhaust memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainguard.provenance.errors import ShardError

if TYPE_CHECKING:
    import numpy as np

DECODE_RATIO = 64
"""A shard may decode to at most this many times its file size."""
DECODE_LIMIT = 4 * 1024**3
"""A shard may decode to at most this many bytes (the default of `ShardReader(decode_limit=)`)."""

Decoder = Callable[[str, bytes], "Samples"]
"""`decode(name, data) -> Samples`: decodes one shard's verified bytes; raises ShardError (reason `format`,
`records-mismatch`, `decode-limit`, ...) naming the shard on anything it cannot decode safely."""


@dataclass(frozen=True)
class Samples:
    """The decoded examples of one shard: `inputs` (N, ...) keep their shape (rows, images (N, C, H, W), tensors),
    `targets` (N,) class labels or (N, ...) regression / multi-label targets."""

    inputs: np.ndarray
    targets: np.ndarray

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.targets):
            raise ValueError(f"{len(self.inputs)} inputs but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def concat(cls, parts: Sequence[Samples]) -> Samples:
        """The samples of several shards, in order; all inputs must share one shape."""
        import numpy as np

        if not parts:
            raise ValueError("no samples to concatenate")
        shapes = {p.inputs.shape[1:] for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"shards decode to different input shapes: {sorted(shapes)}")
        return cls(np.concatenate([p.inputs for p in parts]), np.concatenate([p.targets for p in parts]))


def decoder_for(name: str, decoders: Mapping[str, Decoder]) -> Decoder:
    """The decoder registered for the longest suffix of `name` (`.tar`, `.npz`, `.parquet`, ...)."""
    for suffix in sorted(decoders, key=len, reverse=True):
        if name.endswith(suffix):
            return decoders[suffix]
    known = ", ".join(sorted(decoders)) or "none"
    raise ShardError(f"shard {name}: no decoder for this format (decoders for: {known})", shard=name, reason="format")


class BoundedDecoder(ABC):
    """A decoder that checks the shard's signed `records` and the decode limits itself, from headers, before it
    decodes; `ShardReader.read_samples` passes both (any other decoder is checked on its output only)."""

    @abstractmethod
    def __call__(self, name: str, data: bytes, *, records: int | None = None, limit: int = DECODE_LIMIT) -> Samples:
        """The samples of one shard's verified bytes, within `records` (when signed) and `limit`."""


def default_decoders(
    overrides: Mapping[str, Decoder] | None = None,
    *,
    label: str = "label",
    csv_columns: Mapping[str, str] | None = None,
) -> dict[str, Decoder]:
    """The built-in decoders by suffix: `.npy` tables, `.npz` arrays, `.parquet` tables (label column `label`) and,
    when `csv_columns` declares their schema, `.csv` files; `overrides` are laid over them, so a caller's decoder
    wins for its suffix."""
    from trainguard.provenance.formats.arrays import NpyDecoder, NpzDecoder
    from trainguard.provenance.formats.delimited import CsvDecoder
    from trainguard.provenance.formats.tables import ParquetDecoder

    decoders: dict[str, Decoder] = {".npy": NpyDecoder(label), ".npz": NpzDecoder(), ".parquet": ParquetDecoder(label)}
    if csv_columns is not None:
        decoders[".csv"] = CsvDecoder(csv_columns, label)
    return decoders | dict(overrides or {})


def decode_bound(size: int, limit: int) -> int:
    """The most bytes a shard of `size` bytes may decode to."""
    return min(limit, DECODE_RATIO * max(size, 1))


def check_decode(name: str, rows: int | None, decoded: int, records: int | None, bound: int) -> None:
    """Refuses a row count other than the signed `records` and a decoded size over `bound`."""
    if records is not None and rows is not None and rows != records:
        raise ShardError(
            f"shard {name}: decodes to {rows} rows, signed {records} records", shard=name, reason="records-mismatch"
        )
    if decoded > bound:
        raise ShardError(
            f"shard {name}: decodes to about {decoded} bytes, over the {bound}-byte limit",
            shard=name,
            reason="decode-limit",
        )
