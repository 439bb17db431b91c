"""Shard failures: a subclass per failure kind, each with its stable `reason` code."""

from __future__ import annotations

from trainguard.provenance.errors import (
    AppendedShardError,
    ShardError,
    ShardFormatError,
    shard_error,
)


def test_a_failure_known_by_its_code_comes_back_as_its_own_kind() -> None:
    error = shard_error("format", "shard a.parquet: not a parquet file", shard="a.parquet")
    assert type(error) is ShardFormatError and error.reason == "format" and error.shard == "a.parquet"
    assert type(shard_error("appended", "grew", shard="a")) is AppendedShardError


def test_a_code_of_no_known_kind_is_kept_on_a_plain_shard_error() -> None:
    error = shard_error("from-a-newer-worker", "shard a: refused", shard="a")
    assert type(error) is ShardError and error.reason == "from-a-newer-worker"
    assert ShardError.reason == "shard"  # the class keeps its own code
