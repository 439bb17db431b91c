"""GPU benchmarks, side by side in one process; on CPU the same code at a small width, so CI can smoke-test it.

Sections (each a function returning table rows; `main()` prints them in order):
- adversarial: `AdversarialTraining` in a Lightning Trainer vs a hand-written AMP loop doing the same work (same
  ResNet-18, optimizer and synthetic 32x32 batches already on the device), images/s for PGD-7 and FGSM-RS at
  8/255; bf16-mixed on CUDA, float32 on CPU. Times cover the batches after `warmup`, synchronised on CUDA.
- roni: screening of 256 candidate shards on that ResNet-18 (time, peak memory, TPR/FPR at 30% label flips), three
  seeds and their pooled rates on CUDA.
- cycle: one images cycle (sign, verify, screen, train, gate, sign the model) on the device.

`--only SECTION` runs one section; `--device cpu` forces the CPU smoke settings on a GPU machine.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch
from models import resnet18
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from trainguard.defenses import AdversarialTraining

EPS = 8 / 255


@dataclass(frozen=True)
class Row:
    """One line of a section's table: a label and its cells, in column order."""

    label: str
    cells: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    """What one throughput measurement runs: the model width, the batches, and the autocast dtype (None: fp32)."""

    device: torch.device
    width: int
    batch_size: int
    batches: int
    warmup: int
    autocast: torch.dtype | None

    @property
    def precision(self) -> str:
        return {None: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[self.autocast]

    @property
    def measured_images(self) -> int:
        return (self.batches - self.warmup) * self.batch_size


@dataclass(frozen=True)
class Attack:
    """An adversarial-training attack as both runs configure it: `steps` steps of `alpha` from a random start."""

    name: str
    callback_name: str
    steps: int
    alpha: float


PGD7 = Attack("PGD-7", "pgd", steps=7, alpha=2.5 * EPS / 7)
FGSM_RS = Attack("FGSM-RS", "fgsm-rs", steps=1, alpha=1.25 * EPS)


class DeviceBatches(Dataset):
    """Pre-made batches on the device; each fetch is a fresh `[x, y]` list, so replacing its input spares the data."""

    def __init__(self, work: Workload, seed: int = 0) -> None:
        gen = torch.Generator(device=work.device).manual_seed(seed)
        shape = (work.batches, work.batch_size, 3, 32, 32)
        self.x = torch.rand(shape, generator=gen, device=work.device)
        self.y = torch.randint(10, shape[:2], generator=gen, device=work.device)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> list[torch.Tensor]:
        return [self.x[i], self.y[i]]


class Classifier(pl.LightningModule):
    """The ResNet-18 as an ordinary LightningModule: cross-entropy, SGD with momentum."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return optimizer(self.parameters())


def optimizer(params: object) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)  # type: ignore[arg-type]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}" if device.type == "cuda" else "-"


class Stopwatch(pl.Callback):
    """Times the batches after `warmup`: from the start of batch `warmup` to the end of the last batch."""

    def __init__(self, work: Workload) -> None:
        self.work = work
        self.start = self.seconds = float("nan")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, i: int) -> None:
        if i == self.work.warmup:
            synchronize(self.work.device)
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, i: int
    ) -> None:
        if i == self.work.batches - 1:
            synchronize(self.work.device)
            self.seconds = time.perf_counter() - self.start


def callback_throughput(work: Workload, attack: Attack | None, log_success: bool = True) -> float:
    """Images/s of a Lightning fit with the `AdversarialTraining` callback (clean fit when `attack` is None)."""
    torch.manual_seed(0)
    stopwatch = Stopwatch(work)
    callbacks: list[pl.Callback] = [stopwatch]  # first: its batch start precedes the crafting
    if attack is not None:
        callbacks.append(
            AdversarialTraining(attack.callback_name, eps=EPS, steps=attack.steps, seed=0, log_success=log_success)
        )
    trainer = pl.Trainer(
        accelerator=work.device.type,
        devices=[work.device.index or 0] if work.device.type == "cuda" else 1,
        precision=work.precision,  # type: ignore[arg-type]
        max_epochs=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    loader = DataLoader(DeviceBatches(work), batch_size=None)
    trainer.fit(Classifier(resnet18(work.width).to(work.device)), train_dataloaders=loader)
    return work.measured_images / stopwatch.seconds


def hand_attack(
    net: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: Attack, autocast: torch.dtype | None
) -> torch.Tensor:
    """The loop a user writes: L-inf steps from a uniform random start, forwards under autocast, fp32 perturbation."""
    net.eval()
    x_adv = (x + (torch.rand_like(x) * 2 - 1) * EPS).clamp(0, 1)
    for _ in range(attack.steps):
        x_adv.requires_grad_(True)
        with torch.autocast(x.device.type, dtype=autocast, enabled=autocast is not None):
            loss = F.cross_entropy(net(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + attack.alpha * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    net.train()
    return x_adv


def hand_throughput(work: Workload, attack: Attack | None) -> float:
    """Images/s of a plain torch AMP loop over the same batches (clean training when `attack` is None)."""
    torch.manual_seed(0)
    net = resnet18(work.width).to(work.device)
    opt = optimizer(net.parameters())
    data = DeviceBatches(work)
    net.train()
    start = time.perf_counter()
    for i in range(work.batches):
        if i == work.warmup:
            synchronize(work.device)
            start = time.perf_counter()
        x, y = data[i]
        if attack is not None:
            x = hand_attack(net, x, y, attack, work.autocast)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(work.device.type, dtype=work.autocast, enabled=work.autocast is not None):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
    synchronize(work.device)
    return work.measured_images / (time.perf_counter() - start)


def bench_adversarial(
    device: torch.device,
    width: int,
    *,
    batch_size: int = 256,
    batches: int = 30,
    warmup: int = 5,
    rounds: int = 3,
    autocast: torch.dtype | None = None,
) -> list[Row]:
    """Callback vs hand-written AMP loop images/s (median of interleaved `rounds`) for clean, PGD-7 and FGSM-RS."""
    work = Workload(device, width, batch_size, batches, warmup, autocast)
    cases: list[tuple[str, Attack | None, bool]] = [
        ("clean", None, True),
        (PGD7.name, PGD7, True),
        (f"{PGD7.name}, log_success=False", PGD7, False),
        (FGSM_RS.name, FGSM_RS, True),
    ]
    rows = []
    for label, attack, log_success in cases:
        runs: list[tuple[float, float]] = []
        for _ in range(rounds):
            reset_peak_memory(device)
            lightning = callback_throughput(work, attack, log_success)
            memory = peak_memory_gib(device)
            runs.append((lightning, hand_throughput(work, attack)))
        lightning, hand = (statistics.median(column) for column in zip(*runs, strict=True))
        cells = {"callback img/s": f"{lightning:,.0f}", "hand AMP loop img/s": f"{hand:,.0f}"}
        rows.append(Row(label, {**cells, "callback / hand": f"{lightning / hand:.3f}", "callback peak GiB": memory}))
    return rows


def adversarial_section(device: torch.device) -> tuple[str, list[Row]]:
    """The adversarial section at the device's settings: ResNet-18 bf16 batch 256 on CUDA, width 8 fp32 on CPU."""
    if device.type == "cuda":
        title = "adversarial training, ResNet-18 (width 64), bf16-mixed, batch 256, eps 8/255"
        return title, bench_adversarial(device, 64, batches=80, warmup=10, rounds=5, autocast=torch.bfloat16)
    title = "adversarial training, ResNet-18 width 8 (CPU smoke), fp32, batch 16, eps 8/255"
    return title, bench_adversarial(device, 8, batch_size=16, batches=3, warmup=1, rounds=1)


def roni_section(device: torch.device, seeds: int | None = None) -> tuple[str, list[Row]]:
    """RONI screening of 256 candidates on ResNet-18 on CUDA, one row per seed (default 3) and their pooled
    rates; 32 candidates at width 16 on CPU (smoke, default one seed)."""
    from gpu_roni import bench_roni

    cuda = device.type == "cuda"
    runs = [
        bench_roni(device, 64 if cuda else 16, 256 if cuda else 32, fit_steps=300 if cuda else 60, seed=seed)[0]
        for seed in range(seeds or (3 if cuda else 1))
    ]
    rows = [
        Row(
            f"{run['case']}, seed {seed}",
            {k: f"{v:.3f}" if isinstance(v, float) else str(v) for k, v in run.items() if k != "case"},
        )
        for seed, run in enumerate(runs)
    ]
    if len(runs) > 1:
        pooled = {k: "" for k in rows[0].cells}
        pooled |= {k: f"{statistics.fmean(float(run[k]) for run in runs):.3f}" for k in ("tpr", "fpr")}
        rows.append(Row(f"pooled over {len(runs)} seeds (equal shard counts, so the mean)", pooled))
    title = "RONI screening, 30% label flips (goal on GPU: no error, TPR >= 0.95, FPR <= 0.03)"
    return title, rows


def cycle_section(device: torch.device) -> tuple[str, list[Row]]:
    """One images cycle on the device (the config's epochs on CUDA, two on CPU)."""
    from gpu_cycle import bench_cycle

    cuda = device.type == "cuda"
    rows = bench_cycle("gpu" if cuda else "cpu", None if cuda else 2)
    return "one-device cycle (images demo)", [Row(what, {"value": value, "note": note}) for what, value, note in rows]


SECTIONS: dict[str, Callable[[torch.device], tuple[str, list[Row]]]] = {
    "adversarial": adversarial_section,
    "roni": roni_section,
    "cycle": cycle_section,
}


def print_table(title: str, rows: list[Row]) -> None:
    columns = list(rows[0].cells)
    print(f"## {title}\n")
    print("| case | " + " | ".join(columns) + " |")
    print("| --- " * (len(columns) + 1) + "|")
    for row in rows:
        print(f"| {row.label} | " + " | ".join(row.cells[c] for c in columns) + " |")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=sorted(SECTIONS), help="run one section")
    parser.add_argument("--roni-seeds", type=int, help="seeds of the RONI section (default: 3 on CUDA, 1 on CPU)")
    args = parser.parse_args()
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}\n")
    else:
        print(f"# CPU, {os.cpu_count()} cores, load {os.getloadavg()}, torch {torch.__version__}\n")
    sections = {**SECTIONS, "roni": functools.partial(roni_section, seeds=args.roni_seeds)}
    for name, section in sections.items():
        if args.only in (None, name):
            print_table(*section(device))


if __name__ == "__main__":
    main()
