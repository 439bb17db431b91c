"""Shard formats: each turns one shard's verified bytes into `Samples` — inputs of any shape and their targets —
within decode limits, and from nothing but those bytes (a decoder never opens a path).

One module per format (tables, arrays, WebDataset tars, LitData chunks); a decoder is any callable
`decode(name, data) -> Samples`, so a user's own format plugs in the same way. `decoder_for` picks the decoder of a
shard by its name's suffix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainguard.provenance.errors import ShardError

if TYPE_CHECKING:
    import numpy as np

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
