"""Reject On Negative Impact (Nelson et al.) per candidate shard or source, calibrated on known-good data.

Each candidate fine-tunes a copy of the current model for a fixed budget; its impact is how much the held-out soft
accuracy (mean probability of the true class, overall and per class) drops. The soft accuracy is bounded per row, so
a few hard held-out rows cannot dominate it as they dominate the cross-entropy. Calibration shards of the same size
drawn from trusted data give the distribution of clean impacts; a candidate is rejected when an impact exceeds
median + k * MAD of that distribution. All copies (calibration and candidates) train together: stacked parameters,
`torch.func.functional_call` under `vmap`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.heldout import LabeledData, per_class_mean

MAD_TO_SIGMA = 1.4826  # makes the MAD a consistent estimate of a normal standard deviation


@dataclass(frozen=True)
class Candidate:
    """One shard (or the concatenated shards of one source) offered for this cycle's training."""

    name: str
    source: str
    data: LabeledData


@dataclass(frozen=True)
class ScreeningConfig:
    """Fine-tuning budget and decision rule of the screening.

    `k` is how many robust standard deviations (1.4826 * MAD) above the median calibration impact the overall impact
    may lie; `class_k` the same per class, in units of the median per-class robust deviation (pooled over classes,
    since a class whose calibration impacts barely vary would otherwise flag every small change).
    `calibration_shards` clean shards are drawn (without replacement inside a shard) from the trusted data, each as
    large as the smallest candidate unless `calibration_size` is set. `chunk_size` bounds how many copies train at
    once (memory); `batched=False` trains them one after another (same results, for comparison).
    """

    steps: int = 20
    lr: float = 0.5
    k: float = 5.0
    class_k: float = 18.0
    per_class: bool = True
    calibration_shards: int = 40
    calibration_size: int | None = None
    num_classes: int | None = None
    chunk_size: int = 128
    batched: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.k <= 0 or self.class_k <= 0:
            raise ScreeningInputError("screening config: steps >= 1, lr > 0, k > 0 and class_k > 0 are required")
        if self.calibration_shards < 5:
            raise ScreeningInputError(
                "screening config: at least 5 calibration shards are needed for robust statistics"
            )
        if self.chunk_size < 1:
            raise ScreeningInputError("screening config: chunk_size must be >= 1")


@dataclass(frozen=True)
class CandidateDecision:
    """Drop of the held-out soft accuracy caused by one candidate, the thresholds it was held to, and the verdict."""

    name: str
    source: str
    size: int
    impact: float
    threshold: float
    class_impacts: tuple[float, ...]
    class_thresholds: tuple[float, ...]
    score: float
    accepted: bool
    reason: str


@dataclass(frozen=True)
class ScreeningReport:
    """All decisions of one screening, with the calibration they were measured against."""

    decisions: tuple[CandidateDecision, ...]
    threshold: float
    class_thresholds: tuple[float, ...]
    calibration_impacts: tuple[float, ...]
    calibration_size: int
    config: ScreeningConfig
    seconds: float
    base_soft_accuracy: float

    @property
    def accepted(self) -> tuple[CandidateDecision, ...]:
        return tuple(d for d in self.decisions if d.accepted)

    @property
    def rejected(self) -> tuple[CandidateDecision, ...]:
        return tuple(d for d in self.decisions if not d.accepted)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready data; non-finite numbers (classes absent from the held-out set) become None."""
        decisions = [
            {**asdict(d), "class_impacts": _finite(d.class_impacts), "class_thresholds": _finite(d.class_thresholds)}
            for d in self.decisions
        ]
        return {
            "threshold": self.threshold,
            "class_thresholds": _finite(self.class_thresholds),
            "calibration_impacts": list(self.calibration_impacts),
            "calibration_size": self.calibration_size,
            "base_soft_accuracy": self.base_soft_accuracy,
            "seconds": self.seconds,
            "config": asdict(self.config),
            "decisions": decisions,
        }


def _finite(values: Sequence[float]) -> list[float | None]:
    return [v if math.isfinite(v) else None for v in values]


def robust_scale(values: Sequence[float]) -> float:
    """1.4826 * median absolute deviation: a standard deviation that a minority of outliers cannot inflate."""
    arr = np.asarray(values, dtype=np.float64)
    return float(MAD_TO_SIGMA * np.median(np.abs(arr - np.median(arr))))


def robust_threshold(values: Sequence[float], k: float) -> float:
    """median + k * robust_scale: the largest impact still counted as clean."""
    if len(values) == 0:
        raise ScreeningInputError("robust threshold of an empty calibration set")
    return float(np.median(np.asarray(values, dtype=np.float64)) + k * robust_scale(values))


def group_by_source(candidates: Sequence[Candidate]) -> list[Candidate]:
    """One candidate per source, concatenating its shards (names joined with '+'), in first-seen order."""
    groups: dict[str, list[Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(candidate.source, []).append(candidate)
    return [
        Candidate(
            name="+".join(c.name for c in group),
            source=source,
            data=LabeledData(torch.cat([c.data.x for c in group]), torch.cat([c.data.y for c in group])),
        )
        for source, group in groups.items()
    ]


def _padded(shards: Sequence[LabeledData]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacks shards of different sizes: features, labels and a 0/1 weight that masks the padding."""
    n = max(len(s) for s in shards)
    xs = torch.zeros((len(shards), n, *shards[0].x.shape[1:]), dtype=torch.float32)
    ys = torch.zeros((len(shards), n), dtype=torch.int64)
    ws = torch.zeros((len(shards), n), dtype=torch.float32)
    for i, shard in enumerate(shards):
        xs[i, : len(shard)] = shard.x
        ys[i, : len(shard)] = shard.y
        ws[i, : len(shard)] = 1.0
    return xs, ys, ws


