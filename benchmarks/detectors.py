"""Row-level detectors (spectral signatures, activation clustering, cleanlab label issues) on scikit-learn digits.

Per seed: the digits are shuffled; 300 rows are the clean reference (never trained on), the other 1,497 come from
10 sources of about 150 rows. Scenarios: clean; one source flips 10% or 20% of its labels (features and
probabilities of the curator's CNN, trained on 400 other clean rows, as a cycle's incoming model); a BadNets patch
backdoor (2x2 white corner, relabelled to 0) as many rows as 10% of class 0, from one source or spread over five,
with the CNN trained on all candidate rows, poison included (the papers' setting). Per detector and for their
union: the share of poisoned and of clean candidate rows flagged, the share of poisoned and of clean sources
flagged (mean over seeds, 95% bootstrap interval over seeds, worst seed), and for backdoors the attack success
before and after the flagged rows are dropped and the CNN retrained. Prints tables; asserts nothing.

    .venv/bin/python benchmarks/detectors.py            # 20 seeds
    .venv/bin/python benchmarks/detectors.py --quick    # 5 seeds
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from digits_demo.digits import load_digits_split
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.detectors import REFERENCE, DetectionConfig, detect
from trainguard.defenses.features import head_features, split_head

SOURCES = tuple(f"s{i}" for i in range(10))
TARGET = 0
SCENARIOS = ("clean", "flips-10%", "flips-20%", "backdoor", "backdoor-spread")


def cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(256, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def fit(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> nn.Module:
    net, generator = cnn(seed), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for batch in torch.randperm(len(targets), generator=generator).split(64):
            optimizer.zero_grad()
            F.cross_entropy(net(inputs[batch]), targets[batch]).backward()
            optimizer.step()
    return net.eval()


def patched(x: np.ndarray) -> np.ndarray:
    images = x.reshape(-1, 8, 8).copy()
    images[:, 6:, 6:] = 1.0
    return images.reshape(-1, 64)


def attack_success(net: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    others = y != TARGET
    with torch.no_grad():
        predicted = net(torch.from_numpy(patched(x[others]))).argmax(1).numpy()
    return float((predicted == TARGET).mean())


@dataclass
class Outcome:
    """One scenario on one seed: per detector (and `union`) the four rates, and attack success before/after."""

    rates: dict[str, tuple[float, float, float, float]]
    success: tuple[float, float] | None


def run(scenario: str, seed: int, config: DetectionConfig) -> Outcome:
    digits = load_digits_split(seed)
    rng = np.random.default_rng(seed)
    x, y = digits.x.copy(), digits.y.copy()
    reference, candidates = np.arange(300), np.arange(300, len(y))
    sources = np.array([REFERENCE] * 300 + [SOURCES[i % 10] for i in range(len(candidates))], dtype=object)
    poisoned = np.zeros(len(y), dtype=bool)
    attackers: tuple[str, ...] = ()
    if scenario.startswith("flips"):
        attackers = ("s0",)
        rows = rng.choice(np.flatnonzero(sources == "s0"), round(float(scenario[6:-1]) / 100 * 150), replace=False)
        y[rows] = (y[rows] + rng.integers(1, 10, len(rows))) % 10
        poisoned[rows] = True
    elif scenario.startswith("backdoor"):
        attackers = ("s0",) if scenario == "backdoor" else SOURCES[:5]
        count = round(0.1 * (y[candidates] == TARGET).sum())
        eligible = np.flatnonzero(np.isin(sources, attackers) & (y != TARGET))
        rows = rng.choice(eligible, count, replace=False)
        x[rows], y[rows] = patched(x[rows]), TARGET
        poisoned[rows] = True
    if scenario.startswith("backdoor"):
        net = fit(x[candidates], y[candidates], 8, seed)
        keep = np.r_[reference, candidates]
    else:  # the curator's model: 400 clean rows beside the reference, never among the candidates
        trusted = candidates[:400]
        net = fit(x[trusted], y[trusted], 20, seed)
        keep = np.r_[reference, candidates[400:]]
    (features,) = head_features(net, split_head(net), [torch.from_numpy(x[keep])])
    with torch.no_grad():
        probabilities = torch.softmax(net(torch.from_numpy(x[keep])), 1).numpy()
    detections = detect(features.numpy(), y[keep], sources[keep], config, pred_probs=probabilities)
    truth, names = poisoned[keep], sources[keep]
    candidate = names != REFERENCE
    clean_sources = sorted(set(names[candidate]) - set(attackers))
    rates = {}
    for name, rows, flagged_sources in [
        *((f.detector, f.flagged_rows, f.flagged_sources) for f in detections.findings),
        ("union", tuple(detections.flagged_rows), detections.flagged_sources),
    ]:
        flagged = np.zeros(len(keep), dtype=bool)
        flagged[list(rows)] = True
        rates[name] = (
            float(flagged[truth].mean()) if truth.any() else float("nan"),
            float(flagged[candidate & ~truth].mean()),
            float(np.mean([s in flagged_sources for s in attackers])) if attackers else float("nan"),
            float(np.mean([s in flagged_sources for s in clean_sources])),
        )
    success = None
    if scenario.startswith("backdoor"):
        dropped = set(keep[list(detections.flagged_rows)])
        kept = np.array([i for i in candidates if i not in dropped])
        after = fit(x[kept], y[kept], 8, seed)
        success = (attack_success(net, x[reference], y[reference]), attack_success(after, x[reference], y[reference]))
    return Outcome(rates, success)


def interval(values: list[float], rng: np.random.Generator) -> str:
    values_ = np.array([v for v in values if v == v])
    if len(values_) == 0:
        return "      -"
    means = rng.choice(values_, (2000, len(values_))).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return f"{values_.mean():.3f} [{low:.3f}, {high:.3f}] max {values_.max():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 seeds instead of 20")
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=SCENARIOS)
    arguments = parser.parse_args()
    seeds = range(5 if arguments.quick else 20)
    config = DetectionConfig()
    rng = np.random.default_rng(0)
    columns = ("poisoned rows flagged", "clean rows flagged", "poisoned sources flagged", "clean sources flagged")
    for scenario in arguments.scenarios:
        started = time.perf_counter()
        outcomes = [run(scenario, seed, config) for seed in seeds]
        elapsed = time.perf_counter() - started
        print(f"\n== {scenario} ({len(outcomes)} seeds, {elapsed:.0f} s)")
        print(f"{'detector':14s}" + "".join(f"{c:>40s}" for c in columns))
        for detector in outcomes[0].rates:
            cells = [interval([o.rates[detector][i] for o in outcomes], rng) for i in range(4)]
            print(f"{detector:14s}" + "".join(f"{c:>40s}" for c in cells))
        if outcomes[0].success is not None:
            before = interval([o.success[0] for o in outcomes], rng)
            after = interval([o.success[1] for o in outcomes], rng)
            print(f"attack success: before {before}   after dropping flagged rows {after}")


if __name__ == "__main__":
    main()
