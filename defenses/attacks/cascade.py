"""AutoAttack's cascade (Croce & Hein, 2020): attacks run in order, each only on the rows every earlier attack left
correctly classified, so a row counts as robust only if no attack breaks it, at the cost of the rows still robust.

`PRESETS` names the reference's line-ups: `autoattack` (the standard version: APGD-CE, APGD-T, FAB-T, Square) and
`autoattack-fast` (APGD-CE and APGD-T). The cascade counts what each attack costs: wall seconds, and the rows it
sends through the model with and without an input gradient (one row through the model once counts 1).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch

from trainguard.defenses.attacks.base import Attack, ForwardFn

PRESETS: dict[str, tuple[str, ...]] = {
    "autoattack": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "autoattack-fast": ("apgd-ce", "apgd-t"),
}
BLACK_BOX = frozenset({"square"})  # attacks that read only the model's scores, never a gradient


@dataclass(frozen=True)
class AttackCost:
    """What one attack of a cascade cost: rows attacked, wall seconds, rows forwarded without and with a gradient."""

    rows: int = 0
    seconds: float = 0.0
    forwards: int = 0
    gradients: int = 0

    def __add__(self, other: AttackCost) -> AttackCost:
        return AttackCost(
            self.rows + other.rows,
            self.seconds + other.seconds,
            self.forwards + other.forwards,
            self.gradients + other.gradients,
        )

    def to_dict(self) -> dict[str, float]:
        return {"rows": self.rows, "seconds": self.seconds, "forwards": self.forwards, "gradients": self.gradients}


@dataclass(frozen=True)
class CascadeResult:
    """Per row: correct on the clean input, robust after every attack, and which attack broke it (first and only)."""

    clean: torch.Tensor
    robust: torch.Tensor
    broken_by: dict[str, torch.Tensor]
    costs: dict[str, AttackCost] = field(default_factory=dict)


class _CountingForward:
    """Wraps an attack's forward to count the rows it sees, apart for passes that build an input gradient."""

    def __init__(self, forward: ForwardFn) -> None:
        self.inner = forward
        self.forwards = 0
        self.gradients = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.gradients += len(x)
        else:
            self.forwards += len(x)
        return self.inner(x)


class Cascade:
    """Runs `attacks` (name to attack, in order) as AutoAttack does: the clean rows the model gets right go to the
    first attack, the rows it leaves correct to the next, and so on; every attack is crafted at the `eps` given.
    `clock` times the attacks (wall seconds by default; `time.process_time` for CPU seconds on a shared machine)."""

    def __init__(self, attacks: Mapping[str, Attack], *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.attacks = dict(attacks)
        self.clock = clock
        self._counters: dict[str, _CountingForward] = {}
        for name, attack in self.attacks.items():
            counter = _CountingForward(attack.forward)
            attack.forward = counter
            self._counters[name] = counter

    def __call__(self, x: torch.Tensor, y: torch.Tensor, eps: float, *, skip: Collection[str] = ()) -> CascadeResult:
        """The cascade on `x` at `eps`, leaving out the attacks named in `skip` (e.g. the black-box ones)."""
        first = next(iter(self.attacks.values()))
        clean = first.task.correct(first.predict(x), y) == 1
        robust = clean.clone()
        broken_by, costs = {}, {}
        for name, attack in self.attacks.items():
            if name in skip:
                continue
            todo = robust.nonzero().squeeze(1)
            counter = self._counters[name]
            counter.forwards = counter.gradients = 0
            start = self._now(x.device)
            broken = torch.zeros_like(robust)
            if len(todo) > 0:
                still = attack.task.correct(attack.predict(attack(x[todo], y[todo], eps=eps)), y[todo]) == 1
                broken = broken.index_fill(0, todo[~still], True)
            robust, broken_by[name] = robust & ~broken, broken
            costs[name] = AttackCost(len(todo), self._now(x.device) - start, counter.forwards, counter.gradients)
        return CascadeResult(clean=clean, robust=robust, broken_by=broken_by, costs=costs)

    def _now(self, device: torch.device) -> float:
        """The clock, once the device's queued work is done (so a GPU attack's time is its own)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return self.clock()
