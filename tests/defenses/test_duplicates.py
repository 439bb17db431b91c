"""Rows several sources share: a copy costs the shards holding it only the copied rows, and never evicts what was
accepted before."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from trainguard.defenses.duplicates import Rows, Standing, shared_rows


def _rows(seed: int, count: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).random((count, 8), dtype=np.float32)


def test_a_decoy_copying_one_row_of_each_honest_shard_costs_each_only_that_row() -> None:
    honest = {name: _rows(seed) for seed, name in enumerate(("alice", "bob", "carol"))}
    decoy = np.concatenate([_rows(9, 5), honest["alice"][[4]], honest["bob"][[7]], honest["carol"][[11]]])
    shards = [Rows(name, name, rows) for name, rows in honest.items()] + [Rows("mallory", "mallory", decoy)]
    assert shared_rows(shards) == {"alice": (4,), "bob": (7,), "carol": (11,), "mallory": (5, 6, 7)}


def test_a_new_shard_never_evicts_rows_accepted_in_an_earlier_cycle_or_the_trusted_base() -> None:
    base, accepted = _rows(0), _rows(1)
    copier = np.concatenate([_rows(2, 4), base[[0]], accepted[[3, 5]]])
    shards = [
        Rows("base", "curator", base, Standing.TRUSTED),
        Rows("alice", "alice", accepted, Standing.ACCEPTED),
        Rows("mallory", "mallory", copier),
    ]
    assert shared_rows(shards) == {"mallory": (4, 5, 6)}


def test_rows_two_earlier_accepted_sources_share_are_dropped_from_both_but_never_from_the_trusted_base() -> None:
    """A decoy accepted beside its victim in an earlier cycle gains nothing the next cycle: neither keeps the copy."""
    victim, base = _rows(0), _rows(1)
    decoy = np.concatenate([_rows(2, 3), victim[[1]], base[[2]]])
    shards = [
        Rows("alice", "alice", victim, Standing.ACCEPTED),
        Rows("mallory", "mallory", decoy, Standing.ACCEPTED),
        Rows("base", "curator", base, Standing.TRUSTED),
    ]
    assert shared_rows(shards) == {"alice": (1,), "mallory": (3, 4)}


def test_a_relabelled_or_sign_flipped_copy_is_still_a_copy_and_one_sources_repeats_are_not() -> None:
    original = _rows(0)
    original[2, 0] = 0.0
    copy = original[[2]].copy()
    copy[0, 0] = -0.0  # the same value to any model
    shards = [Rows("a1", "alice", original), Rows("a2", "alice", original[:5]), Rows("m", "mallory", copy)]
    assert shared_rows(shards) == {"a1": (2,), "a2": (2,), "m": (0,)}


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=8), st.integers(0, 5))
def test_no_shard_loses_a_row_no_other_source_holds(shards: list[tuple[int, int]], seed: int) -> None:
    pool = _rows(seed, 12)
    rng = np.random.default_rng(seed)
    made = [
        Rows(f"s{i}", f"src{source}", pool[rng.choice(12, 4, replace=False)], Standing(standing))
        for i, (source, standing) in enumerate(shards)
    ]
    dropped = shared_rows(made)
    for shard in made:
        for row in dropped.get(shard.name, ()):
            others = [o for o in made if o.source != shard.source]
            assert any((o.inputs == shard.inputs[row]).all(axis=1).any() for o in others)
            assert shard.standing != Standing.TRUSTED
