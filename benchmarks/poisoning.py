"""Poisoning scenarios against RONI screening alone and beside the cycle's row-level detectors, on scikit-learn
digits: per-shard and per-source TPR, clean-shard FPR with a bootstrap interval, and backdoor attack success after
screening, over many seeds.

Per seed the digits are shuffled and split: 250 rows fit the current model (the MLP 64-64-10; `--arch cnn`: the
pipeline's DigitsCNN with 8 channels, the model the digits demo trains), 250 are the held-out
set impacts are measured on, 400 the trusted pool calibration draws come from, and 897 the pool contributions come
from. Every scenario offers 24 clean sources of 2 shards of 50 rows (rows drawn from the pool, distinct inside a
source; two sources may share rows) plus its attacker:

- clean: nothing else; flip-10% / flip-20%: 2 sources of 2 shards with 10% / 20% of labels flipped to another class;
- targeted 3->8: 2 sources of 2 shards whose 3s are all labelled 8;
- backdoor concentrated: one source, 60 rows of other classes with a 2x2 corner patch relabelled 0, in 2 shards;
- backdoor spread: the same 60 rows at 4 per shard over 15 of one source's 18 shards;
- large source 10%: one source of 18 shards (900 rows: the pool and 3 repeats) with 10% flips;
  large source clean: the same source, unflipped (a clean big source must pass: size-matched calibration);
- clean class-skewed: instead of the 24 clean sources, 24 clean sources that each hold only 2-4 classes (random per
  source and seed, a clinic that sees a few conditions), 2 shards of 50 rows; they must pass as often as balanced
  ones (RONI's draws match each candidate's label histogram, the detectors' clean rates are per class).

Attacks the detectors were not tuned for (issue #26), each beside the 24 clean sources:

- blended concentrated / spread: as the backdoor rows, the trigger a fixed noise image (seeded, the same every seed)
  blended over the whole image at alpha 0.15;
- clean-label concentrated / spread: 60 rows that already carry the target 0 get the patch, labels untouched; the
  concentrated source's 2 shards hold 30 of them each (other rows swapped for the pool's 0s), the spread one 4 per
  shard over 15 of 18. Unscreened they barely implant the trigger (the MLP reads a 0 from its strokes), so
  clean-label adv does the same to 0s first moved by L-inf PGD (0.2) against the current model (Turner et al. 2019);
- sybil 12x10%: 12 sources of one shard each, 10% flips in each;
- adaptive flip-10% / 20%: 2 sources of 2 shards; white-box, in each shard the rows whose likeliest other class (the
  current model's runner-up) is likeliest are relabelled to it: plausible flips the label-issue detector scores low;
- slow drip: 5 cycles; each cycle the 24 clean sources send one new shard each and the source "drip" one shard with
  10% flips (little enough that one cycle's tests may miss it). Each source's shard p-values of earlier cycles join
  its test (`screen_candidates(history=)`, as the cycle's signed state carries them); the model and calibration stay
  those of the seed. Reported: per seed, the first cycle at which a drip shard is rejected.

A source counts as caught when none of its poisoned shards is accepted. FPR counts the clean sources' shards; its
interval is a bootstrap over seeds (shards of one seed share a model and calibration). A seed's FPR moves in steps of
one source (2 of 48 shards, 0.042): with 8 clean sources a single false source was 0.125, so "no seed above 0.10"
failed at any level as soon as one seed in a few dozen had one. Attack success: an MLP trained on the model's rows
plus what survived (shards not rejected, less their quarantined rows), on patched held-out images of other classes,
the share predicted 0 (the blended rows: with the blended trigger); "rows left out" is the share of poisoned rows,
and of the clean sources' rows, not trained on. All scenarios of a seed share one calibration (one per candidate size
and label histogram): per seed the cost is mostly the draws for shards that do not look clean, up to 500 each.
After the per-column tables, a summary puts RONI alone beside RONI + detectors under the default action, and pools
the clean FPR over every scenario (its interval resampling seeds).

`DETECTORS` maps a column name to a judge of the same shards: RONI alone, and RONI beside the cycle's detection stage
(`pipeline.detection`: the incoming model's penultimate features and probabilities, every held-out row as the clean
reference, the default `detectors:` config) under each of its actions: `reject-source` (a flagged source loses every
shard) and `quarantine-rows` (flagged rows are left out of training). In both, RONI's source test combines the
label-issue detector's p-value of the source with its shard tests (`pipeline.detection.roni_evidence`).

    .venv/bin/python benchmarks/poisoning.py            # 20 seeds
    .venv/bin/python benchmarks/poisoning.py --quick    # 3 seeds, fewer draws (a smoke run)
    .venv/bin/python benchmarks/poisoning.py --unstratified --only "clean class-skewed"   # RONI's draws unstratified
    .venv/bin/python benchmarks/poisoning.py --seeds 2 --only "sybil 12x10%" "slow drip"     # some rows
    .venv/bin/python benchmarks/poisoning.py --quick --seeds 1 --clean-sources 4   # a smoke run: 4 clean sources
    .venv/bin/python benchmarks/poisoning.py --arch cnn --seeds 4 --only clean flip-10%   # on the CNN
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np
import torch
import yaml
from digits_demo.digits import load_digits_split
from digits_demo.models import DigitsCNN
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.detectors import REFERENCE, Detections, detect
from trainguard.defenses.heldout import LabeledData
from trainguard.defenses.roni import Calibration, Candidate, ScreeningConfig, screen_candidates
from trainguard.pipeline.config import DetectorsSection
from trainguard.pipeline.detection import detection_config, model_view, roni_evidence

SHARD = 50
TARGET = 0  # the backdoor's target class
BACKDOOR_ROWS = 60
CLEAN_SOURCES = 24  # of 2 shards: 48 clean shards per seed, so one falsely flagged source is 0.042 of a seed's FPR
ALPHA = 0.15  # the blended trigger's weight
# the blended trigger: one noise image, the same every seed
PATTERN = torch.rand(64, generator=torch.Generator().manual_seed(26))
SYBILS = 12
DRIP_CYCLES = 5
DRIP_FLIPS = 0.1  # of the slow drip's one shard per cycle: little enough that one cycle's tests may miss it
HARDENING = 0.2  # L-inf PGD budget of the clean-label adv rows (plain clean-label rows barely implant the trigger)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


# Each architecture: its constructor, Adam's rate and the epochs that fit the current model (attack success: 30).
ARCHS: dict[str, tuple[Callable[[], nn.Module], float, int]] = {
    "mlp": (mlp, 1e-2, 60),
    "cnn": (functools.partial(DigitsCNN, channels=8), 3e-3, 30),  # the pipeline's CNN, as benchmarks/roni.py fits it
}


def fit(data: LabeledData, epochs: int, seed: int, arch: str = "mlp") -> nn.Module:
    torch.manual_seed(seed)
    build, rate, _ = ARCHS[arch]
    model = build()
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=rate)
    for _ in range(epochs):
        for idx in torch.randperm(len(data), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(data.x[idx]), data.y[idx]).backward()
            optimizer.step()
    return model.eval()


Trigger = Callable[[torch.Tensor], torch.Tensor]


def patched(x: torch.Tensor) -> torch.Tensor:
    """BadNets-style trigger: the bottom-right 2x2 pixels of the 8x8 image at full intensity."""
    x = x.clone().reshape(-1, 8, 8)
    x[:, 6:, 6:] = 1.0
    return x.reshape(-1, 64)


def blended(x: torch.Tensor) -> torch.Tensor:
    """Blended trigger (Chen et al. 2017): the fixed noise image `PATTERN` over the whole image at weight `ALPHA`;
    pixels stay in [0, 1]."""
    return (1 - ALPHA) * x + ALPHA * PATTERN


def flipped(y: torch.Tensor, rate: float, rng: np.random.Generator) -> torch.Tensor:
    y = y.clone()
    rows = rng.choice(len(y), round(rate * len(y)), replace=False)
    y[rows] = torch.as_tensor((y[rows].numpy() + rng.integers(1, 10, len(rows))) % 10)
    return y


@dataclass
class World:
    """One seed: the split, the current model, and the calibration its screenings share; `clean_sources`: how many
    clean sources each scenario offers beside its attacker (`CLEAN_SOURCES`; fewer only for a smoke run)."""

    seed: int
    x: torch.Tensor
    y: torch.Tensor
    train: LabeledData
    holdout: LabeledData
    trusted: LabeledData
    pool: np.ndarray
    model: nn.Module
    calibration: Calibration | None = None
    clean_sources: int = CLEAN_SOURCES
    arch: str = "mlp"

    @classmethod
    def of(cls, seed: int, clean_sources: int = CLEAN_SOURCES, arch: str = "mlp") -> World:
        digits = load_digits_split(seed)
        x, y = torch.tensor(digits.x), torch.tensor(digits.y)
        train = LabeledData(x[:250], y[:250])
        return cls(
            seed,
            x,
            y,
            train,
            LabeledData(x[250:500], y[250:500]),
            LabeledData(x[500:900], y[500:900]),
            np.arange(900, len(y)),
            fit(train, ARCHS[arch][2], seed, arch),
            clean_sources=clean_sources,
            arch=arch,
        )

    def source(self, name: str, shards: int, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
        """`shards` shards of distinct pool rows (repeats only past the pool's size)."""
        rows = rng.permutation(self.pool)
        rows = np.concatenate([rows, rng.choice(self.pool, max(0, shards * SHARD - len(rows)), replace=False)])
        return [(f"{name}-{i}", rows[i * SHARD : (i + 1) * SHARD]) for i in range(shards)]


@dataclass
class Offer:
    """A scenario's shards, which of their rows carry poison, and which sources are the attacker's; `found` and
    `screened` keep the detectors' findings and RONI's verdict with their evidence, which both combined columns use.
    `history`: each source's shard p-values of earlier cycles, as the cycle's signed state carries them."""

    candidates: list[Candidate] = field(default_factory=list)
    bad_rows: list[np.ndarray] = field(default_factory=list)
    attackers: set[str] = field(default_factory=set)
    history: dict[str, list[float]] = field(default_factory=dict)
    found: Detections | None = None
    screened: Verdict | None = None

    @property
    def poisoned(self) -> list[bool]:
        return [bool(bad.any()) for bad in self.bad_rows]

    def add(self, name: str, source: str, data: LabeledData, bad: np.ndarray, attacker: bool) -> None:
        self.candidates.append(Candidate(name, source, data))
        self.bad_rows.append(np.asarray(bad, dtype=bool))
        if attacker:
            self.attackers.add(source)


@dataclass(frozen=True)
class Verdict:
    """A judge's decisions on an offer: shards rejected, rows quarantined (left out of training) per shard, and
    RONI's shard p-values (what the cycle records as each source's evidence for later cycles)."""

    rejected: list[bool]
    quarantined: list[np.ndarray]
    p_values: tuple[float, ...] = ()

    @property
    def left_out(self) -> np.ndarray:
        """Per row of the offer (shards in order), whether training leaves it out: its shard rejected or the row
        quarantined."""
        return np.concatenate([q | r for q, r in zip(self.quarantined, self.rejected, strict=True)])

    @classmethod
    def shards(cls, rejected: list[bool], offer: Offer, p_values: tuple[float, ...] = ()) -> Verdict:
        return cls(rejected, [np.zeros(len(c.data), dtype=bool) for c in offer.candidates], p_values)


def _clean(world: World, rng: np.random.Generator) -> Offer:
    offer = Offer()
    for s in range(world.clean_sources):
        for name, rows in world.source(f"clean{s}", 2, rng):
            offer.add(name, f"clean{s}", LabeledData(world.x[rows], world.y[rows]), np.zeros(len(rows), bool), False)
    return offer


def _skewed(world: World, rng: np.random.Generator) -> Offer:
    """Clean sources of 2 shards that each hold 2-4 classes: rows of those classes only, distinct in the source."""
    offer = Offer()
    labels = world.y[world.pool].numpy()
    for s in range(world.clean_sources):
        classes = rng.choice(10, int(rng.integers(2, 5)), replace=False)
        rows = rng.permutation(world.pool[np.isin(labels, classes)])[: 2 * SHARD]
        for i in range(2):
            part = rows[i * SHARD : (i + 1) * SHARD]
            offer.add(
                f"skewed{s}-{i}", f"skewed{s}", LabeledData(world.x[part], world.y[part]), np.zeros(SHARD, bool), False
            )
    return offer


def _labels(relabel: Callable[[torch.Tensor, np.random.Generator], torch.Tensor], shards: int, sources: int = 2):
    def build(world: World, rng: np.random.Generator) -> Offer:
        offer = _clean(world, rng)
        for s in range(sources):
            for name, rows in world.source(f"bad{s}", shards, rng):
                labels = relabel(world.y[rows], rng)
                offer.add(name, f"bad{s}", LabeledData(world.x[rows], labels), (labels != world.y[rows]).numpy(), True)
        return offer

    return build


def _three_to_eight(y: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return torch.where(y == 3, torch.tensor(8), y)


def _backdoor(per_shard: tuple[int, ...], shards: int, trigger: Trigger = patched):
    """One attacker source of `shards` shards; shard i carries per_shard[i] rows of other classes with the trigger,
    relabelled TARGET."""

    def build(world: World, rng: np.random.Generator) -> Offer:
        offer = _clean(world, rng)
        for i, (name, rows) in enumerate(world.source("mallory", shards, rng)):
            x, y = world.x[rows].clone(), world.y[rows].clone()
            count = per_shard[i] if i < len(per_shard) else 0
            victims = np.flatnonzero(y.numpy() != TARGET)[:count]
            x[victims], y[victims] = trigger(x[victims]), TARGET
            offer.add(name, "mallory", LabeledData(x, y), np.isin(np.arange(len(y)), victims), True)
        return offer

    return build


def _with_targets(world: World, rows: np.ndarray, count: int, source: np.ndarray, rng: np.random.Generator):
    """`rows` with other classes' rows swapped for TARGET rows of the pool until `count` of them are TARGET; the
    swapped-in rows come from outside the attacker's `source` rows first (distinct), then from outside the shard."""
    labels = world.y.numpy()
    short = count - int((labels[rows] == TARGET).sum())
    if short <= 0:
        return rows
    targets = rng.permutation(world.pool[labels[world.pool] == TARGET])
    targets = targets[~np.isin(targets, rows)]
    targets = targets[np.argsort(np.isin(targets, source), kind="stable")][:short]
    rows = rows.copy()
    rows[rng.choice(np.flatnonzero(labels[rows] != TARGET), len(targets), replace=False)] = targets
    return rows


def hardened(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, steps: int = 20) -> torch.Tensor:
    """`x` moved by L-inf PGD within `epsilon` (pixels kept in [0, 1]) to raise the model's loss on its true labels `y`:
    Turner et al.'s hard examples, which a model learns through the trigger rather than their content."""
    delta = torch.zeros_like(x, requires_grad=True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(F.cross_entropy(model((x + delta).clamp(0, 1)), y), delta)
        delta = (delta + epsilon / 4 * grad.sign()).clamp(-epsilon, epsilon).detach().requires_grad_(True)
    return (x + delta).clamp(0, 1).detach()


def _clean_label(per_shard: tuple[int, ...], shards: int, epsilon: float = 0.0):
    """Label-consistent backdoor (Turner et al. 2019): one attacker source of `shards` shards; shard i carries
    per_shard[i] rows of class TARGET with the patch, labels untouched (rows of other classes swapped for pool TARGET
    rows where the shard holds too few). With `epsilon`, the rows are first `hardened` against the current model."""

    def build(world: World, rng: np.random.Generator) -> Offer:
        offer = _clean(world, rng)
        parts = world.source("mallory", shards, rng)
        source = np.concatenate([rows for _, rows in parts])
        for i, (name, rows) in enumerate(parts):
            count = per_shard[i] if i < len(per_shard) else 0
            rows = _with_targets(world, rows, count, source, rng)
            x, y = world.x[rows].clone(), world.y[rows]
            victims = np.flatnonzero(y.numpy() == TARGET)[:count]
            if epsilon:
                x[victims] = hardened(world.model, x[victims], y[victims], epsilon)
            x[victims] = patched(x[victims])
            offer.add(name, "mallory", LabeledData(x, y), np.isin(np.arange(len(y)), victims), True)
        return offer

    return build


def _plausible(rate: float, sources: int = 2):
    """Adaptive, white-box flips the label-issue detector should miss: in each of 2 shards of each source, the `rate`
    of rows whose likeliest other class (the current model's runner-up where it is right) is likeliest, relabelled to
    that class."""

    def build(world: World, rng: np.random.Generator) -> Offer:
        offer = _clean(world, rng)
        with torch.no_grad():
            probabilities = torch.softmax(world.model(world.x), 1)
        for s in range(sources):
            for name, rows in world.source(f"bad{s}", 2, rng):
                y = world.y[rows].clone()
                others = probabilities[rows].scatter(1, y[:, None], -1.0)
                best, runner_up = others.max(1)
                chosen = best.argsort(descending=True)[: round(rate * len(y))]
                y[chosen] = runner_up[chosen]
                offer.add(name, f"bad{s}", LabeledData(world.x[rows], y), (y != world.y[rows]).numpy(), True)
        return offer

    return build


def _large(rate: float):
    def build(world: World, rng: np.random.Generator) -> Offer:
        offer = _clean(world, rng)
        for name, rows in world.source("big", 18, rng):
            labels = flipped(world.y[rows], rate, rng) if rate else world.y[rows]
            offer.add(name, "big", LabeledData(world.x[rows], labels), (labels != world.y[rows]).numpy(), rate > 0)
        return offer

    return build


SCENARIOS: dict[str, Callable[[World, np.random.Generator], Offer]] = {
    "clean": _clean,
    "flip-10%": _labels(lambda y, rng: flipped(y, 0.1, rng), 2),
    "flip-20%": _labels(lambda y, rng: flipped(y, 0.2, rng), 2),
    "targeted 3->8": _labels(_three_to_eight, 2),
    "backdoor concentrated": _backdoor((30, 30), 2),
    "backdoor spread": _backdoor((4,) * 15, 18),
    "large source 10%": _large(0.1),
    "large source clean": _large(0.0),
    "clean class-skewed": _skewed,
    "blended concentrated": _backdoor((30, 30), 2, blended),
    "blended spread": _backdoor((4,) * 15, 18, blended),
    "clean-label concentrated": _clean_label((30, 30), 2),
    "clean-label spread": _clean_label((4,) * 15, 18),
    "clean-label adv concentrated": _clean_label((30, 30), 2, HARDENING),
    "clean-label adv spread": _clean_label((4,) * 15, 18, HARDENING),
    f"sybil {SYBILS}x10%": _labels(lambda y, rng: flipped(y, 0.1, rng), 1, SYBILS),
    "adaptive flip-10%": _plausible(0.1),
    "adaptive flip-20%": _plausible(0.2),
}
# backdoor scenario -> the trigger its attack success is measured with
BACKDOORS: dict[str, Trigger] = {
    "backdoor concentrated": patched,
    "backdoor spread": patched,
    "blended concentrated": blended,
    "blended spread": blended,
    "clean-label concentrated": patched,
    "clean-label spread": patched,
    "clean-label adv concentrated": patched,
    "clean-label adv spread": patched,
}


def _drip(world: World, rng: np.random.Generator) -> list[Offer]:
    """`DRIP_CYCLES` cycles' offers: each cycle the same clean sources send one new shard each, and the source "drip"
    one shard with `DRIP_FLIPS` of its labels flipped."""
    offers = []
    for cycle in range(1, DRIP_CYCLES + 1):
        offer = Offer()
        for s in range(world.clean_sources):
            [(_, rows)] = world.source(f"clean{s}", 1, rng)
            offer.add(
                f"clean{s}-c{cycle}",
                f"clean{s}",
                LabeledData(world.x[rows], world.y[rows]),
                np.zeros(SHARD, bool),
                False,
            )
        [(_, rows)] = world.source("drip", 1, rng)
        labels = flipped(world.y[rows], DRIP_FLIPS, rng)
        offer.add(f"drip-c{cycle}", "drip", LabeledData(world.x[rows], labels), (labels != world.y[rows]).numpy(), True)
        offers.append(offer)
    return offers


# Scenarios over several cycles: a source's earlier shard p-values join its test (`screen_candidates(history=)`).
CYCLED: dict[str, Callable[[World, np.random.Generator], list[Offer]]] = {"slow drip": _drip}
NAMES = (*SCENARIOS, *CYCLED)  # every scenario, in table order; a scenario's index seeds its rows


def screened(
    world: World, offer: Offer, config: ScreeningConfig, evidence: Mapping[str, tuple[float, ...]] | None = None
) -> Verdict:
    """RONI's verdicts (with the offer's earlier cycles and the detectors' evidence for its source tests, when
    given); the world keeps the calibration for the seed's next screening."""
    report = screen_candidates(
        world.model,
        world.trusted,
        world.holdout,
        offer.candidates,
        config,
        history=offer.history,
        evidence=evidence,
        calibration=world.calibration,
    )
    world.calibration = report.calibration
    return Verdict.shards([not d.accepted for d in report.decisions], offer, tuple(d.p_value for d in report.decisions))


def roni(world: World, offer: Offer, config: ScreeningConfig) -> Verdict:
    return screened(world, offer, config)


def detections(world: World, offer: Offer) -> Detections:
    """The cycle's detection stage (`pipeline.detection`, its default config): features and probabilities of the
    incoming model, every held-out row (the trusted and impact splits) as the clean reference."""
    reference = [world.trusted.x.numpy(), world.holdout.x.numpy()]
    pool = [c.data.x.numpy() for c in offer.candidates]
    (ref_features, features), (ref_probs, probs) = model_view(world.model, [reference, pool], None)
    labels = np.concatenate([world.trusted.y, world.holdout.y, *(c.data.y for c in offer.candidates)])
    sources = [REFERENCE] * len(ref_features) + [c.source for c in offer.candidates for _ in range(len(c.data))]
    return detect(
        np.concatenate([ref_features, features]),
        labels,
        sources,
        detection_config(DetectorsSection()),
        pred_probs=np.concatenate([ref_probs, probs]),
    )


def combined(action: str) -> Callable[[World, Offer, ScreeningConfig], Verdict]:
    """RONI and the detectors as a cycle with `detectors.action` set to `action` runs them: a shard is rejected by
    RONI (its source tests combining the label-issue evidence) or, with reject-source, because the detectors flag
    its source; with quarantine-rows the flagged rows are left out."""

    def judge(world: World, offer: Offer, config: ScreeningConfig) -> Verdict:
        if offer.found is None:
            offer.found = detections(world, offer)
            offer.screened = screened(world, offer, config, roni_evidence(offer.found))
        found, roni_verdict = offer.found, offer.screened
        if action == "reject-source":
            flagged = set(found.flagged_sources)
            rejected = [r or c.source in flagged for r, c in zip(roni_verdict.rejected, offer.candidates, strict=True)]
            return Verdict.shards(rejected, offer, roni_verdict.p_values)
        rows = np.zeros(sum(len(c.data) for c in offer.candidates), dtype=bool)
        rows[[r - len(world.trusted) - len(world.holdout) for r in found.flagged_rows]] = True
        quarantined = np.split(rows, np.cumsum([len(c.data) for c in offer.candidates])[:-1])
        return Verdict(roni_verdict.rejected, quarantined, roni_verdict.p_values)

    return judge


# Column name -> judge of a scenario's shards. RONI alone, then RONI with the cycle's row-level detectors (same
# features, reference and config as `pipeline.detection`) under each of the detection stage's actions.
DETECTORS: dict[str, Callable[[World, Offer, ScreeningConfig], Verdict]] = {
    "RONI": roni,
    "RONI + detectors (reject-source)": combined("reject-source"),
    "RONI + detectors (quarantine-rows)": combined("quarantine-rows"),
}
DEFAULT_COMBINATION = f"RONI + detectors ({DetectorsSection().action})"  # the column a cycle's defaults give


def attack_success(world: World, offer: Offer, verdict: Verdict, trigger: Trigger) -> float:
    """Share of held-out images of other classes with the trigger that a model trained on the model's rows plus what
    survived the verdict (shards not rejected, less their quarantined rows) predicts TARGET."""
    kept = LabeledData.concat([c.data for c in offer.candidates]).take(torch.as_tensor(~verdict.left_out))
    model = fit(LabeledData.concat([world.train, kept]), 30, world.seed, world.arch)
    others = world.holdout.y != TARGET
    with torch.no_grad():
        return float((model(trigger(world.holdout.x[others])).argmax(1) == TARGET).float().mean())


@dataclass
class Tally:
    """One scenario's counts, one entry per seed (a cycled scenario's cycles summed); `first_flagged`: per seed, the
    first cycle at which an attacker's shard was rejected (None: never)."""

    caught: list[int] = field(default_factory=list)
    poisoned: list[int] = field(default_factory=list)
    sources_caught: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    false: list[int] = field(default_factory=list)
    clean: list[int] = field(default_factory=list)
    bad_dropped: list[int] = field(default_factory=list)
    bad_rows: list[int] = field(default_factory=list)
    clean_dropped: list[int] = field(default_factory=list)
    clean_rows: list[int] = field(default_factory=list)
    success_before: list[float] = field(default_factory=list)
    success_after: list[float] = field(default_factory=list)
    first_flagged: list[int | None] = field(default_factory=list)

    def extend(self, other: Tally) -> None:
        """Appends `other`'s seeds (a seed judged in another process)."""
        for name in (f.name for f in fields(self)):
            getattr(self, name).extend(getattr(other, name))

    def fold(self, cycles: Tally) -> None:
        """Adds one seed's cycles (each an entry of `cycles`) as one entry."""
        for name in COUNTS:
            getattr(self, name).append(sum(getattr(cycles, name)))

    def add(self, offer: Offer, verdict: Verdict) -> None:
        rejected_ = np.array(verdict.rejected)
        poisoned = np.array(offer.poisoned)
        attacker = np.array([c.source in offer.attackers for c in offer.candidates])
        self.caught.append(int(rejected_[poisoned].sum()))
        self.poisoned.append(int(poisoned.sum()))
        by_source = [
            rejected_[poisoned & (np.array([c.source for c in offer.candidates]) == s)].all() for s in offer.attackers
        ]
        self.sources_caught.append(int(sum(by_source)))
        self.sources.append(len(offer.attackers))
        self.false.append(int(rejected_[~attacker].sum()))
        self.clean.append(int((~attacker).sum()))
        bad, kept_out = np.concatenate(offer.bad_rows), verdict.left_out
        clean = np.concatenate([np.full(len(c.data), not a) for c, a in zip(offer.candidates, attacker, strict=True)])
        self.bad_dropped.append(int(kept_out[bad].sum()))
        self.bad_rows.append(int(bad.sum()))
        self.clean_dropped.append(int(kept_out[clean].sum()))
        self.clean_rows.append(int(clean.sum()))


COUNTS = (
    "caught",
    "poisoned",
    "sources_caught",
    "sources",
    "false",
    "clean",
    "bad_dropped",
    "bad_rows",
    "clean_dropped",
    "clean_rows",
)


def judge_seed(
    seed: int, chosen: Sequence[str], config: ScreeningConfig, clean_sources: int = CLEAN_SOURCES, arch: str = "mlp"
) -> tuple[dict[str, dict[str, Tally]], dict[str, float], float | None]:
    """Every chosen scenario of one seed under every column: the tallies, the CPU seconds per scenario and RONI's
    rate (one seed per process with `--jobs`)."""
    world = World.of(seed, clean_sources, arch)
    tallies = {column: {name: Tally() for name in chosen} for column in DETECTORS}
    seconds = dict.fromkeys(chosen, 0.0)
    for name in chosen:
        begun = time.process_time()
        rng = np.random.default_rng([seed, NAMES.index(name)])  # the same rows whichever scenarios run
        by_column = {column: tallies[column][name] for column in DETECTORS}
        if name in CYCLED:
            judge_cycles(world, CYCLED[name](world, rng), config, by_column)
        else:
            judge_offer(world, name, SCENARIOS[name](world, rng), config, by_column)
        seconds[name] += time.process_time() - begun
    return tallies, seconds, world.calibration.lr if world.calibration else None


def judge_offer(world: World, name: str, offer: Offer, config: ScreeningConfig, tallies: Mapping[str, Tally]) -> None:
    """The verdict of every column in `tallies` on one offer, tallied; for a backdoor, its attack success unscreened
    and after each verdict (one model per set of rows left out: columns that leave out the same rows train alike)."""
    verdicts = {column: DETECTORS[column](world, offer, config) for column in tallies}
    for column, verdict in verdicts.items():
        tallies[column].add(offer, verdict)
    trigger = BACKDOORS.get(name)
    if trigger is None:
        return
    unscreened = Verdict.shards([False] * len(offer.candidates), offer)
    successes: dict[bytes, float] = {}
    for verdict in (unscreened, *verdicts.values()):
        if verdict.left_out.tobytes() not in successes:
            successes[verdict.left_out.tobytes()] = attack_success(world, offer, verdict, trigger)
    for column, verdict in verdicts.items():
        tallies[column].success_before.append(successes[unscreened.left_out.tobytes()])
        tallies[column].success_after.append(successes[verdict.left_out.tobytes()])


def judge_cycles(world: World, offers: list[Offer], config: ScreeningConfig, tallies: Mapping[str, Tally]) -> None:
    """Every column in `tallies` judges the offers cycle after cycle, each source's shard p-values of the earlier
    cycles carried into its test as the cycle's signed state carries them (RONI's p-value of every shard, accepted or
    not); the two combined columns share a cycle's screening, whose history is the same for both."""
    for column, tally in tallies.items():
        history: dict[str, list[float]] = {}
        cycles, first = Tally(), None
        for number, offer in enumerate(offers, start=1):
            offer.history = {source: list(p_values) for source, p_values in history.items()}
            verdict = DETECTORS[column](world, offer, config)
            cycles.add(offer, verdict)
            if first is None and any(r and p for r, p in zip(verdict.rejected, offer.poisoned, strict=True)):
                first = number
            for candidate, p_value in zip(offer.candidates, verdict.p_values, strict=True):
                history.setdefault(candidate.source, []).append(p_value)
        tally.fold(cycles)
        tally.first_flagged.append(first)


def bootstrap_interval(false: list[int], clean: list[int], rounds: int = 2000) -> tuple[float, float]:
    """95% interval of the pooled FPR, resampling seeds (shards of a seed are not independent)."""
    rng = np.random.default_rng(0)
    f, c = np.array(false), np.array(clean)
    picks = rng.integers(0, len(f), size=(rounds, len(f)))
    rates = f[picks].sum(1) / c[picks].sum(1)
    return float(np.quantile(rates, 0.025)), float(np.quantile(rates, 0.975))


def _ratio(a: list[int], b: list[int]) -> str:
    return f"{sum(a) / sum(b):.3f} ({sum(a)}/{sum(b)})" if sum(b) else "-"


def _share(a: list[int], b: list[int]) -> str:
    return f"{sum(a) / sum(b):.3f}" if sum(b) else "-"


def print_table(name: str, tallies: dict[str, Tally]) -> None:
    print(f"\n{name}")
    header = (
        f"{'scenario':>28} | {'TPR shard':>16} | {'TPR source':>12} | {'FPR clean shard [95% CI]':>32} | "
        f"{'max seed FPR':>12} | {'attack success no screen -> screened':>36} | "
        f"{'rows left out: poisoned, clean sources':>38}"
    )
    print(header)
    print("-" * len(header))
    for scenario, t in tallies.items():
        low, high = bootstrap_interval(t.false, t.clean)
        seed_max = max(f / c for f, c in zip(t.false, t.clean, strict=True))
        fpr = f"{sum(t.false) / sum(t.clean):.4f} ({sum(t.false)}/{sum(t.clean)}) [{low:.3f}, {high:.3f}]"
        success = (
            f"{np.mean(t.success_before):.3f} -> {np.mean(t.success_after):.3f} (max {max(t.success_after):.2f})"
            if t.success_after
            else "-"
        )
        print(
            f"{scenario:>28} | {_ratio(t.caught, t.poisoned):>16} | {_ratio(t.sources_caught, t.sources):>12} | "
            f"{fpr:>32} | {seed_max:>12.3f} | {success:>36} | "
            f"{_share(t.bad_dropped, t.bad_rows):>18}, {_share(t.clean_dropped, t.clean_rows):>18}"
        )
    print(f"all scenarios: FPR {_pooled_fpr(tallies.values())}")


def _pooled_fpr(tallies: Iterable[Tally]) -> str:
    """Clean-shard FPR over the scenarios, its interval resampling seeds (a seed's scenarios share its model)."""
    tallies = list(tallies)
    false = [sum(by_seed) for by_seed in zip(*(t.false for t in tallies), strict=True)]
    clean = [sum(by_seed) for by_seed in zip(*(t.clean for t in tallies), strict=True)]
    low, high = bootstrap_interval(false, clean)
    return f"{_ratio(false, clean)} [{low:.3f}, {high:.3f}]"


def _caught(t: Tally) -> str:
    if t.first_flagged:
        return f"by cycle 3: {sum(f is not None and f <= 3 for f in t.first_flagged)}/{len(t.first_flagged)}"
    return _ratio(t.caught, t.poisoned)


def _fpr(t: Tally) -> str:
    low, high = bootstrap_interval(t.false, t.clean)
    return f"{sum(t.false) / sum(t.clean):.3f} [{low:.3f}, {high:.3f}]"


def _success(t: Tally) -> str:
    return f"{np.mean(t.success_after):.2f} (max {max(t.success_after):.2f})" if t.success_after else "-"


def print_summary(tallies: Mapping[str, Mapping[str, Tally]], columns: tuple[str, str]) -> None:
    """One row per scenario, RONI alone (A) beside the cycle's combination (B): shards caught (a cycled scenario: seeds
    whose attacker is flagged by its third cycle), clean-shard FPR, attack success after screening (backdoors), and the
    share of poisoned rows and of clean sources' rows not trained on."""
    alone, together = (tallies[c] for c in columns)
    print(f"\nsummary: A = {columns[0]}, B = {columns[1]}")
    header = (
        f"{'scenario':>28} | {'caught A':>18} | {'caught B':>18} | {'clean FPR A [95% CI]':>20} | "
        f"{'clean FPR B [95% CI]':>20} | {'success A':>16} | {'success B':>16} | {'poison out A, B':>15} | "
        f"{'clean lost A, B':>15}"
    )
    print(header)
    print("-" * len(header))
    for name in alone:
        pair = (alone[name], together[name])
        poison = ", ".join(_share(t.bad_dropped, t.bad_rows) for t in pair)
        lost = ", ".join(_percent(t.clean_dropped, t.clean_rows) for t in pair)
        print(
            f"{name:>28} | {_caught(pair[0]):>18} | {_caught(pair[1]):>18} | {_fpr(pair[0]):>20} | "
            f"{_fpr(pair[1]):>20} | {_success(pair[0]):>16} | {_success(pair[1]):>16} | {poison:>15} | {lost:>15}"
        )
    for name in alone:
        if alone[name].first_flagged:
            first = [" ".join(str(f or "-") for f in t[name].first_flagged) for t in (alone, together)]
            print(f"{name}: first cycle a shard is rejected, per seed: A {first[0]}; B {first[1]}")
    unscreened = {name: round(float(np.mean(t.success_before)), 3) for name, t in alone.items() if t.success_before}
    print(f"attack success unscreened: {unscreened}")
    print(f"pooled clean FPR over all scenarios: A {_pooled_fpr(alone.values())}; B {_pooled_fpr(together.values())}")


def _percent(a: list[int], b: list[int]) -> str:
    return f"{100 * sum(a) / sum(b):.1f}%" if sum(b) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 20, --quick 3)")
    parser.add_argument("--quick", action="store_true", help="3 seeds, 99 draws at level 0.05 (a smoke run)")
    parser.add_argument("--draws", type=int, default=None, help="calibration draws per size (default: config's)")
    parser.add_argument("--error-control", default="per-candidate", choices=("per-candidate", "bh", "by"))
    parser.add_argument("--only", nargs="*", default=None, choices=NAMES, metavar="SCENARIO", help=", ".join(NAMES))
    parser.add_argument("--unstratified", action="store_true", help="RONI's draws across all classes (before #28)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds judged at once, one process each (default 1)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        help="another ScreeningConfig field, key=YAML value (pool_fraction=null)",
    )
    parser.add_argument("--scope", default="auto", choices=("auto", "head", "full"), help="RONI's scope (default auto)")
    parser.add_argument(
        "--clean-sources",
        type=int,
        default=CLEAN_SOURCES,
        help=f"clean sources beside each attacker (default {CLEAN_SOURCES}; fewer: a smoke run, rates not comparable)",
    )
    parser.add_argument(
        "--arch", default="mlp", choices=tuple(ARCHS), help="the current model: the MLP (default) or the pipeline's CNN"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (3 if args.quick else 20)
    # configs/digits.yaml's screening: the default (head) scope, 400 calibration draws.
    options: dict[str, object] = {"error_control": args.error_control, "scope": args.scope, "calibration_draws": 400}
    if args.quick:
        options.update(level=0.05, calibration_draws=99)
    if args.draws:
        options["calibration_draws"] = args.draws
    if args.unstratified:
        options["stratify"] = False
    for option in args.option:
        key, value = option.split("=", 1)
        options[key] = yaml.safe_load(value)
    config = ScreeningConfig(**options)
    chosen = [n for n in NAMES if args.only is None or n in args.only]
    print(f"torch threads: {torch.get_num_threads()}, cpus: {os.cpu_count()}, load before: {os.getloadavg()}")
    print(f"{seeds} seeds, {args.arch}; config: {config}")
    if args.clean_sources != CLEAN_SOURCES:
        print(f"{args.clean_sources} clean sources per scenario (a smoke run: not the benchmark's {CLEAN_SOURCES})")
    print(f"detectors (RONI + detectors columns): {detection_config(DetectorsSection())}")
    started = time.perf_counter()
    seconds = dict.fromkeys(chosen, 0.0)  # CPU seconds: other jobs on the machine stretch wall time
    tallies = {column: {name: Tally() for name in chosen} for column in DETECTORS}
    run = functools.partial(judge_seed, chosen=chosen, config=config, clean_sources=args.clean_sources, arch=args.arch)
    with contextlib.ExitStack() as stack:
        judged: Iterable[tuple[dict[str, dict[str, Tally]], dict[str, float], float | None]] = map(run, range(seeds))
        if args.jobs > 1:
            fork = multiprocessing.get_context("fork")
            judged = stack.enter_context(ProcessPoolExecutor(args.jobs, mp_context=fork)).map(run, range(seeds))
        for seed, (found, spent, rate) in enumerate(judged):
            for column, by_scenario in found.items():
                for name, tally in by_scenario.items():
                    tallies[column][name].extend(tally)
            for name, cpu in spent.items():
                seconds[name] += cpu
            print(f"seed {seed} done at {time.perf_counter() - started:.0f} s (RONI's rate {rate})", flush=True)
    for column, by_scenario in tallies.items():
        print_table(f"{column}: {seeds} seeds, level {config.level}, {config.error_control}", by_scenario)
    print_summary(tallies, ("RONI", DEFAULT_COMBINATION))
    print(
        "\ngoals: FPR <= 0.02 with the interval's upper end <= 0.04; RONI alone: TPR >= 0.90 at 20% flips, >= 0.75 at "
        "10%, >= 0.90 targeted 3->8, backdoor success <= 0.30; combined: every backdoor's success <= 0.10, Sybil TPR "
        ">= 0.90, the slow drip flagged by cycle 3, clean rows lost <= 3%"
    )
    per_seed = {name: round(s / seeds, 1) for name, s in seconds.items()}
    print(f"CPU seconds per seed: {sum(seconds.values()) / seeds:.0f} ({per_seed})")
    wall = time.perf_counter() - started
    print(f"total {wall:.0f} s wall, {sum(seconds.values()):.0f} s CPU judging; load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
