"""How a defense calls the model: `module(x)`, or a user hook `forward(module, batch, x)` that also reads the model's
extra inputs (masks, lengths) from the batch, so attacks perturb `x` alone while the model still sees the rest.

Held-out sets (`LabeledData`) hand the hook a dict batch: `x`, `y` and their extras by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

ModuleForward = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]


def plain_forward(module: nn.Module, batch: Any, x: torch.Tensor) -> torch.Tensor:
    """The default: the model on the input alone."""
    output: torch.Tensor = module(x)
    return output


def batch_input(batch: Any) -> torch.Tensor:
    """The clean input of a batch a hook is handed: `batch["x"]` of a held-out dict batch, else position 0 of a
    (inputs, targets) tuple or list, as Lightning's loaders give it.

    A `forward(module, batch, x)` hook calls it where it needs the clean input beside the perturbed `x`.

    Args:
        batch: A mapping with `"x"`, or a sequence whose first item is the input.

    Returns:
        The batch's input tensor.
    """
    x: torch.Tensor = batch["x"] if isinstance(batch, Mapping) else batch[0]
    return x


class BatchForward:
    """The one-argument forward an attack calls: the hook applied to the batch being attacked (`on(batch)`)."""

    def __init__(self, module: nn.Module, hook: ModuleForward | None) -> None:
        self.module = module
        self.hook = hook or plain_forward
        self.batch: Any = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook(self.module, self.batch, x)

    @contextlib.contextmanager
    def on(self, batch: Any) -> Iterator[None]:
        """Forward passes inside the block read their extra inputs from `batch`."""
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None


def batch_rows(batch: Any, rows: torch.Tensor | slice, n: int, *, copy: bool = False) -> Any:
    """`batch` restricted to `rows`: every tensor entry with `n` leading rows is indexed, other entries are kept, so
    the extra inputs of an attacked subset stay aligned with its rows. `copy` clones every tensor (inference-mode
    tensors, as `Trainer.validate` makes them, cannot enter autograd)."""

    def pick(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.dim() > 0 and value.shape[0] == n:
            value = value[rows]
        return value.clone() if copy else value

    if isinstance(batch, Mapping):
        return {key: pick(value) for key, value in batch.items()}
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return [pick(value) for value in batch]
    return batch
