"""Reading and replacing the input/target entries of a training batch: `(x, y)` tuples or lists, or dicts."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, MutableSequence, Sequence
from dataclasses import dataclass

import torch

from trainguard.defenses.errors import BatchFormatError

Key = int | str


@dataclass(frozen=True)
class BatchKeys:
    """Where the inputs and the targets sit in a batch; None means index 0 / 1 of a tuple or list."""

    input: Key | None = None
    target: Key | None = None

    def resolve(self, batch: object) -> tuple[Key, Key]:
        if isinstance(batch, Mapping):
            if self.input is None or self.target is None:
                raise BatchFormatError(
                    f"dict batch with keys {sorted(map(str, batch))}: pass input_key= and target_key=", key=None
                )
            return self.input, self.target
        if isinstance(batch, Sequence) and not isinstance(batch, str):
            return (0 if self.input is None else self.input), (1 if self.target is None else self.target)
        raise BatchFormatError(f"batches must be tuples, lists or dicts, got {type(batch).__name__}")

    def get(self, batch: object) -> tuple[torch.Tensor, torch.Tensor]:
        """The (inputs, targets) tensors of `batch`."""
        ikey, tkey = self.resolve(batch)
        return _entry(batch, ikey), _entry(batch, tkey)

    def set_input(self, batch: object, x_new: torch.Tensor) -> None:
        """Replaces the inputs of `batch` in place: Lightning passes this same object on to `training_step`.

        Lists and dicts get a new tensor; an immutable tuple keeps its tensor, whose values are overwritten.
        """
        ikey, _ = self.resolve(batch)
        if isinstance(batch, MutableMapping):
            batch[ikey] = x_new
            return
        if isinstance(batch, MutableSequence) and isinstance(ikey, int):
            batch[ikey] = x_new
            return
        _entry(batch, ikey).copy_(x_new)


def _entry(batch: object, key: Key) -> torch.Tensor:
    try:
        value = batch[key]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        raise BatchFormatError(f"batch has no entry {key!r}", key=key) from None
    if not isinstance(value, torch.Tensor):
        raise BatchFormatError(f"batch entry {key!r} is a {type(value).__name__}, expected a tensor", key=key)
    return value
