"""Adversarial training on digits: efficacy and cost of the `AdversarialTraining` callback, measured side by side.

Prints (1) clean and PGD-20 accuracy at eps 0.1/0.2/0.3 on a held-out split for a clean-trained CNN, the
callback-driven PGD-7 AT CNN and a hand-written PGD-7 AT loop; (2) the cost ratio AT fit time / clean fit time
for the callback in a Lightning Trainer vs a hand-written torch loop doing the same work (same model, same batches,
PGD-7), interleaved so that other load on the machine hits both alike; (3) ART's AdversarialTrainerMadryPGD on the
same model, in both tables; (4) for each of those models and eps, PGD-20 beside APGD-CE, APGD-DLR (Croce & Hein,
2020) and the per-sample worst case of the three, with the gap PGD-20 - worst case: how much PGD-20 alone
overestimates robust accuracy. `--quick` runs a smoke version; `--no-art` leaves ART out; `--no-timing` skips (2).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
import warnings
from dataclasses import dataclass

os.environ.setdefault("TQDM_DISABLE", "1")  # ART's progress bars; read when tqdm is first imported

import pytorch_lightning as pl
import torch
from digits_demo.digits import load_digits_split, split
from digits_demo.models import DigitsClassifier, DigitsCNN
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainguard.defenses import AdversarialTraining, correct_under_attacks
from trainguard.defenses.attacks import PGD, make_attack

EVAL_EPS = (0.1, 0.2, 0.3)
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]  # process CPU time: other jobs on the shared cores barely move it (torch runs 1 thread)


@dataclass(frozen=True)
class Setup:
    epochs: int
    train_size: int
    test_size: int
    batch_size: int
    train_eps: float
    train_steps: int
    timing_epochs: int
    timing_rounds: int
    apgd_steps: int
    apgd_restarts: int


FULL = Setup(
    epochs=30, train_size=1297, test_size=500, batch_size=64, train_eps=0.2, train_steps=7,
    timing_epochs=5, timing_rounds=3, apgd_steps=100, apgd_restarts=1,
)  # fmt: skip
QUICK = Setup(
    epochs=2, train_size=400, test_size=200, batch_size=64, train_eps=0.2, train_steps=7,
    timing_epochs=1, timing_rounds=1, apgd_steps=25, apgd_restarts=1,
)  # fmt: skip


def loaders(setup: Setup, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    train, test = split(load_digits_split(seed), [setup.train_size, setup.test_size])
    return (
        TensorDataset(torch.from_numpy(train.x), torch.from_numpy(train.y)),
        TensorDataset(torch.from_numpy(test.x), torch.from_numpy(test.y)),
    )


def train_loader(data: TensorDataset, setup: Setup, seed: int) -> DataLoader:
    return DataLoader(data, batch_size=setup.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def fit_lightning(
    data: TensorDataset, setup: Setup, epochs: int, adversarial: bool, seed: int, log_success: bool = True
) -> tuple[nn.Module, float]:
    """The digits LightningModule as is, plus the callback for AT; returns the network and the fit time."""
    pl.seed_everything(seed, verbose=False)
    module = DigitsClassifier()
    callbacks: list[pl.Callback] = []
    if adversarial:
        callbacks.append(
            AdversarialTraining("pgd", eps=setup.train_eps, steps=setup.train_steps, seed=seed, log_success=log_success)
        )
    loader = train_loader(data, setup, seed)
    run = trainer(epochs, callbacks)
    start = clock()
    run.fit(module, train_dataloaders=loader)
    return module.net, clock() - start


def hand_pgd(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, gen: torch.Generator
) -> torch.Tensor:
    """The hand-written reference: L-inf PGD from a random start, step 2.5 eps / steps, eval mode, input gradients."""
    alpha = 2.5 * eps / steps
    model.eval()
    x_adv = (x + (torch.rand(x.shape, generator=gen) * 2 - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    model.train()
    return x_adv


def fit_hand(data: TensorDataset, setup: Setup, epochs: int, adversarial: bool, seed: int) -> tuple[nn.Module, float]:
    """A plain torch loop with the same model, optimizer and batches; PGD-7 crafted by `hand_pgd` for AT."""
    pl.seed_everything(seed, verbose=False)
    module = DigitsClassifier()
    model = module.net
    optimizer = module.configure_optimizers()
    loader = train_loader(data, setup, seed)
    gen = torch.Generator().manual_seed(seed)
    start = clock()
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            if adversarial:
                x = hand_pgd(model, x, y, setup.train_eps, setup.train_steps, gen)
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
    return model, clock() - start


def fit_art(data: TensorDataset, setup: Setup, epochs: int, seed: int) -> tuple[nn.Module, float]:
    """ART's AdversarialTrainerMadryPGD (PGD-7, same eps and step) on the same CNN and optimizer."""
    from art.defences.trainer import AdversarialTrainerMadryPGD
    from art.estimators.classification import PyTorchClassifier

    pl.seed_everything(seed, verbose=False)
    model = DigitsCNN()
    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        input_shape=(64,),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    trainer_ = AdversarialTrainerMadryPGD(
        classifier,
        nb_epochs=epochs,
        batch_size=setup.batch_size,
        eps=setup.train_eps,
        eps_step=2.5 * setup.train_eps / setup.train_steps,
        max_iter=setup.train_steps,
        num_random_init=1,
    )
    x, y = data.tensors
    start = clock()
    trainer_.fit(x.numpy(), y.numpy())
    return model, clock() - start


