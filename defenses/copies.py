"""Many copies of one model, copy i fine-tuned on shard i: stacked parameters under `vmap`, in chunks of copies
sized from the memory one copy measurably takes on the accelerator.

The model runs in eval mode: dropout off and batch norm on its frozen running statistics, so a copy's forward pass
is the deployed model's and no copy's statistics drift with its shard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from typing_extensions import override

from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.forward import ModuleForward, plain_forward
from trainguard.defenses.heldout import LabeledData
from trainguard.defenses.task import Task, as_task

CPU_CHUNK = 128  # copies per chunk off CUDA, where memory is not the limit that matters
MEMORY_SHARE = 0.5  # of the free CUDA memory one chunk may take: allocator fragmentation and cuDNN workspaces


Readout = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""What is read off the held-out outputs of a copy: (outputs, targets) -> (rows, k) per-row scores."""


@dataclass(frozen=True)
class Finetuned:
    """Held-out scores (copies x checkpoints x rows x k: the readout after each checkpoint's step; by default
    `Task.soft_correct`, the true-class probability for classification, k = 1) and the copies trained at once."""

    scores: torch.Tensor
    chunk_size: int


class _Hooked(nn.Module):
    """The model behind a `forward(module, batch, x)` hook, as one module `functional_call` can swap weights into."""

    def __init__(self, model: nn.Module, forward: ModuleForward | None) -> None:
        super().__init__()
        self.model = model
        self.hook = forward or plain_forward

    @override
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.hook(self.model, batch, batch["x"])


