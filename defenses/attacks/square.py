"""Square Attack (Andriushchenko et al., 2020, "Square Attack: a query-efficient black-box adversarial attack via
random search", ECCV), L-inf and L2: score-based random search on the margin loss z_y - max_{j != y} z_j, from
forward passes only, so it works through models whose gradients are masked or absent.

L-inf starts from vertical stripes of +-eps (one sign per channel and column) and then, per query, sets a random
square window of each row to x +- eps (one random sign per channel). L2 starts from a grid of +-patterns on the eps
sphere and, per query, redistributes the perturbation's mass between two random windows (the paper's Algorithm 3).
A change is kept when the margin falls. The window covers a share p of the image, p following the published schedule
(p_init halved at queries 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 of 10,000, rescaled to the query budget,
as AutoAttack does). Rows the model already misclassifies are never queried; a row stops as soon as its margin is
<= 0. Unlike AutoAttack's batched version, each row draws its own windows, signs and pattern orientations (as in the
paper). L-inf takes (N, C, H, W) images, and any other shape as one channel of a flat vector, whose windows are
contiguous runs of a share p of its features; L2 takes images only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Unpack

import torch
from torch import nn
from typing_extensions import override

from trainguard.defenses.attacks.base import Attack, AttackKeywords
from trainguard.defenses.errors import AttackConfigError, AttackInputError, TooFewClassesError

P_INIT = 0.8
QUERIES = 5000
# The published schedule for 10,000 queries: p is p_init / 2**k after the k-th of these queries.
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)
_SCHEDULE_QUERIES = 10_000


def square_fraction(query: int, queries: int, p_init: float = P_INIT) -> float:
    """The share p of the image the window covers at (0-based) `query` of `queries`, on the published schedule."""
    scaled = int(query / queries * _SCHEDULE_QUERIES)
    return p_init / 2.0 ** sum(scaled > mark for mark in HALVINGS)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row z_y - max_{j != y} z_j (in float32 at least): <= 0 exactly when the row is misclassified."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], -torch.inf).amax(1)
    return true - others


class Square(Attack):
    """Square Attack, L-inf or L2, untargeted: at most `queries` queries per row after its start, window share from
    `p_init`. Rows it cannot break come back at their lowest-margin point. `loss=` and `targeted=True` are refused
    (the margin loss is its own)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float,
        queries: int = QUERIES,
        p_init: float = P_INIT,
        **kwargs: Unpack[AttackKeywords],
    ) -> None:
        if kwargs.get("loss") is not None:
            raise AttackConfigError("Square minimises its own margin loss; loss= cannot be set")
        if kwargs.get("targeted"):
            raise AttackConfigError("Square is untargeted here; pass true labels")
        super().__init__(model, eps=eps, **kwargs)
        self.task.refuse_unless(("classification",), "Square")
        if queries < 1:
            raise AttackConfigError(f"queries must be >= 1, got {queries!r}")
        if not 0 < p_init <= 1:
            raise AttackConfigError(f"p_init must be in (0, 1], got {p_init!r}")
        self.queries = int(queries)
        self.p_init = float(p_init)

    @override
    def _perturb(
        self, x: torch.Tensor, y: torch.Tensor, eps: float, lower: torch.Tensor, upper: torch.Tensor
    ) -> torch.Tensor:
        if self.norm == "2" and x.dim() != 4:
            raise AttackInputError(f"Square L2 needs image batches (N, C, H, W), got shape {tuple(x.shape)}")
        image = _as_image(x)
        lo, hi = _as_image(lower.expand_as(x)), _as_image(upper.expand_as(x))
        gen = self.generator(x.device)
        rows = (self._margin(x, y) > 0).nonzero().squeeze(1)
        if len(rows) == 0:
            return x.clone()
        x0, low, high = image[rows], lo[rows], hi[rows]
        if self.norm == "inf":
            low, high = torch.maximum(x0 - eps, low), torch.minimum(x0 + eps, high)
            start = (x0 + eps * _signs((len(rows), x0.shape[1], 1, x0.shape[3]), gen, x.dtype)).clamp(low, high)
        else:
            start = (x0 + eps * _unit(_stacked_patterns(x0.shape, gen, x.dtype))).clamp(low, high)
        start_margin = self._margin(start.reshape(len(rows), *x.shape[1:]), y[rows])
        search = _Search(rows, x0, y[rows], low, high, start, start_margin)
        out = image.clone()
        for query in range(self.queries):
            broken = search.margin <= 0
            if broken.any():
                out[search.at[broken]] = search.best[broken]
                search = search.keep(~broken)
            if len(search.at) == 0:
                break
            p = square_fraction(query, self.queries, self.p_init)
            candidate = _step_inf(search, p, eps, gen) if self.norm == "inf" else _step_l2(search, p, eps, gen)
            found = self._margin(candidate.reshape(len(search.at), *x.shape[1:]), search.y)
            better = found < search.margin
            best = torch.where(better.view(-1, 1, 1, 1), candidate, search.best)
            search = replace(search, best=best, margin=torch.where(better, found, search.margin))
        out[search.at] = search.best
        return out.reshape(x.shape)

    def _margin(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The margin of each row, from a forward pass without autograd at the attack's crafting precision."""
        with torch.no_grad(), self.at_crafting_precision(x.device):
            logits = self.forward(x)
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise TooFewClassesError(
                f"Square needs logits of shape (batch, classes >= 2), got {tuple(logits.shape)}",
                classes=logits.shape[1] if logits.dim() == 2 else None,
            )
        return margin_loss(logits, y)


@dataclass(frozen=True)
class _Search:
    """The rows still searched: their places in the batch, clean inputs, labels, the box their points stay in (the
    bounds, within eps for L-inf), best point and its margin."""

    at: torch.Tensor
    x: torch.Tensor
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


def _step_inf(search: _Search, p: float, eps: float, gen: torch.Generator) -> torch.Tensor:
    """L-inf candidates: a random window of each row's best point (share p) moved to x +- eps, one sign per
    channel."""
    n, channels, height, width = search.best.shape
    if height == 1:
        tall, wide = 1, min(max(round(p * width), 1), max(width - 1, 1))
    else:
        side = max(min(round(math.sqrt(p * height * width)), min(height, width) - 1), 1)
        tall, wide = side, side
    top, left = _corners(n, height - tall, width - wide, gen)
    window = _mask(top, left, tall, wide, height, width)
    signs = _signs((n, channels, 1, 1), gen, search.best.dtype)
    return torch.where(window, search.best + 2 * eps * signs, search.best).clamp(search.low, search.high)


def _step_l2(search: _Search, p: float, eps: float, gen: torch.Generator) -> torch.Tensor:
    """L2 candidates (the paper's Algorithm 3): in a random window the perturbation becomes a fresh +-pattern plus
    its old normalised content, rescaled to take the mass of that window, of a second random window (emptied) and
    whatever of eps the perturbation has not used; the whole is rescaled onto the eps sphere."""
    n, channels, height, width = search.best.shape
    side = max(round(math.sqrt(p * height * width)), 3)
    side = min(side + 1 - side % 2, height, width)
    top, left = _corners(n, height - side, width - side, gen)
    top2, left2 = _corners(n, height - side, width - side, gen)
    first, second = _mask(top, left, side, side, height, width), _mask(top2, left2, side, side, height, width)
    delta = search.best - search.x
    old = _crop(delta, top, left, side)
    spare = (eps**2 - _l2(delta) ** 2).clamp_min(0) / channels + _l2(delta * (first | second)) ** 2
    fresh = _patterns(n, side, gen, delta.dtype) * _signs((n, channels, 1, 1), gen, delta.dtype)
    fresh = fresh + old / (old.pow(2).sum((2, 3), keepdim=True).sqrt() + 1e-12)
    fresh = fresh / (fresh.pow(2).sum((2, 3), keepdim=True).sqrt() + 1e-12) * spare.sqrt()
    delta = delta.masked_fill(second, 0.0)
    delta = delta.masked_scatter(first.expand_as(delta), fresh.contiguous())
    return (search.x + eps * _unit(delta)).clamp(search.low, search.high)


def square_pattern(side: int) -> torch.Tensor:
    """The paper's L2 window pattern (float64, unit norm): over its upper half (rows < side // 2) and, negated, its
    lower half, a pyramid centred on the half whose entry at Chebyshev distance d from the centre is
    sum_{k >= d} 1 / (k + 1)^2 over the half's rings, each half first scaled to unit norm."""
    halves = []
    for rows, sign in ((side // 2, 1.0), (side - side // 2, -1.0)):
        rings = max(rows // 2 + 1, side // 2 + 1)
        tail = (1.0 / torch.arange(1, rings + 1, dtype=torch.float64) ** 2).flip(0).cumsum(0).flip(0)
        r = (torch.arange(rows)[:, None] - rows // 2).abs()
        c = (torch.arange(side)[None, :] - side // 2).abs()
        half = tail[torch.maximum(r, c)]
        halves.append(sign * half / half.norm().clamp_min(1e-300))
    pattern = torch.cat(halves)
    norm: torch.Tensor = pattern.norm()  # Tensor.norm is unannotated
    return pattern / norm


def _patterns(n: int, side: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """`square_pattern(side)` per row, (n, 1, side, side), transposed for a random half of the rows."""
    pattern = square_pattern(side).to(device=gen.device, dtype=dtype)
    flip = torch.randint(0, 2, (n, 1, 1, 1), generator=gen, device=gen.device).bool()
    return torch.where(flip, pattern.T, pattern).expand(n, 1, side, side)


def _stacked_patterns(shape: torch.Size, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """The paper's L2 start: a grid of `square_pattern`s of side min(H, W) // 5, centred, one random sign per
    block, channel and row."""
    n, channels, height, width = shape
    side = max(min(height, width) // 5, 1)
    delta = torch.zeros(shape, dtype=dtype, device=gen.device)
    for top in range(max((height - 5 * side) // 2, 0), height - side + 1, side):
        for left in range(max((width - 5 * side) // 2, 0), width - side + 1, side):
            block = _patterns(n, side, gen, dtype) * _signs((n, channels, 1, 1), gen, dtype)
            delta[:, :, top : top + side, left : left + side] += block
    return delta


def _corners(n: int, max_top: int, max_left: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, a uniform random window corner with top in [0, max_top] and left in [0, max_left]."""
    top = torch.randint(0, max_top + 1, (n, 1, 1, 1), generator=gen, device=gen.device)
    return top, torch.randint(0, max_left + 1, (n, 1, 1, 1), generator=gen, device=gen.device)


def _mask(top: torch.Tensor, left: torch.Tensor, tall: int, wide: int, height: int, width: int) -> torch.Tensor:
    """A boolean (n, 1, height, width) mask of each row's window."""
    ys = torch.arange(height, device=top.device).view(1, 1, -1, 1)
    xs = torch.arange(width, device=top.device).view(1, 1, 1, -1)
    return (ys >= top) & (ys < top + tall) & (xs >= left) & (xs < left + wide)


def _crop(t: torch.Tensor, top: torch.Tensor, left: torch.Tensor, side: int) -> torch.Tensor:
    """Each row's side x side window of `t` (n, c, h, w), as (n, c, side, side)."""
    span = torch.arange(side, device=t.device)
    rows = (top.view(-1, 1) + span).view(-1, 1, side, 1)
    cols = (left.view(-1, 1) + span).view(-1, 1, 1, side)
    batch = torch.arange(t.shape[0], device=t.device).view(-1, 1, 1, 1)
    channel = torch.arange(t.shape[1], device=t.device).view(1, -1, 1, 1)
    return t[batch, channel, rows, cols]


def _signs(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Uniform random signs +-1."""
    return torch.randint(0, 2, shape, generator=gen, device=gen.device).to(dtype) * 2 - 1


def _l2(t: torch.Tensor) -> torch.Tensor:
    """Per-row L2 norm, shaped (n, 1, 1, 1)."""
    norms: torch.Tensor = t.flatten(1).norm(dim=1)  # Tensor.norm is unannotated
    return norms.view(-1, 1, 1, 1)


def _unit(t: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit L2 norm (a zero row stays zero)."""
    return t / (_l2(t) + 1e-12)
