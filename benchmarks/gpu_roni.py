"""benchmarks/gpu.py's RONI section: screening of many candidates on a CIFAR-style ResNet-18 (time, peak memory,
TPR/FPR on 30%-flipped shards). Synthetic 32x32 images: a fixed random pattern per class plus noise, so the base
model fits in seconds and nothing downloads. On CPU it runs the same code at a small width (a smoke test):
`.venv/bin/python benchmarks/gpu.py --only roni [--device cpu]`.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from models import resnet18
from torch.nn import functional as F

from trainguard.defenses.heldout import LabeledData
from trainguard.defenses.roni import Candidate, ScreeningConfig, screen_candidates

CLASSES = 10


def synthetic_images(rows: int, generator: torch.Generator, noise: float = 1.0) -> LabeledData:
    """Class pattern (the same for every call with a generator of the same seed) plus Gaussian noise, 3x32x32."""
    patterns = torch.randn(CLASSES, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(0, CLASSES, (rows,), generator=generator)
    return LabeledData(0.5 * patterns[y] + noise * torch.randn(rows, 3, 32, 32, generator=generator), y)


def flipped(data: LabeledData, rate: float, generator: torch.Generator) -> LabeledData:
    rows = torch.randperm(len(data), generator=generator)[: round(rate * len(data))]
    y = data.y.clone()
    y[rows] = (y[rows] + torch.randint(1, CLASSES, (len(rows),), generator=generator)) % CLASSES
    return LabeledData(data.x, y)


def fit(model: torch.nn.Module, data: LabeledData, steps: int, device: torch.device) -> float:
    """Adam on batches of 128 for `steps` steps; returns the seconds it took."""
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    started = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, len(data), (128,), generator=generator)
        optimizer.zero_grad()
        F.cross_entropy(model(data.x[rows].to(device)), data.y[rows].to(device)).backward()
        optimizer.step()
    model.eval()
    return time.perf_counter() - started


def bench_roni(
    device: torch.device,
    width: int,
    candidates: int = 256,
    shard: int = 50,
    flip_rate: float = 0.3,
    poisoned_share: float = 0.25,
    fit_steps: int = 300,
    seed: int = 0,
) -> list[dict[str, object]]:
    """One row: RONI screening (scope and chunk size chosen by the screening itself) of `candidates` shards, a
    `poisoned_share` of them with `flip_rate` of their labels flipped, on a briefly trained ResNet-18."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = resnet18(width=width).to(device)
    fit_seconds = fit(model, synthetic_images(4096, generator), fit_steps, device)
    trusted, holdout = synthetic_images(2000, generator), synthetic_images(1000, generator)
    with torch.no_grad():
        accuracy = float((model(holdout.x.to(device)).argmax(1).cpu() == holdout.y).float().mean())
    bad = round(poisoned_share * candidates)
    offered = []
    for i in range(candidates):
        data = synthetic_images(shard, generator)
        offered.append(Candidate(f"c{i}", f"s{i}", flipped(data, flip_rate, generator) if i < bad else data))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    report = screen_candidates(model, trusted, holdout, offered, ScreeningConfig(seed=seed))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    rejected = np.array([not d.accepted for d in report.decisions])
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return [
        {
            "case": f"RONI {report.scope} scope, ResNet-18 width {width}, {candidates} candidates x {shard} rows",
            "device": str(device),
            "base_accuracy": accuracy,
            "fit_s": fit_seconds,
            "screen_s": seconds,
            "peak_gib": peak,
            "lr": report.lr,
            "chunk_size": report.chunk_size,
            "tpr": float(rejected[:bad].mean()),
            "fpr": float(rejected[bad:].mean()),
        }
    ]
