"""Per-source caps: shares over the cap are reported and refused; trimming keeps every source within it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainguard.defenses.errors import ScreeningInputError, SourceCapError
from trainguard.defenses.limits import capped_rows, check_source_caps, enforce_source_caps


def test_a_source_over_the_cap_is_reported() -> None:
    result = check_source_caps({"alice": 300, "bob": 300, "mallory": 400}, max_fraction=0.35)
    assert result.over == ("mallory",)
    assert [round(s.fraction, 2) for s in result.shares] == [0.3, 0.3, 0.4]


def test_enforcing_the_cap_names_the_largest_offender() -> None:
    with pytest.raises(SourceCapError, match=r"source mallory contributes 60\.0%") as error:
        enforce_source_caps({"alice": 100, "eve": 300, "mallory": 600}, max_fraction=0.25)
    assert error.value.source == "mallory"
    assert error.value.exit_code == 1


def test_sources_within_the_cap_pass() -> None:
    assert enforce_source_caps({"alice": 250, "bob": 250}, max_fraction=0.5).over == ()


def test_a_cap_outside_zero_to_one_is_bad_input() -> None:
    with pytest.raises(ScreeningInputError):
        check_source_caps({"a": 1}, max_fraction=1.5)


def test_trimming_example() -> None:
    assert capped_rows({"alice": 100, "bob": 100, "mallory": 1000}, max_fraction=0.4) == {
        "alice": 100,
        "bob": 100,
        "mallory": 133,
    }


rows = st.dictionaries(st.text(min_size=1, max_size=5), st.integers(0, 10_000), min_size=1, max_size=8)
fractions = st.floats(min_value=0.01, max_value=1.0)


@given(rows, fractions)
def test_trimmed_rows_respect_the_cap_and_never_grow(counts: dict[str, int], fraction: float) -> None:
    kept = capped_rows(counts, fraction)
    assert all(0 <= kept[s] <= counts[s] for s in counts)
    assert check_source_caps(kept, fraction).over == ()


@given(rows, fractions)
def test_trimming_keeps_as_much_as_the_cap_allows(counts: dict[str, int], fraction: float) -> None:
    kept = capped_rows(counts, fraction)
    ceiling = max(kept.values())
    trimmed = [s for s in counts if kept[s] < counts[s]]
    assert all(kept[s] == ceiling for s in trimmed)
    if trimmed:
        grown = {s: min(n, ceiling + 1) for s, n in counts.items()}
        assert check_source_caps(grown, fraction).over != ()


@given(rows, fractions)
def test_data_already_within_the_cap_is_not_trimmed(counts: dict[str, int], fraction: float) -> None:
    if check_source_caps(counts, fraction).over == ():
        assert capped_rows(counts, fraction) == counts
