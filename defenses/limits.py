"""Per-source caps: no single source may contribute more than a configured fraction of a cycle's training data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from trainguard.defenses.errors import ScreeningInputError, SourceCapError


@dataclass(frozen=True)
class SourceShare:
    """One source's share of a cycle's rows.

    Args:
        source: The source's name.
        rows: Its rows.
        fraction: Its rows over all rows (0 when there are none).
        allowed: Whether the fraction is within the cap.

    Example::

        share = check_source_caps({"alice": 80, "bob": 20}, 0.5).shares[0]
        assert (share.source, share.fraction, share.allowed) == ("alice", 0.8, False)
    """

    source: str
    rows: int
    fraction: float
    allowed: bool


@dataclass(frozen=True)
class CapCheck:
    """Each source's share of the cycle's rows against `max_fraction`; `over` names the sources past it.

    Made by `check_source_caps` (which reports) or `enforce_source_caps` (which raises `SourceCapError` instead).

    Args:
        shares: One `SourceShare` per source, in the order given.
        max_fraction: The cap, a fraction in (0, 1].

    Example::

        check = check_source_caps({"alice": 80, "bob": 20}, max_fraction=0.5)
        assert check.over == ("alice",)
    """

    shares: tuple[SourceShare, ...]
    max_fraction: float

    @property
    def over(self) -> tuple[str, ...]:
        """The sources over the cap."""
        return tuple(s.source for s in self.shares if not s.allowed)


def _validated(rows_by_source: Mapping[str, int], max_fraction: float) -> int:
    if not 0 < max_fraction <= 1:
        raise ScreeningInputError(f"source cap must be a fraction in (0, 1], got {max_fraction}")
    if any(n < 0 for n in rows_by_source.values()):
        raise ScreeningInputError("row counts per source must not be negative")
    return sum(rows_by_source.values())


def check_source_caps(rows_by_source: Mapping[str, int], max_fraction: float) -> CapCheck:
    """Each source's fraction of all rows, and whether it is within `max_fraction` (no source may flood a cycle).

    Args:
        rows_by_source: Rows each source contributes.
        max_fraction: The cap on one source's share of all rows, in (0, 1].

    Returns:
        Each source's share, in the order given; `over` names those past the cap.

    Raises:
        ScreeningInputError: A cap outside (0, 1], or a negative row count.
    """
    total = _validated(rows_by_source, max_fraction)
    shares = tuple(
        SourceShare(source, n, n / total if total else 0.0, n <= max_fraction * total)
        for source, n in rows_by_source.items()
    )
    return CapCheck(shares, max_fraction)


def enforce_source_caps(rows_by_source: Mapping[str, int], max_fraction: float) -> CapCheck:
    """Like `check_source_caps`, but raises `SourceCapError` naming the largest source over the cap.

    Args:
        rows_by_source: Rows each source contributes.
        max_fraction: The cap on one source's share of all rows, in (0, 1].

    Returns:
        Each source's share, all within the cap.

    Raises:
        SourceCapError: A source is over the cap (the largest one is named).
        ScreeningInputError: A cap outside (0, 1], or a negative row count.
    """
    result = check_source_caps(rows_by_source, max_fraction)
    over = [s for s in result.shares if not s.allowed]
    if over:
        worst = max(over, key=lambda s: s.fraction)
        raise SourceCapError(
            f"source {worst.source} contributes {worst.fraction:.1%} of this cycle's rows "
            f"({worst.rows} rows), more than the cap of {max_fraction:.1%}",
            source=worst.source,
        )
    return result


def capped_rows(rows_by_source: Mapping[str, int], max_fraction: float, exempt_rows: int = 0) -> dict[str, int]:
    """Rows each source may keep so that none exceeds `max_fraction` of the kept total (which includes
    `exempt_rows`, rows no cap applies to, such as a trusted base); small sources keep all.

    Finds the largest per-source ceiling c with c <= max_fraction * (exempt_rows + sum(min(rows, c))). The slack of
    that inequality is concave in c and non-negative at c = 0, so the feasible ceilings form an interval and
    bisection finds its end.

    Args:
        rows_by_source: Rows each source offers.
        max_fraction: The cap on one source's share of the kept rows, in (0, 1].
        exempt_rows: Rows that count in the total but are not capped (>= 0).

    Returns:
        Rows each source may keep (at most what it offered), in the order given.

    Raises:
        ScreeningInputError: A cap outside (0, 1], or a negative row count.
    """
    _validated(rows_by_source, max_fraction)
    if exempt_rows < 0:
        raise ScreeningInputError("exempt rows must not be negative")

    def feasible(c: int) -> bool:
        return c <= max_fraction * (exempt_rows + sum(min(n, c) for n in rows_by_source.values()))

    low, high = 0, max(rows_by_source.values(), default=0)
    while low < high:
        mid = (low + high + 1) // 2
        if feasible(mid):
            low = mid
        else:
            high = mid - 1
    return {source: min(n, low) for source, n in rows_by_source.items()}
