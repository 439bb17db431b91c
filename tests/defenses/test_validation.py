"""Input validation: each kind of bad shard is quarantined with its own check and reason; good shards pass."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from digits_demo.digits import FEATURES, load_digits_split, split

from trainguard.defenses.validation import Shard, ShardSchema, validate_shards

SCHEMA = ShardSchema(features=FEATURES)


@pytest.fixture(scope="module")
def frames() -> list[pd.DataFrame]:
    return [part.to_frame() for part in split(load_digits_split(seed=2), [40] * 8)]


def test_well_formed_shards_from_distinct_sources_pass(frames) -> None:
    result = validate_shards([Shard(f"s{i}", f"src{i}", f) for i, f in enumerate(frames[:3])], SCHEMA)
    assert result.accepted == ("s0", "s1", "s2")
    assert result.quarantined == ()


def _bad(frames, kind: str) -> pd.DataFrame:
    frame = frames[0].copy()
    if kind == "columns":
        return frame.drop(columns=[FEATURES[5]])
    if kind == "dtype":
        return frame.astype({FEATURES[0]: np.float64})
    if kind == "nulls":
        frame.loc[3, FEATURES[10]] = np.nan
        return frame
    if kind == "labels":
        frame.loc[4, "label"] = 11
        return frame
    if kind == "range":
        frame.loc[5, FEATURES[20]] = np.float32(1.5)
        return frame
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        ("columns", FEATURES[5]),
        ("dtype", FEATURES[0]),
        ("nulls", FEATURES[10]),
        ("labels", "label"),
        ("range", FEATURES[20]),
    ],
)
def test_each_kind_of_bad_shard_is_quarantined_with_its_reason(frames, kind: str, where: str) -> None:
    shards = [Shard("bad", "mallory", _bad(frames, kind)), Shard("good", "alice", frames[1])]
    result = validate_shards(shards, SCHEMA)
    (verdict,) = result.quarantined
    assert (verdict.name, verdict.source, verdict.check) == ("bad", "mallory", kind)
    assert f"{kind} check failed" in verdict.reason
    assert where in verdict.reason
    assert result.accepted == ("good",)


def test_a_shard_is_judged_in_its_own_dtypes_not_those_it_would_take_beside_others(frames) -> None:
    """Shards of one layout are validated in one call; an int32 label column would become int64 concatenated with
    int64 ones and pass, so it is a layout of its own and fails its dtype check."""
    narrow = frames[0].astype({"label": np.int32})
    shards = [Shard("a", "alice", frames[1]), Shard("narrow", "mallory", narrow), Shard("b", "bob", frames[2])]
    result = validate_shards(shards, SCHEMA)
    assert result.accepted == ("a", "b")
    (verdict,) = result.quarantined
    assert (verdict.name, verdict.check) == ("narrow", "dtype") and "label" in verdict.reason


def test_many_good_shards_and_one_bad_get_a_verdict_each_in_their_order(frames) -> None:
    shards = [Shard(f"s{i}", f"src{i}", f) for i, f in enumerate(frames[:6])]
    shards.insert(3, Shard("bad", "mallory", _bad(frames, "range")))
    result = validate_shards(shards, SCHEMA)
    assert [v.name for v in result.verdicts] == [s.name for s in shards]
    assert [v.name for v in result.quarantined] == ["bad"] and result.quarantined[0].check == "range"


def test_rows_another_source_copied_quarantine_no_shard(frames) -> None:
    """Which copy is the original is not knowable from the rows: the shared rows are dropped row by row later
    (`trainguard.defenses.duplicates`), and no shard, least of all the one copied from, is quarantined for them."""
    relabelled = frames[0].iloc[:4].copy()
    relabelled["label"] = (relabelled["label"] + 1) % 10
    copied = pd.concat([frames[2], frames[0].iloc[:3], relabelled], ignore_index=True)
    shards = [Shard("orig", "alice", frames[0]), Shard("copy", "mallory", copied), Shard("other", "bob", frames[1])]
    assert validate_shards(shards, SCHEMA).accepted == ("orig", "copy", "other")


def test_real_target_columns_are_checked_for_range_and_nulls_instead_of_labels(frames) -> None:
    """A regression table: its target columns are any real numbers within [target_min, target_max], not labels."""
    schema = ShardSchema(features=FEATURES, allowed_labels=None, targets=("price",), target_min=0.0, target_max=9.0)
    good = frames[0].drop(columns="label").assign(price=frames[0]["label"] / 1.0)
    assert validate_shards([Shard("s", "a", good)], schema).accepted == ("s",)
    for bad, kind in ((good.assign(price=good["price"] + 10), "range"), (good.drop(columns="price"), "columns")):
        verdict = validate_shards([Shard("s", "a", bad)], schema).verdicts[0]
        assert (verdict.accepted, verdict.check) == (False, kind), verdict.reason
