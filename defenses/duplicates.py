"""Rows that shards of several sources share (the same inputs, whatever their labels), and who keeps them.

A copy does not say who copied whom, so it never costs a shard more than the copied rows, and a newcomer never
evicts what was accepted before: a shared row stays in the shards of the highest standing that hold it (trusted,
then accepted in an earlier cycle) when those are of one source, and is dropped from every other shard holding it.
Rows shared only by new shards, or by earlier-accepted shards of several sources, are dropped from all of them.
A decoy holding one copied row of each of several honest shards thus costs each of them that row, never the shard,
and the decoy loses its copies (a relabelled copy is never trained on beside the original).
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Standing(IntEnum):
    """How settled a shard is; the higher keeps a shared row."""

    NEW = 0
    ACCEPTED = 1  # accepted in an earlier cycle, this content
    TRUSTED = 2  # the curator's unscreened base: always keeps its rows


@dataclass(frozen=True)
class Rows:
    """One shard's inputs (rows first), its source and standing."""

    name: str
    source: str
    inputs: np.ndarray
    standing: Standing = Standing.NEW


def row_digests(inputs: np.ndarray) -> list[bytes]:
    """A digest per row of its float32 inputs (-0.0 read as 0.0), so equal rows collide whatever their shape."""
    flat = np.ascontiguousarray(np.asarray(inputs, dtype=np.float32).reshape(len(inputs), -1)) + np.float32(0.0)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat]


def shared_rows(shards: Sequence[Rows]) -> dict[str, tuple[int, ...]]:
    """Shard name -> the rows it must drop because shards of other sources hold them too (see the module)."""
    holders: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for index, shard in enumerate(shards):
        for row, digest in enumerate(row_digests(shard.inputs)):
            holders[digest].append((index, row))
    dropped: dict[str, set[int]] = defaultdict(set)
    for held in holders.values():
        if len({shards[i].source for i, _ in held}) < 2:
            continue
        keep = _keepers([shards[i] for i, _ in held])
        for index, row in held:
            if shards[index].name not in keep:
                dropped[shards[index].name].add(row)
    return {name: tuple(sorted(rows)) for name, rows in sorted(dropped.items())}


def _keepers(holders: Sequence[Rows]) -> set[str]:
    """The shards that keep a row several sources hold: the trusted ones, else earlier-accepted ones of a single
    source, else none."""
    top = max(h.standing for h in holders)
    best = [h for h in holders if h.standing == top]
    if top == Standing.TRUSTED or (top == Standing.ACCEPTED and len({h.source for h in best}) == 1):
        return {h.name for h in best}
    return set()
