"""Square Attack (Andriushchenko et al., 2020, "Square Attack: a query-efficient black-box adversarial attack via
random search", ECCV), L-inf: score-based random search on the margin loss z_y - max_{j != y} z_j, from forward
passes only, so it works through models whose gradients are masked or absent.

It starts from vertical stripes of +-eps (one sign per channel and column) and then, per query, sets a random square
window of each row to x +- eps (one random sign per channel), keeping the change when the margin falls. The window
covers a share p of the image, p following the published schedule (p_init halved at queries 10, 50, 200, 500, 1000,
2000, 4000, 6000 and 8000 of 10,000, rescaled to the query budget, as AutoAttack does). Rows the model already
misclassifies are never queried; a row stops as soon as its margin is <= 0. Unlike AutoAttack's batched version,
each row draws its own window and signs (as in the paper). Inputs shaped (N, C, H, W) get square windows; any other
shape is treated as one channel of a flat vector, whose windows are contiguous runs of a share p of its features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import nn

from trainguard.defenses.attacks.base import Attack
from trainguard.defenses.errors import AttackConfigError, TooFewClassesError

P_INIT = 0.8
QUERIES = 5000
# The published schedule for 10,000 queries: p is p_init / 2**k after the k-th of these queries.
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_SCHEDULE_QUERIES = 10_000


def square_fraction(query: int, queries: int, p_init: float = P_INIT) -> float:
    """The share p of the image the window covers at (0-based) `query` of `queries`, on the published schedule."""
    scaled = int(query / queries * _SCHEDULE_QUERIES)
    return p_init / 2 ** sum(scaled > mark for mark in HALVINGS)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row z_y - max_{j != y} z_j (in float32 at least): <= 0 exactly when the row is misclassified."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -torch.inf).amax(1)
    return true - others


class Square(Attack):
    """Square Attack, L-inf, untargeted: at most `queries` queries per row after its first, window share from
    `p_init`. `loss=` and `targeted=True` are refused (the margin loss is its own); L2 is not implemented."""

    def __init__(
        self, model: nn.Module, *, eps: float, queries: int = QUERIES, p_init: float = P_INIT, **kwargs: object
    ) -> None:
        if kwargs.get("loss") is not None:
            raise AttackConfigError("Square minimises its own margin loss; loss= cannot be set")
        if kwargs.get("targeted"):
            raise AttackConfigError("Square is untargeted here; pass true labels")
        super().__init__(model, eps=eps, **kwargs)
        self.task.refuse_unless(("classification",), "Square")
        if self.norm != "inf":
            raise AttackConfigError("Square runs under L-inf only (its L2 version is not implemented): use norm='inf'")
        if queries < 1:
            raise AttackConfigError(f"queries must be >= 1, got {queries!r}")
        if not 0 < p_init <= 1:
            raise AttackConfigError(f"p_init must be in (0, 1], got {p_init!r}")
        self.queries = int(queries)
        self.p_init = float(p_init)

    def _perturb(
        self, x: torch.Tensor, y: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        image = _as_image(x)
        lo, hi = _as_image(lower.expand_as(x)), _as_image(upper.expand_as(x))
        gen = self.generator(x.device)
        rows = (self._margin(x, y) > 0).nonzero().squeeze(1)
        if len(rows) == 0:
            return x.clone()
        x0 = image[rows]
        low, high = torch.maximum(x0 - eps, lo[rows]), torch.minimum(x0 + eps, hi[rows])
        n, channels, height, width = x0.shape
        start = (x0 + eps * self._signs((n, channels, 1, width), gen, x.dtype)).clamp(low, high)
        search = _Search(rows, y[rows], low, high, start, self._margin(start.view(n, *x.shape[1:]), y[rows]))
        out = image.clone()
        for query in range(self.queries):
            broken = search.margin <= 0
            if broken.any():
                out[search.at[broken]] = search.best[broken]
                search = search.keep(~broken)
            if len(search.at) == 0:
                break
            window = self._window(len(search.at), height, width, square_fraction(query, self.queries, self.p_init), gen)
            signs = self._signs((len(search.at), channels, 1, 1), gen, x.dtype)
            candidate = torch.where(window, search.best + 2 * eps * signs, search.best).clamp(search.low, search.high)
            found = self._margin(candidate.view(len(search.at), *x.shape[1:]), search.y)
            better = found < search.margin
            best = torch.where(better.view(-1, 1, 1, 1), candidate, search.best)
            search = replace(search, best=best, margin=torch.where(better, found, search.margin))
        out[search.at] = search.best
        return out.reshape(x.shape)

    def _margin(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The margin of each row, from a forward pass without autograd at the attack's precision."""
        with torch.no_grad(), self.precision(x.device):
            logits = self.forward(x)
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise TooFewClassesError(
                f"Square needs logits of shape (batch, classes >= 2), got {tuple(logits.shape)}",
                classes=logits.shape[1] if logits.dim() == 2 else None,
            )
        return margin_loss(logits, y)

    @staticmethod
    def _signs(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """Uniform random signs +-1."""
        return torch.randint(0, 2, shape, generator=gen, device=gen.device).to(dtype) * 2 - 1

    @staticmethod
    def _window(n: int, height: int, width: int, p: float, gen: torch.Generator) -> torch.Tensor:
        """A boolean (n, 1, height, width) mask per row: a random square covering a share p of the image (side at
        most one less than the image's), or a run of a share p of the features where `height` is 1."""
        if height == 1:
            tall, wide = 1, min(max(round(p * width), 1), max(width - 1, 1))
        else:
            side = max(min(round(math.sqrt(p * height * width)), min(height, width) - 1), 1)
            tall, wide = side, side
        top = torch.randint(0, height - tall + 1, (n, 1, 1, 1), generator=gen, device=gen.device)
        left = torch.randint(0, width - wide + 1, (n, 1, 1, 1), generator=gen, device=gen.device)
        ys = torch.arange(height, device=gen.device).view(1, 1, -1, 1)
        xs = torch.arange(width, device=gen.device).view(1, 1, 1, -1)
        return (ys >= top) & (ys < top + tall) & (xs >= left) & (xs < left + wide)


@dataclass(frozen=True)
class _Search:
    """The rows still searched: their places in the batch, labels, the box they may move in, best point and margin."""

    at: torch.Tensor
    y: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    best: torch.Tensor
    margin: torch.Tensor

    def keep(self, rows: torch.Tensor) -> _Search:
        """The search on the rows selected by the boolean mask `rows` only."""
        return _Search(*(getattr(self, field.name)[rows] for field in fields(self)))


def _as_image(x: torch.Tensor) -> torch.Tensor:
    """`x` as (N, C, H, W): images as they are, anything else as one channel of one row of features."""
    return x if x.dim() == 4 else x.reshape(x.shape[0], 1, 1, -1)
