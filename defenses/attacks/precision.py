"""The precision attacks craft at: the autocast of the trainer's forward passes (`"trainer"`) or float32 (`"fp32"`).

Crafting under the trainer's mixed precision costs what a hand-written AMP loop costs; float32 crafting is the
slower, numerically conservative choice. Either way the perturbation itself stays in the input's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from trainguard.defenses.errors import AttackConfigError

if TYPE_CHECKING:
    import pytorch_lightning as pl

Crafting = Literal["trainer", "fp32"]
CRAFTING: tuple[Crafting, ...] = ("trainer", "fp32")


def parse_crafting(crafting: str) -> Crafting:
    """Checks a `crafting=` setting."""
    if crafting not in CRAFTING:
        raise AttackConfigError(f"crafting must be 'trainer' or 'fp32', got {crafting!r}")
    return crafting


def trainer_autocast(trainer: pl.Trainer) -> torch.dtype | None:
    """The dtype the trainer's precision plugin autocasts forward passes to on its device (None: no autocast)."""
    device = trainer.strategy.root_device.type
    with trainer.precision_plugin.forward_context():
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def crafting_autocast(crafting: Crafting, trainer: pl.Trainer) -> torch.dtype | None:
    """The `autocast` dtype for an attack crafting at `crafting` precision in `trainer`'s run."""
    return trainer_autocast(trainer) if crafting == "trainer" else None