def _step_function(
    model: nn.Module, buffers: dict[str, torch.Tensor], lr: float
) -> Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]:
    """One full-batch gradient step of one model copy on one (padded, weighted) shard."""

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (params, buffers), (x,))
        return (F.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()

    loss_grad = grad(loss)

    def step(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
        grads = loss_grad(params, x, y, w)
        return {name: p - lr * grads[name] for name, p in params.items()}

    return step


def finetune_heldout_probabilities(
    model: nn.Module, shards: Sequence[LabeledData], holdout: LabeledData, config: ScreeningConfig
) -> torch.Tensor:
    """True-class probabilities per held-out row (K x H) of K copies of `model`, copy i fine-tuned on shard i.

    Each copy takes `config.steps` full-batch gradient steps of size `config.lr` on its shard.

    The model is used in eval mode (no dropout, frozen normalisation statistics) and left unchanged.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        step = _step_function(model, buffers, config.lr)

        def heldout_prob(p: dict[str, torch.Tensor]) -> torch.Tensor:
            logits = functional_call(model, (p, buffers), (holdout.x.to(device),))
            return _true_class_probability(logits, holdout.y.to(device))

        out = []
        for start in range(0, len(shards), config.chunk_size):
            xs, ys, ws = (t.to(device) for t in _padded(shards[start : start + config.chunk_size]))
            if config.batched:
                stacked = {n: p.unsqueeze(0).expand(len(xs), *p.shape).clone() for n, p in params.items()}
                batched_step = vmap(step, randomness="different")
                for _ in range(config.steps):
                    stacked = batched_step(stacked, xs, ys, ws)
                with torch.no_grad():
                    out.append(vmap(heldout_prob)(stacked).cpu())
            else:
                for x, y, w in zip(xs, ys, ws, strict=True):
                    copy = dict(params)
                    for _ in range(config.steps):
                        copy = step(copy, x, y, w)
                    with torch.no_grad():
                        out.append(heldout_prob(copy).unsqueeze(0).cpu())
        return torch.cat(out)
    finally:
        model.train(was_training)


def _true_class_probability(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def _heldout_probabilities(model: nn.Module, holdout: LabeledData) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        return _true_class_probability(model(holdout.x.to(device)), holdout.y.to(device)).cpu()
    finally:
        model.train(was_training)


def _calibration_shards(trusted: LabeledData, size: int, count: int, seed: int) -> list[LabeledData]:
    if len(trusted) < size:
        raise ScreeningInputError(f"calibration needs shards of {size} rows but the trusted data has {len(trusted)}")
    rng = np.random.default_rng(seed)
    shards = []
    for _ in range(count):
        rows = torch.as_tensor(rng.choice(len(trusted), size=size, replace=False))
        shards.append(LabeledData(trusted.x[rows], trusted.y[rows]))
    return shards


def class_thresholds_of(values: np.ndarray, k: float) -> np.ndarray:
    """Per-class thresholds from calibration impacts (shards x classes): median_c + k * pooled robust scale.

    The scale is the median over classes of each class's robust scale; a class absent from the held-out set (NaN)
    gets +inf.
    """
    present = ~np.isnan(values).all(0)
    out = np.full(values.shape[1], math.inf)
    if present.any():
        medians = np.array([np.median(values[:, c]) for c in np.flatnonzero(present)])
        scale = float(np.median([robust_scale(values[:, c]) for c in np.flatnonzero(present)]))
        out[present] = medians + k * scale
    return out


def _decide(impact: float, threshold: float, class_impacts: np.ndarray, class_thresholds: np.ndarray) -> str:
    """'' when clean, else a one-line reason naming the metric that dropped too much (non-finite fails closed)."""
    if not math.isfinite(impact):
        return "held-out metrics became non-finite when fine-tuning on this candidate"
    if impact > threshold:
        return f"held-out soft accuracy dropped by {impact:.4f}, above the calibrated threshold {threshold:.4f}"
    with np.errstate(invalid="ignore"):
        over = np.nan_to_num(class_impacts - class_thresholds, nan=-math.inf)
    worst = int(np.argmax(over))
    if over[worst] > 0:
        return (
            f"held-out soft accuracy of class {worst} dropped by {class_impacts[worst]:.4f}, "
            f"above its calibrated threshold {class_thresholds[worst]:.4f}"
        )
    return ""


def screen_candidates(
    model: nn.Module,
    base_data: LabeledData,
    holdout: LabeledData,
    candidates: Sequence[Candidate],
    config: ScreeningConfig | None = None,
) -> ScreeningReport:
    """Screens each candidate against calibration shards drawn from `base_data` (trusted, known-good data).

    `base_data` should be data the current model has not been fitted on (e.g. a trusted calibration split): clean
    data it already fits moves the held-out loss less than new clean data, which makes the screening stricter.
    """
    config = config or ScreeningConfig()
    if not candidates:
        raise ScreeningInputError("no candidates to screen")
    if len(holdout) == 0:
        raise ScreeningInputError("the held-out set is empty")
    for candidate in candidates:
        if len(candidate.data) == 0:
            raise ScreeningInputError(f"candidate {candidate.name!r} from source {candidate.source!r} is empty")
    started = time.perf_counter()
    num_classes = (
        config.num_classes or int(max(holdout.y.max(), base_data.y.max(), *(c.data.y.max() for c in candidates))) + 1
    )
    size = config.calibration_size or min(len(c.data) for c in candidates)
    calibration = _calibration_shards(base_data, size, config.calibration_shards, config.seed)

    base = _heldout_probabilities(model, holdout).double()
    probs = finetune_heldout_probabilities(model, [*calibration, *(c.data for c in candidates)], holdout, config)
    probs = probs.double()
    impacts = (base.mean() - probs.mean(1)).numpy()
    class_impacts = (
        per_class_mean(base, holdout.y, num_classes) - per_class_mean(probs, holdout.y, num_classes)
    ).numpy()

    n_cal = len(calibration)
    if not np.isfinite(impacts[:n_cal]).all():
        raise ScreeningInputError(
            f"screening diverged: fine-tuning with lr={config.lr} for {config.steps} steps gave non-finite held-out "
            "metrics on known-good calibration shards; lower ScreeningConfig.lr"
        )
    threshold = robust_threshold(impacts[:n_cal], config.k)
    class_thresholds = (
        class_thresholds_of(class_impacts[:n_cal], config.class_k)
        if config.per_class
        else np.full(num_classes, math.inf)
    )
    overall_scale = robust_scale(impacts[:n_cal]) or 1e-12
    decisions = []
    for i, candidate in enumerate(candidates):
        j = n_cal + i
        reason = _decide(float(impacts[j]), threshold, class_impacts[j], class_thresholds)
        decisions.append(
            CandidateDecision(
                name=candidate.name,
                source=candidate.source,
                size=len(candidate.data),
                impact=float(impacts[j]),
                threshold=threshold,
                class_impacts=tuple(float(v) for v in class_impacts[j]),
                class_thresholds=tuple(float(v) for v in class_thresholds),
                score=float((impacts[j] - np.median(impacts[:n_cal])) / overall_scale),
                accepted=not reason,
                reason=reason or "impact within calibrated thresholds",
            )
        )
    return ScreeningReport(
        decisions=tuple(decisions),
        threshold=threshold,
        class_thresholds=tuple(float(v) for v in class_thresholds),
        calibration_impacts=tuple(float(v) for v in impacts[:n_cal]),
        calibration_size=size,
        config=config,
        seconds=time.perf_counter() - started,
        base_soft_accuracy=float(base.mean()),
    )
