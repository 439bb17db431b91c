"""Checks on decoded samples (images, tensors) before they are trained on: shape, dtype, finite values, value range
and labels, one verdict per shard naming the first failed check and where, like `validation` does for tables.

Pure functions over arrays: the shard was read and decoded (within limits) by its format's decoder already.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from trainguard.defenses.validation import ShardVerdict
from trainguard.provenance.formats import Samples

CHECK_ORDER = ("shape", "dtype", "finite", "range", "labels", "targets")


@dataclass(frozen=True)
class SampleSchema:
    """What one shard's samples must be: inputs of one per-sample `shape` (or just `channels`, axis 1) and `dtype`,
    finite and within [min_value, max_value]; class-label targets among `allowed_labels` (None: not class labels),
    or, for regression and multi-label tasks, real targets of one per-sample `target_shape` within [target_min,
    target_max] (each None: unchecked)."""

    shape: tuple[int, ...] | None = None
    channels: int | None = None
    dtype: str = "float32"
    min_value: float = 0.0
    max_value: float = 1.0
    allowed_labels: tuple[int, ...] | None = tuple(range(10))
    target_shape: tuple[int, ...] | None = None
    target_min: float | None = None
    target_max: float | None = None


def validate_samples(name: str, samples: Samples, schema: SampleSchema, *, source: str = "") -> ShardVerdict:
    """The shard's verdict: accepted, or quarantined by the first failed check of CHECK_ORDER with a one-line
    reason saying what was found, what was expected and at which samples."""
    checks: dict[str, Callable[[Samples, SampleSchema], str | None]] = {
        "shape": _shape,
        "dtype": _dtype,
        "finite": _finite,
        "range": _range,
        "labels": _labels,
        "targets": _targets,
    }
    for check in CHECK_ORDER:
        problem = checks[check](samples, schema)
        if problem is not None:
            origin = f"shard {name} from {source}" if source else f"shard {name}"
            return ShardVerdict(name, source, False, check, f"{origin}: {check} check failed: {problem}")
    return ShardVerdict(name, source, True, "", "sample checks passed")


def _shape(samples: Samples, schema: SampleSchema) -> str | None:
    if len(samples) == 0:
        return "holds no samples"
    found = samples.inputs.shape[1:]
    if schema.shape is not None and found != schema.shape:
        return f"inputs of shape {found} per sample, expected {schema.shape}"
    if schema.channels is not None and (not found or found[0] != schema.channels):
        channels = found[0] if found else "no"
        return f"inputs of {channels} channels (shape {found} per sample), expected {schema.channels}"
    return None


def _dtype(samples: Samples, schema: SampleSchema) -> str | None:
    if samples.inputs.dtype != np.dtype(schema.dtype):
        return f"inputs are {samples.inputs.dtype}, expected {schema.dtype}"
    return None


def _finite(samples: Samples, schema: SampleSchema) -> str | None:
    bad = ~np.isfinite(samples.inputs).reshape(len(samples), -1).all(axis=1)
    return _where(bad, "with NaN or infinite values") if bad.any() else None


def _range(samples: Samples, schema: SampleSchema) -> str | None:
    flat = samples.inputs.reshape(len(samples), -1)
    bad = (flat.min(axis=1) < schema.min_value) | (flat.max(axis=1) > schema.max_value)
    if not bad.any():
        return None
    found = f"values in [{flat.min():g}, {flat.max():g}]"
    return _where(bad, f"outside [{schema.min_value:g}, {schema.max_value:g}] ({found})")


def _labels(samples: Samples, schema: SampleSchema) -> str | None:
    if schema.allowed_labels is None:
        return None
    targets = samples.targets
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        return f"targets are {targets.dtype} of shape {targets.shape[1:]} per sample, expected integer class labels"
    bad = ~np.isin(targets, schema.allowed_labels)
    if not bad.any():
        return None
    unexpected = ", ".join(str(v) for v in np.unique(targets[bad])[:5])
    return _where(bad, f"with labels not in the allowed set ({unexpected})")


def _targets(samples: Samples, schema: SampleSchema) -> str | None:
    if schema.target_shape is None:
        return None
    targets = samples.targets
    if targets.shape[1:] != schema.target_shape or not np.issubdtype(targets.dtype, np.number):
        return f"targets are {targets.dtype} of shape {targets.shape[1:]} per sample, expected {schema.target_shape}"
    flat = targets.reshape(len(samples), -1).astype(np.float64)
    low = -np.inf if schema.target_min is None else schema.target_min
    high = np.inf if schema.target_max is None else schema.target_max
    bad = np.asarray(~(np.isfinite(flat) & (flat >= low) & (flat <= high)).all(axis=1))
    if not bad.any():
        return None
    return _where(bad, f"with targets not finite within [{low:g}, {high:g}]")


def _where(bad: np.ndarray, what: str) -> str:
    """`3 samples <what> (first at 4, 9, 17)`."""
    indices = np.flatnonzero(bad)
    first = ", ".join(str(i) for i in indices[:3])
    return f"{len(indices)} of {len(bad)} samples {what} (first at {first})"
