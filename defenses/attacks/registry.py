"""Attacks by name (`"fgsm"`, `"pgd"`, `"fgsm-rs"`, `"apgd-ce"`, `"apgd-dlr"`, `"apgd-t"`, `"fab-t"`, `"square"`), as
callbacks and configs name them."""

from __future__ import annotations

from typing import Unpack

from torch import nn

from trainguard.defenses.attacks.apgd import APGD, APGDCE, APGDDLR, APGDT
from trainguard.defenses.attacks.base import Attack, AttackKeywords
from trainguard.defenses.attacks.fab import FABT
from trainguard.defenses.attacks.fgsm import FGSM
from trainguard.defenses.attacks.fgsm_rs import FGSMRandomStart
from trainguard.defenses.attacks.pgd import PGD
from trainguard.defenses.attacks.square import Square
from trainguard.defenses.errors import AttackConfigError

ATTACKS: dict[str, type[Attack]] = {
    "fgsm": FGSM,
    "pgd": PGD,
    "fgsm-rs": FGSMRandomStart,
    "apgd-ce": APGDCE,
    "apgd-dlr": APGDDLR,
    "apgd-t": APGDT,
    "fab-t": FABT,
    "square": Square,
}

SQUARE_QUERIES_PER_STEP = 50  # AutoAttack's standard budgets: 100 APGD/FAB iterations, 5,000 Square queries


def make_attack(
    name: str,
    model: nn.Module,
    *,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    restarts: int = 1,
    **common: Unpack[AttackKeywords],
) -> Attack:
    """Builds the named attack; `steps` concerns PGD, APGD and FAB-T (its iterations per target), and Square as
    `SQUARE_QUERIES_PER_STEP` queries per step (steps=100: AutoAttack's 5,000 queries); `step_size`/`random_start`
    PGD (`step_size` is also FGSM-RS's alpha); `restarts` APGD (parameter-free: it has no step size to set, and
    always starts at random) and FAB-T (runs per target; the first starts at the input). Square has no restarts."""
    kind = ATTACKS.get(name.lower())
    if kind is None:
        raise AttackConfigError(f"unknown attack {name!r}: choose one of {', '.join(ATTACKS)}")
    if issubclass(kind, APGD):
        return kind(model, eps=eps, steps=steps, restarts=restarts, **common)
    if kind is FABT:
        return FABT(model, eps=eps, steps=steps, restarts=restarts, **common)
    if kind is Square:
        return Square(model, eps=eps, queries=steps * SQUARE_QUERIES_PER_STEP, **common)
    if kind is PGD:
        return PGD(model, eps=eps, steps=steps, step_size=step_size, random_start=random_start, **common)
    if kind is FGSMRandomStart and step_size is not None:
        return FGSMRandomStart(model, eps=eps, alpha=step_size / eps if eps > 0 else 1.25, **common)
    return kind(model, eps=eps, **common)
