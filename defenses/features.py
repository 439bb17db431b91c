"""Head-scope screening's split of a model: the last layer(s) each copy fine-tunes, and their frozen input features.

The features are the input of the head's first module, captured by a forward pre-hook in one eval-mode pass per
dataset, so the trunk (convolutions, batch norm) runs once per row instead of once per copy and step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from trainguard.defenses.errors import ScreeningInputError


@dataclass(frozen=True)
class HeadSplit:
    """`head` maps the input of module `entry` (a path in the model) to the model's logits."""

    entry: str
    head: nn.Module


def has_head(model: nn.Module, feature_layer: str | None = None) -> bool:
    """Whether `split_head` finds a head: the named `feature_layer`, or any nn.Linear."""
    if feature_layer is not None:
        return True  # split_head refuses a name the model lacks, in words
    return any(isinstance(m, nn.Linear) for m in model.modules())


def split_head(model: nn.Module, feature_layer: str | None = None, head_layers: int = 1) -> HeadSplit:
    """The head named by `feature_layer` (the module whose input is the feature), else the last `head_layers` Linear
    layers: the last registered `nn.Linear` (a torchvision-style `fc` or `classifier`) and, inside the same
    `nn.Sequential`, everything from the `head_layers`-th Linear from the end onwards.

    When `feature_layer` names a child of an `nn.Sequential`, its later siblings belong to the head too.
    """
    if head_layers < 1:
        raise ScreeningInputError("head-scope screening: head_layers must be >= 1")
    names = dict(model.named_modules())
    if feature_layer is not None and feature_layer not in names:
        raise ScreeningInputError(
            f"head-scope screening: the model has no module {feature_layer!r}; name one of its modules "
            "(e.g. 'fc') as feature_layer"
        )
    entry = feature_layer or _last_linear(names)
    parent_name, _, child = entry.rpartition(".")
    parent = names[parent_name]
    if not isinstance(parent, nn.Sequential):
        if head_layers > 1 and feature_layer is None:
            raise ScreeningInputError(
                f"head-scope screening: {entry!r} is not inside an nn.Sequential, so head_layers > 1 cannot "
                "follow it; name the first head module as feature_layer"
            )
        return HeadSplit(entry, names[entry])
    children = list(parent.named_children())
    start = next(i for i, (name, _) in enumerate(children) if name == child)
    if feature_layer is None:
        linears = [i for i, (_, m) in enumerate(children[: start + 1]) if isinstance(m, nn.Linear)]
        if len(linears) < head_layers:
            raise ScreeningInputError(
                f"head-scope screening: {parent_name or 'the model'} holds {len(linears)} Linear layers, fewer "
                f"than head_layers={head_layers}; lower head_layers or name feature_layer"
            )
        start = linears[-head_layers]
    entry = f"{parent_name}.{children[start][0]}" if parent_name else children[start][0]
    return HeadSplit(entry, nn.Sequential(*(m for _, m in children[start:])))


def _last_linear(names: dict[str, nn.Module]) -> str:
    linears = [name for name, module in names.items() if isinstance(module, nn.Linear)]
    if not linears:
        raise ScreeningInputError(
            "head-scope screening: the model has no nn.Linear layer; name the head's first module as feature_layer"
        )
    return linears[-1]


@torch.no_grad()
def head_features(
    model: nn.Module, split: HeadSplit, inputs: Sequence[torch.Tensor], batch_size: int = 512
) -> list[torch.Tensor]:
    """The head's input features of each tensor in `inputs` (on the CPU, float32), the model in eval mode.

    Checks on the first batch that the head applied to the features gives the model's own logits, so a wrongly
    guessed or named head (one followed by more code in `forward`) is refused instead of screening another model.
    """
    entry = dict(model.named_modules())[split.entry]
    device = next(model.parameters()).device
    captured: list[torch.Tensor] = []
    hook = entry.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    try:
        out = []
        checked = False
        for x in inputs:
            parts = []
            for start in range(0, len(x), batch_size):
                captured.clear()
                logits = model(x[start : start + batch_size].to(device))
                if len(captured) != 1:
                    raise ScreeningInputError(
                        f"head-scope screening: module {split.entry!r} ran {len(captured)} times in one forward "
                        "pass; name a module that runs once as feature_layer"
                    )
                if not checked:
                    _check_head(split, captured[0], logits)
                    checked = True
                parts.append(captured[0].float().cpu())
            out.append(torch.cat(parts))
        return out
    finally:
        hook.remove()
        model.train(was_training)


def _check_head(split: HeadSplit, features: torch.Tensor, logits: torch.Tensor) -> None:
    again = split.head(features)
    if again.shape != logits.shape or not torch.allclose(again.float(), logits.float(), rtol=1e-3, atol=1e-4):
        raise ScreeningInputError(
            f"head-scope screening: the model's output is not the head from {split.entry!r} applied to that module's "
            "input; name as feature_layer the module after which forward() does nothing else"
        )