def accuracy(model: nn.Module, data: TensorDataset, eps: float, seed: int) -> float:
    x, y = data.tensors
    model.eval()
    if eps > 0:
        x = PGD(model, eps=eps, steps=20, seed=seed)(x, y)
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def robustness_row(name: str, model: nn.Module, test: TensorDataset, seconds: float) -> str:
    cells = [f"{accuracy(model, test, eps, seed=1):.3f}" for eps in (0.0, *EVAL_EPS)]
    return f"| {name} | " + " | ".join(cells) + f" | {seconds:.1f} |"


def apgd_accuracies(model: nn.Module, test: TensorDataset, setup: Setup, eps: float) -> tuple[float, ...]:
    """PGD-20 (the same starts as the efficacy table), APGD-CE, APGD-DLR and their per-sample worst case at `eps`."""
    x, y = test.tensors
    model.eval()
    apgd = {"steps": setup.apgd_steps, "restarts": setup.apgd_restarts, "seed": 1}
    attacks = {
        "pgd-20": PGD(model, eps=eps, steps=20, seed=1),
        "apgd-ce": make_attack("apgd-ce", model, eps=eps, **apgd),
        "apgd-dlr": make_attack("apgd-dlr", model, eps=eps, **apgd),
    }
    correct = correct_under_attacks(attacks, x, y, eps)
    worst = torch.stack(list(correct.values())).amin(dim=0)
    return tuple(c.mean().item() for c in (*correct.values(), worst))


