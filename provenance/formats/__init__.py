"""Shard formats: each turns one shard's verified bytes into `Samples` — inputs of any shape and their targets —
within decode limits, and from nothing but those bytes (a decoder never opens a path).

One module per format (tables, arrays, WebDataset tars, LitData chunks); a decoder is any callable
`decode(name, data) -> Samples`, so a user's own format plugs in the same way. `decoder_for` picks the decoder of a
shard by its name's suffix; `default_decoders` builds the built-in mapping a caller extends or overrides.

Decoding is bounded by one `DecodeBound`: a shard may decode to at most `ratio` times its signed size and never past
an absolute `ceiling`, whatever its format. A built-in decoder reads headers first (parquet footer and dictionaries,
npy header, zip directory, image headers in a tar) and checks the row count against the shard's signed `records` and
the decoded size against that bound before it decodes, so a small signed shard cannot decode to millions of rows or
exhaust memory; `ShardReader.read_samples` checks any other decoder's output against the same bound. Whatever a
decoder raises on verified bytes surfaces as a ShardError naming the shard (`decoding`), so a caller can refuse that
shard by name and go on.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainguard.provenance.errors import (
    DecodeLimitError,
    ProvenanceError,
    RecordsMismatchError,
    ShardError,
    ShardFormatError,
)
from trainguard.provenance.paths import printable

if TYPE_CHECKING:
    import numpy as np

DECODE_RATIO = 256
"""A shard may decode to at most this many times its signed size by default: room for photos as JPEG decoded to
float32 (50 to 180 times their size at quality 75 to 50), none for a small shard that decodes to gigabytes."""
DECODE_LIMIT = 4 * 1024**3
"""A shard may decode to at most this many bytes by default, however large it is."""


@dataclass(frozen=True)
class DecodeBound:
    """How far one shard may decode: to at most `ratio` times its signed size and never past `ceiling` bytes, so
    that neither one small shard nor many of them together can exhaust memory."""

    ratio: float = DECODE_RATIO
    ceiling: int = DECODE_LIMIT

    def __post_init__(self) -> None:
        if not (0 < self.ratio < math.inf and self.ceiling > 0):
            raise ValueError(
                f"a decode bound needs a positive, finite ratio and ceiling, not {self.ratio}, {self.ceiling}"
            )

    def limit(self, size: int) -> int:
        """The most bytes a shard of `size` signed bytes may decode to."""
        return min(self.ceiling, math.floor(self.ratio * max(size, 1)))


DEFAULT_BOUND = DecodeBound()

Decoder = Callable[[str, bytes], "Samples"]
"""`decode(name, data) -> Samples`: decodes one shard's verified bytes; raises a ShardError (ShardFormatError,
RecordsMismatchError, DecodeLimitError, ...) naming the shard on anything it cannot decode safely (anything else it
raises is turned into one by `decoding`)."""


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
    raise ShardFormatError(f"shard {name}: no decoder for this format (decoders for: {known})", shard=name)


class BoundedDecoder(ABC):
    """A decoder that checks the shard's signed `records` and the decode bound itself, from headers, before it
    decodes; `ShardReader.read_samples` passes both (any other decoder is checked on its output only)."""

    @abstractmethod
    def __call__(
        self, name: str, data: bytes, *, records: int | None = None, bound: DecodeBound = DEFAULT_BOUND
    ) -> Samples:
        """The samples of one shard's verified bytes, within `records` (when signed) and `bound.limit(len(data))`."""


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


def check_decode(
    name: str, rows: int | None, decoded: int, records: int | None, limit: int, *, where: str | None = None
) -> None:
    """Refuses a row count other than the signed `records` and a decoded size over `limit` (reached at `where` in
    the shard, when a decoder counts as it goes)."""
    if records is not None and rows is not None and rows != records:
        raise RecordsMismatchError(f"shard {name}: decodes to {rows} rows, signed {records} records", shard=name)
    if decoded > limit:
        at = f" at {where}" if where else ""
        raise DecodeLimitError(
            f"shard {name}: decodes to about {decoded} bytes{at}, over the {limit}-byte limit",
            shard=name,
        )


@contextmanager
def decoding(name: str, what: str = "decoding") -> Iterator[None]:
    """Whatever a decoder raises on shard `name`'s verified bytes (pyarrow, Pillow, numpy, tarfile, json, litdata, a
    user's code) raised as `undecodable` makes it, so a caller refuses that shard by name instead of failing on it."""
    try:
        yield
    except ProvenanceError:
        raise
    except Exception as error:
        raise undecodable(name, error, what) from error


def undecodable(name: str, error: Exception, what: str = "decoding") -> ShardError:
    """The refusal of shard `name` whose decoding raised `error`, in one line: `decode-limit` for memory it could not
    get, `format` for anything else."""
    if isinstance(error, MemoryError):
        return DecodeLimitError(f"shard {name}: {what} ran out of memory", shard=name)
    first = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)  # not what libraries add
    text = first.strip()
    detail = f": {printable(text.splitlines()[0])}" if text else ""
    return ShardFormatError(f"shard {name}: {what} failed: {type(error).__name__}{detail}", shard=name)
