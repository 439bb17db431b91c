"""Schema checks on training shards (pandera); failing shards are quarantined.

Each shard gets one verdict naming the first failed check (`columns`, `dtype`, `nulls`, `labels`, `range`) and
where, so the quarantine record says what to fix. Pandera's cost is mostly per column and per call (about 0.6 s for
a shard of 65 columns on two busy cores, whatever its rows), so shards of the same columns and dtypes are validated
together in one call, and one by one only where that call fails. Rows several sources share are not a shard's
fault: they are dropped row by row (`trainguard.defenses.duplicates`), never by quarantining a shard someone copied
from.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import pandera.pandas as pa

CHECK_ORDER = ("columns", "dtype", "nulls", "labels", "targets", "range")
PASSED = "schema checks passed"


@dataclass(frozen=True)
class ShardSchema:
    """What a shard must look like: feature columns of one float dtype within bounds, and an integer label column
    among `allowed_labels`, or (regression, multilabel: `allowed_labels` None) numeric `targets` columns (default:
    the label column) within [target_min, target_max] (None: unbounded). No other column is allowed.

    Attributes:
        features: The feature columns.
        label: The label column (classification), and the target column when `targets` is empty.
        allowed_labels: The labels a classification shard may hold (digits' 0-9 by default); None: real or 0/1
            targets instead.
        min_value: The smallest feature value allowed.
        max_value: The largest feature value allowed.
        feature_dtype: The dtype every feature column must have.
        label_dtype: The dtype the label column must have (classification).
        targets: The target columns when `allowed_labels` is None (empty: `label`).
        target_min: The smallest target value allowed (None: unbounded).
        target_max: The largest target value allowed (None: unbounded).
    """

    features: tuple[str, ...]
    label: str = "label"
    allowed_labels: tuple[int, ...] | None = tuple(range(10))
    min_value: float = 0.0
    max_value: float = 1.0
    feature_dtype: str = "float32"
    label_dtype: str = "int64"
    targets: tuple[str, ...] = ()
    target_min: float | None = None
    target_max: float | None = None

    def pandera(self) -> pa.DataFrameSchema:
        """The pandera schema, built once per `ShardSchema` (building one costs a few ms per column)."""
        return _pandera(self)

    def build(self) -> pa.DataFrameSchema:
        columns = {
            name: pa.Column(self.feature_dtype, pa.Check.in_range(self.min_value, self.max_value), nullable=False)
            for name in self.features
        }
        if self.allowed_labels is not None:
            columns[self.label] = pa.Column(self.label_dtype, pa.Check.isin(list(self.allowed_labels)), nullable=False)
            return pa.DataFrameSchema(columns, strict=True)
        low = float("-inf") if self.target_min is None else self.target_min
        high = float("inf") if self.target_max is None else self.target_max
        for name in self.targets or (self.label,):
            checks = [pa.Check(_is_real, name="targets"), pa.Check.in_range(low, high)]
            columns[name] = pa.Column(None, checks, nullable=False)
        return pa.DataFrameSchema(columns, strict=True)


@functools.lru_cache(maxsize=16)
def _pandera(schema: ShardSchema) -> pa.DataFrameSchema:
    return schema.build()


def _is_real(column: pd.Series) -> bool:
    """A numeric, non-boolean target column."""
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


@dataclass(frozen=True)
class Shard:
    """A shard's rows with the source that signed it and its name in the manifest.

    Attributes:
        name: The shard's name in the manifest.
        source: Its source.
        frame: Its rows, as read from its verified bytes.
    """

    name: str
    source: str
    frame: pd.DataFrame


@dataclass(frozen=True)
class ShardVerdict:
    """Accepted, or quarantined because of `check` (one of CHECK_ORDER), with a one-line reason.

    Attributes:
        name: The shard's name.
        source: Its source.
        accepted: Whether it passed every check.
        check: The first failed kind of check (`columns`, `dtype`, `nulls`, `labels`, `targets`, `range`); empty
            when accepted.
        reason: One line: what failed and in which columns, or that the checks passed.
    """

    name: str
    source: str
    accepted: bool
    check: str
    reason: str


@dataclass(frozen=True)
class ValidationResult:
    verdicts: tuple[ShardVerdict, ...]

    @property
    def accepted(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.verdicts if v.accepted)

    @property
    def quarantined(self) -> tuple[ShardVerdict, ...]:
        return tuple(v for v in self.verdicts if not v.accepted)


def _kind(check: str) -> str:
    if check in ("column_in_schema", "column_in_dataframe"):
        return "columns"
    if check.startswith("dtype("):
        return "dtype"
    if check == "not_nullable":
        return "nulls"
    if check.startswith("isin("):
        return "labels"
    if check.startswith("in_range("):
        return "range"
    return check


def check_schema(shard: Shard, schema: ShardSchema) -> ShardVerdict:
    """Validates one shard against `schema`; the verdict names the first failed kind of check and its columns."""
    try:
        schema.pandera().validate(shard.frame, lazy=True)
    except pa.errors.SchemaErrors as error:
        cases = error.failure_cases
        kinds = cases["check"].astype(str).map(_kind)
        kind = min(kinds, key=lambda k: CHECK_ORDER.index(k) if k in CHECK_ORDER else len(CHECK_ORDER))
        hits = cases[kinds == kind]
        where = sorted({str(c) for c in hits["column"].fillna(hits["failure_case"]).astype(str)})
        shown = ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")
        reason = f"shard {shard.name} from {shard.source}: {kind} check failed ({len(hits)} cases) in {shown}"
        return ShardVerdict(shard.name, shard.source, False, kind, reason)
    return ShardVerdict(shard.name, shard.source, True, "", PASSED)


def _layout(frame: pd.DataFrame) -> tuple[tuple[str, str], ...]:
    return tuple((str(name), str(dtype)) for name, dtype in frame.dtypes.items())


def _passes_together(frames: Sequence[pd.DataFrame], schema: ShardSchema) -> bool:
    """Whether shards of one layout (the same columns in the same order, the same dtypes) all pass: their rows
    concatenated keep that layout, so the checks see every shard's values as they are."""
    try:
        schema.pandera().validate(pd.concat(frames, ignore_index=True), lazy=True)
    except pa.errors.SchemaErrors:
        return False
    return True


def validate_shards(shards: Sequence[Shard], schema: ShardSchema) -> ValidationResult:
    """Schema checks per shard: one pandera call per layout, and one per shard of a layout whose call failed.

    Args:
        shards: The shards to check.
        schema: What each must look like.

    Returns:
        One verdict per shard, in the order given; `accepted` names the shards that passed and `quarantined` holds
        the verdicts of the others.
    """
    by_layout: dict[tuple[tuple[str, str], ...], list[int]] = {}
    for i, shard in enumerate(shards):
        by_layout.setdefault(_layout(shard.frame), []).append(i)
    verdicts: dict[int, ShardVerdict] = {}
    for members in by_layout.values():
        if len(members) > 1 and _passes_together([shards[i].frame for i in members], schema):
            verdicts.update({i: ShardVerdict(shards[i].name, shards[i].source, True, "", PASSED) for i in members})
        else:
            verdicts.update({i: check_schema(shards[i], schema) for i in members})
    return ValidationResult(tuple(verdicts[i] for i in range(len(shards))))