def _stacked(parts: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """Parts of up to `n` rows stacked as (parts x n x ...), each padded with copies of its first row (inputs on
    which the model runs as on real rows; a 0 weight drops them from the loss)."""
    out = parts[0][:1].expand(len(parts), n, *parts[0].shape[1:]).clone()
    for i, part in enumerate(parts):
        out[i, : len(part)] = part
    return out


def _padded(shards: Sequence[LabeledData]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Stacks shards of different sizes: the batch (features, targets, extra inputs) and a 0/1 weight that masks
    the padding."""
    n = max(len(s) for s in shards)
    batch = {
        "x": _stacked([s.x.float() for s in shards], n),
        "y": _stacked([s.y for s in shards], n),
        **{name: _stacked([s.extras[name] for s in shards], n) for name in shards[0].extras},
    }
    weights = (torch.arange(n) < torch.tensor([len(s) for s in shards]).unsqueeze(1)).float()
    return batch, weights


Step = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor], dict[str, torch.Tensor]]


def _step_function(model: _Hooked, buffers: dict[str, torch.Tensor], lr: float, task: Task) -> Step:
    """One full-batch gradient step on the task's loss of one model copy on one (padded, weighted) shard."""

    def loss(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], w: torch.Tensor) -> torch.Tensor:
        outputs = functional_call(model, (params, buffers), (batch,))
        return (task.sample_loss(outputs, batch["y"]) * w).sum() / w.sum()

    loss_grad = grad(loss)

    def step(
        params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], w: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        grads = loss_grad(params, batch, w)
        return {name: p - lr * grads[name] for name, p in params.items()}

    return step


def finetune_heldout_scores(
    model: nn.Module,
    shards: Sequence[LabeledData],
    holdout: LabeledData,
    *,
    lr: float,
    steps: int,
    checkpoints: Sequence[int] | None = None,
    readout: Readout | None = None,
    chunk_size: int | None = None,
    batched: bool = True,
    task: Task | str | None = None,
    forward: ModuleForward | None = None,
    progress: Callable[[int], None] | None = None,
) -> Finetuned:
    """Held-out scores of len(shards) copies of `model`, copy i read after each of `checkpoints` (default: `steps`
    alone) of its `steps` full-batch gradient steps of size `lr` on shard i, on the `task`'s terms (default
    classification); `readout(outputs, targets)` gives the per-row scores (default the task's `soft_correct`).
    `forward(module, batch, x)` reads extra model inputs from `LabeledData.batch`. The model is left unchanged.
    `progress(copies)` is told each chunk's copies as they finish (a screening's progress display counts them).

    `chunk_size` None: on CUDA the first copy trains alone while its peak memory is measured and the rest train in
    chunks filling half the free memory; elsewhere 128 copies at a time. A chunk that still fails for memory (or
    cuDNN refusing a batched convolution that large) is retried in halves.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    hooked = _Hooked(model, forward)
    try:
        params = {n: p.detach() for n, p in hooked.named_parameters()}
        buffers = {n: b.detach() for n, b in hooked.named_buffers()}
        scoring = as_task(task)
        read = readout or (lambda outputs, y: scoring.soft_correct(outputs, y).unsqueeze(-1))
        marks = sorted(set(checkpoints or (steps,)))
        if not marks or marks[0] < 1 or marks[-1] > steps:
            raise ScreeningInputError(f"checkpoints must be steps in [1, {steps}], got {checkpoints!r}")
        step = _step_function(hooked, buffers, lr, scoring)
        heldout = {name: value.to(device) for name, value in holdout.batch(slice(None)).items()}

        def heldout_scores(p: dict[str, torch.Tensor]) -> torch.Tensor:
            return read(functional_call(hooked, (p, buffers), (heldout,)), heldout["y"])

        def train(chunk: Sequence[LabeledData]) -> torch.Tensor:
            padded, ws = _padded(chunk)
            batch, ws = {name: value.to(device) for name, value in padded.items()}, ws.to(device)
            if batched:
                stacked = {n: p.unsqueeze(0).expand(len(ws), *p.shape).clone() for n, p in params.items()}
                batched_step = vmap(step, randomness="different")
                read_all = vmap(heldout_scores)
                seen = []
                for done in range(1, steps + 1):
                    stacked = batched_step(stacked, batch, ws)
                    if done in marks:
                        with torch.no_grad():
                            seen.append(read_all(stacked).cpu())
                return torch.stack(seen, 1)
            out = []
            for i, w in enumerate(ws):
                copy, seen = dict(params), []
                for done in range(1, steps + 1):
                    copy = step(copy, {name: value[i] for name, value in batch.items()}, w)
                    if done in marks:
                        with torch.no_grad():
                            seen.append(heldout_scores(copy).cpu())
                out.append(torch.stack(seen).unsqueeze(0))
            return torch.cat(out)

        return _in_chunks(train, shards, chunk_size, device, progress or _untold)
    finally:
        model.train(was_training)


def _untold(copies: int) -> None:
    """No one counts the copies."""


def _in_chunks(
    train: Callable[[Sequence[LabeledData]], torch.Tensor],
    shards: Sequence[LabeledData],
    chunk_size: int | None,
    device: torch.device,
    progress: Callable[[int], None] = _untold,
) -> Finetuned:
    done: list[torch.Tensor] = []
    start = 0
    if chunk_size is None and device.type == "cuda":
        first = _measured(train, shards[:1], device)
        done.append(first.scores)
        progress(1)
        start = 1
        chunk_size = _fitting_chunk(first.per_copy, device)
    size = chunk_size or CPU_CHUNK
    while start < len(shards):
        chunk = shards[start : start + size]
        try:
            done.append(train(chunk))
        except (torch.cuda.OutOfMemoryError, RuntimeError) as error:
            if len(chunk) == 1 or not _out_of_room(error):
                raise
            torch.cuda.empty_cache()
            size = max(1, len(chunk) // 2)
            continue
        start += len(chunk)
        progress(len(chunk))
    return Finetuned(torch.cat(done), size)


@dataclass(frozen=True)
class _Measured:
    scores: torch.Tensor
    per_copy: int


def _measured(
    train: Callable[[Sequence[LabeledData]], torch.Tensor], shards: Sequence[LabeledData], device: torch.device
) -> _Measured:
    """Trains `shards` while measuring the CUDA memory they take beyond what was allocated before (bytes per copy)."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    scores = train(shards)
    torch.cuda.synchronize(device)
    return _Measured(scores, max(1, (torch.cuda.max_memory_allocated(device) - before) // len(shards)))


def _fitting_chunk(per_copy: int, device: torch.device) -> int:
    """Copies per chunk that fit MEMORY_SHARE of the memory still free (cached-but-unused blocks count as free)."""
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, int(MEMORY_SHARE * (free + cached)) // per_copy)


def _out_of_room(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "CUDNN_STATUS" in str(error)
