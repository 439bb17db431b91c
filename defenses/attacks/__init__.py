"""Evasion attacks in torch, batched on the model's device: FGSM, PGD (L-inf / L2), FGSM with random start, and
APGD-CE / APGD-DLR / APGD-T (AutoAttack's gradient attacks)."""

from __future__ import annotations

from trainguard.defenses.attacks.apgd import (
    APGD,
    APGDCE,
    APGDDLR,
    APGDT,
    checkpoint_fractions,
    checkpoints,
    dlr_loss,
    dlr_loss_targeted,
)
from trainguard.defenses.attacks.base import Attack, crafting_mode, parse_norm, sum_cross_entropy
from trainguard.defenses.attacks.fgsm import FGSM
from trainguard.defenses.attacks.fgsm_rs import FGSMRandomStart
from trainguard.defenses.attacks.pgd import PGD
from trainguard.defenses.attacks.precision import Crafting, crafting_autocast, parse_crafting, trainer_autocast
from trainguard.defenses.attacks.registry import ATTACKS, make_attack

__all__ = [
    "APGD",
    "APGDCE",
    "APGDDLR",
    "APGDT",
    "ATTACKS",
    "FGSM",
    "PGD",
    "Attack",
    "Crafting",
    "FGSMRandomStart",
    "checkpoint_fractions",
    "checkpoints",
    "crafting_autocast",
    "crafting_mode",
    "dlr_loss",
    "dlr_loss_targeted",
    "make_attack",
    "parse_crafting",
    "parse_norm",
    "sum_cross_entropy",
    "trainer_autocast",
]
