"""Evasion attacks in torch, batched on the model's device: FGSM, PGD (L-inf / L2), FGSM with random start,
APGD-CE / APGD-DLR / APGD-T (AutoAttack's gradient attacks), FAB-T (minimum-norm) and Square (black-box, forward
passes only)."""

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
from trainguard.defenses.attacks.fab import FABT, boundary_step
from trainguard.defenses.attacks.fgsm import FGSM
from trainguard.defenses.attacks.fgsm_rs import FGSMRandomStart
from trainguard.defenses.attacks.options import AttackOptionKeywords, AttackOptions
from trainguard.defenses.attacks.pgd import PGD
from trainguard.defenses.attacks.precision import (
    CraftingPrecision,
    parse_crafting_precision,
    resolve_crafting_precision,
    trainer_autocast,
)
from trainguard.defenses.attacks.registry import ATTACKS, make_attack
from trainguard.defenses.attacks.square import Square, margin_loss, square_fraction

__all__ = [
    "APGD",
    "APGDCE",
    "APGDDLR",
    "APGDT",
    "ATTACKS",
    "FABT",
    "FGSM",
    "PGD",
    "Attack",
    "AttackOptionKeywords",
    "AttackOptions",
    "CraftingPrecision",
    "FGSMRandomStart",
    "Square",
    "boundary_step",
    "checkpoint_fractions",
    "checkpoints",
    "crafting_mode",
    "dlr_loss",
    "dlr_loss_targeted",
    "make_attack",
    "margin_loss",
    "parse_crafting_precision",
    "parse_norm",
    "resolve_crafting_precision",
    "square_fraction",
    "sum_cross_entropy",
    "trainer_autocast",
]
