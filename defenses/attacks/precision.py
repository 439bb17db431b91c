"""Crafting precision: the precision attacks craft at.

The callbacks take it as a setting, `crafting_precision="trainer"` (the autocast of the trainer's forward passes,
e.g. bf16 under `Trainer(precision="bf16-mixed")`) or `"fp32"`; an `Attack` takes what that resolves to in a run, an
autocast dtype (`torch.float16`, `torch.bfloat16`) or None for float32. Crafting under the trainer's mixed precision
costs what a hand-written AMP loop costs; float32 crafting is the slower, numerically conservative choice. Either way
the perturbation itself stays in the input's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from trainguard.defenses.errors import AttackConfigError

if TYPE_CHECKING:
    import pytorch_lightning as pl

CraftingPrecision = Literal["trainer", "fp32"]
CRAFTING_PRECISIONS: tuple[CraftingPrecision, ...] = ("trainer", "fp32")


def parse_crafting_precision(crafting_precision: str) -> CraftingPrecision:
    """Checks a `crafting_precision=` setting; raises AttackConfigError for anything but `"trainer"` or `"fp32"`."""
    if crafting_precision not in CRAFTING_PRECISIONS:
        raise AttackConfigError(f"crafting_precision must be 'trainer' or 'fp32', got {crafting_precision!r}")
    return crafting_precision


def trainer_autocast(trainer: pl.Trainer) -> torch.dtype | None:
    """The dtype the trainer's precision plugin autocasts forward passes to on its device (None: no autocast)."""
    device = trainer.strategy.root_device.type
    with trainer.precision_plugin.forward_context():
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def resolve_crafting_precision(crafting_precision: CraftingPrecision, trainer: pl.Trainer) -> torch.dtype | None:
    """What a `crafting_precision` setting is in `trainer`'s run: the `Attack`'s `crafting_precision` dtype."""
    return trainer_autocast(trainer) if crafting_precision == "trainer" else None
