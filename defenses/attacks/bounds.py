"""Attack bounds and the range check of the inputs an attack is given.

The bounds are checked once and put on each device and dtype once: copying a Python number to a GPU waits for the
device, and a training loop must never wait for it per batch. For the same reason a training loop may defer the
range check of a batch: its result comes back to the host asynchronously and is read at the next call (or when the
loop says it is done), so a batch outside the bounds stops the run one batch later instead of stalling every batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainguard.defenses.errors import AttackConfigError, AttackInputError

Bound = float | torch.Tensor


def check_bounds(bounds: tuple[Bound, Bound] | None) -> tuple[Bound, Bound]:
    """A `(lower, upper)` pair with `lower <= upper` everywhere; missing bounds are refused in one line."""
    if bounds is None:
        raise AttackConfigError(
            "bounds=None: attacks need the data's value range; pass bounds=(low, high) that match the data "
            "(YAML: adversarial.bounds)"
        )
    if len(bounds) != 2:
        raise AttackConfigError(f"bounds must be a (lower, upper) pair, got {bounds!r}")
    lower, upper = bounds
    if not bool(torch.all(torch.as_tensor(lower) <= torch.as_tensor(upper))):
        raise AttackConfigError("bounds: lower must be <= upper everywhere")
    return lower, upper


class Bounds:
    """An attack's `(lower, upper)` bounds, as tensors on each device and dtype they are asked for (made once)."""

    def __init__(self, bounds: tuple[Bound, Bound] | None) -> None:
        self.pair = check_bounds(bounds)
        self._tensors: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def like(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bounds on `x`'s device and in its dtype; refuses bounds that do not broadcast to one sample of `x`."""
        key = (x.device, x.dtype)
        if key not in self._tensors:
            self._tensors[key] = tuple(torch.as_tensor(b, dtype=x.dtype, device=x.device) for b in self.pair)  # type: ignore[assignment]
        lower, upper = self._tensors[key]
        try:
            torch.broadcast_shapes(lower.shape, x.shape[1:])  # type: ignore[no-untyped-call]
            torch.broadcast_shapes(upper.shape, x.shape[1:])  # type: ignore[no-untyped-call]
        except RuntimeError:
            raise AttackInputError(
                f"bounds of shape {tuple(lower.shape)}/{tuple(upper.shape)} do not broadcast to a sample "
                f"of shape {tuple(x.shape[1:])}"
            ) from None
        return lower, upper


@dataclass(frozen=True)
class _Pending:
    """A batch's range summary (values outside, min, max) on its way to the host; `ready` marks its arrival."""

    summary: torch.Tensor
    ready: torch.cuda.Event | None


class RangeCheck:
    """Refuses float inputs outside the bounds; `deferred` checks read a batch's result at the next call instead."""

    def __init__(self, deferred: bool = False) -> None:
        self.deferred = deferred
        self._pending: _Pending | None = None

    def __call__(self, x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> None:
        if not x.is_floating_point():
            raise AttackInputError(f"attacks perturb float inputs, got dtype {x.dtype} (embed token ids first)")
        self.raise_pending()
        if x.numel() == 0:
            return
        outside = ((x < lower) | (x > upper)).sum()
        summary = torch.stack([outside.double(), x.min().double(), x.max().double()])
        if not self.deferred:
            _refuse_outside(summary)
            return
        if summary.is_cuda:
            host = torch.empty(3, dtype=torch.float64, pin_memory=True)
            host.copy_(summary, non_blocking=True)
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record()
            self._pending = _Pending(host, ready)
        else:
            self._pending = _Pending(summary, None)

    def raise_pending(self) -> None:
        """Raises for a deferred batch that lay outside the bounds (waiting only for that batch's summary)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.ready is not None:
            pending.ready.synchronize()
        _refuse_outside(pending.summary)


def _refuse_outside(summary: torch.Tensor) -> None:
    outside, low, high = summary.tolist()
    if outside > 0:
        raise AttackInputError(
            f"{int(outside)} input values lie outside the attack bounds (batch min {low:.4g}, max {high:.4g}): "
            "set the attack's bounds (YAML: adversarial.bounds) to the data's range"
        )
