"""Evasion attacks in torch, batched on the model's device: FGSM, PGD (L-inf / L2), FGSM with random start."""

from __future__ import annotations

from trainguard.defenses.attacks.base import Attack, crafting_mode, parse_norm, sum_cross_entropy
from trainguard.defenses.attacks.fgsm import FGSM
from trainguard.defenses.attacks.fgsm_rs import FGSMRandomStart
from trainguard.defenses.attacks.pgd import PGD
from trainguard.defenses.attacks.precision import Crafting, crafting_autocast, parse_crafting, trainer_autocast
from trainguard.defenses.attacks.registry import ATTACKS, make_attack

__all__ = [
    "ATTACKS",
    "FGSM",
    "PGD",
    "Attack",
    "Crafting",
    "FGSMRandomStart",
    "crafting_autocast",
    "crafting_mode",
    "make_attack",
    "parse_crafting",
    "parse_norm",
    "sum_cross_entropy",
    "trainer_autocast",
]