def timing_row(label: str, lc: float, la: float, hc: float, ha: float, aa: float, ln: float) -> str:
    cells = (lc, la, la / lc, hc, ha, ha / hc, la / ha, aa, aa / ha, ln, ln / ha)
    return f"| {label} | " + " | ".join(f"{c:.2f}" for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few epochs, small splits")
    parser.add_argument("--no-art", action="store_true", help="skip ART's AdversarialTrainerMadryPGD")
    parser.add_argument("--no-timing", action="store_true", help="skip the cost table (AT / clean fit time)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: stable timings when other jobs share the cores)"
    )
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="time fits in process CPU or wall s")
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    setup = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore")
    train, test = loaders(setup)
    print(f"# adversarial training on digits ({'quick' if args.quick else 'full'}): {setup}")
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load before: {os.getloadavg()}, "
          f"times in {args.clock} seconds\n")  # fmt: skip

    print(f"## efficacy ({setup.epochs} epochs, PGD-{setup.train_steps} AT at eps {setup.train_eps}; PGD-20 eval)\n")
    print(f"| model | clean | PGD-20 @0.1 | PGD-20 @0.2 | PGD-20 @0.3 | fit s ({args.clock}) |")
    print("| --- | --- | --- | --- | --- | --- |")
    clean, clean_s = fit_lightning(train, setup, setup.epochs, adversarial=False, seed=0)
    print(robustness_row("clean-trained (Lightning)", clean, test, clean_s), flush=True)
    at, at_s = fit_lightning(train, setup, setup.epochs, adversarial=True, seed=0)
    print(robustness_row("PGD-AT, AdversarialTraining callback", at, test, at_s), flush=True)
    hand, hand_s = fit_hand(train, setup, setup.epochs, adversarial=True, seed=0)
    print(robustness_row("PGD-AT, hand-written torch loop", hand, test, hand_s), flush=True)
    models = {"clean-trained (Lightning)": clean, "PGD-AT, callback": at, "PGD-AT, hand-written": hand}
    if not args.no_art:
        art, art_s = fit_art(train, setup, setup.epochs, seed=0)
        print(robustness_row("PGD-AT, ART AdversarialTrainerMadryPGD", art, test, art_s), flush=True)
        models["PGD-AT, ART"] = art

    print(f"\n## PGD-20 vs APGD (APGD-{setup.apgd_steps}, {setup.apgd_restarts} restart(s); worst case per sample "
          f"over the three; gap = PGD-20 - worst case, what PGD-20 alone overestimates)\n")  # fmt: skip
    print("| model | eps | PGD-20 | APGD-CE | APGD-DLR | worst case | gap |")
    print("| --- " * 7 + "|")
    gaps = []
    for name, model in models.items():
        for eps in EVAL_EPS:
            pgd, ce, dlr, worst = apgd_accuracies(model, test, setup, eps)
            gaps.append(pgd - worst)
            cells = " | ".join(f"{c:.3f}" for c in (pgd, ce, dlr, worst, pgd - worst))
            print(f"| {name} | {eps:g} | {cells} |", flush=True)
    print(f"\nlargest gap {max(gaps):.3f}, mean gap {statistics.mean(gaps):.3f} (accuracy points as fractions)")
    if args.no_timing:
        print(f"\nload after: {os.getloadavg()}")
        return

    print(f"\n## cost: AT / clean fit time, {setup.timing_rounds} interleaved rounds of {setup.timing_epochs} epochs\n")
    print("| round | Lightning clean s | callback AT s | callback ratio | hand clean s | hand AT s | hand ratio "
          "| callback AT / hand AT | ART AT s | ART / hand AT "
          "| callback AT, no success s | that / hand AT |")  # fmt: skip
    print("| --- " * 12 + "|")
    times: list[tuple[float, ...]] = []
    for r in range(setup.timing_rounds):
        _, lc = fit_lightning(train, setup, setup.timing_epochs, adversarial=False, seed=r)
        _, hc = fit_hand(train, setup, setup.timing_epochs, adversarial=False, seed=r)
        _, la = fit_lightning(train, setup, setup.timing_epochs, adversarial=True, seed=r)
        _, ha = fit_hand(train, setup, setup.timing_epochs, adversarial=True, seed=r)
        aa = float("nan") if args.no_art else fit_art(train, setup, setup.timing_epochs, seed=r)[1]
        _, ln = fit_lightning(train, setup, setup.timing_epochs, adversarial=True, seed=r, log_success=False)
        times.append((lc, la, hc, ha, aa, ln))
        print(timing_row(str(r), lc, la, hc, ha, aa, ln), flush=True)
    lc, la, hc, ha, aa, ln = (statistics.median(column) for column in zip(*times, strict=True))
    print(timing_row("median", lc, la, hc, ha, aa, ln))
    print(f"\nAT/clean ratio (median {args.clock} s): callback {la / lc:.2f}x, hand-written {ha / hc:.2f}x -> "
          f"callback / hand = {(la / lc) / (ha / hc):.3f} (goal <= 1.05)")  # fmt: skip
    print(f"absolute AT fit time: callback {la / ha:.2f}x the hand-written loop ({ln / ha:.2f}x with "
          f"log_success=False, ratio {ln / lc:.2f}x); ART {aa / ha:.2f}x")  # fmt: skip
    print(f"\nload after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
