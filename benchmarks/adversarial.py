"""Adversarial training on digits: efficacy and cost of the `AdversarialTraining` callback, measured side by side.

Prints (1) clean and PGD-20 accuracy at eps 0.1/0.2/0.3 on a held-out split for a clean-trained CNN, the
callback-driven PGD-7 AT CNN and a hand-written PGD-7 AT loop; (2) the cost ratio AT fit time / clean fit time
for the callback in a Lightning Trainer vs a hand-written torch loop doing the same work (same model, same batches,
PGD-7), interleaved so that other load on the machine hits both alike; (3) ART's AdversarialTrainerMadryPGD on the
same model, in both tables; (4) for each of those models and eps, PGD-20 beside APGD-CE, APGD-DLR (Croce & Hein,
2020) and the per-sample worst case of the three, with the gap PGD-20 - worst case: how much PGD-20 alone
overestimates robust accuracy; (5) trainguard's `autoattack` cascade beside a peer AutoAttack (torchattacks at the
paper's settings, in its own virtualenv: `make bench-peer`; `benchmarks/peer/`) on the digits CNN trained with the
callback (PGD eps 0.2) on 797 rows and attacked on the 1,000 held-out ones, and on a CIFAR-shaped ResNet-18 of width
8 (digits upscaled to 3x32x32), with the time of each. `--quick` runs a smoke version; `--no-art` leaves ART out;
`--no-timing` skips (2); `--autoattack-only` runs (5) alone, `--no-autoattack` leaves it out. (5) costs about 18
CPU minutes per side at the paper's settings (most of it at eps 0.1, where 84 % of the rows survive every attack):
42 minutes of wall time on 2 shared cores, both sides side by side; `--quick` is a 40-row smoke run of it.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import statistics
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # ART's progress bars; read when tqdm is first imported

import pytorch_lightning as pl
import torch
from digits_demo.digits import load_digits_split, split
from digits_demo.models import DigitsClassifier, DigitsCNN
from models import resnet18
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from trainguard.defenses import AdversarialTraining, correct_under_attacks
from trainguard.defenses.attacks import PGD, make_attack
from trainguard.defenses.attacks.cascade import PRESETS, Cascade, CascadeResult

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


@dataclass(frozen=True)
class AutoAttackSetup:
    """Section (5): the digits CNN's fit and split (>= 1,000 held-out rows), the ResNet's width, fit and rows."""

    digits: Setup
    resnet_width: int
    resnet_epochs: int
    resnet_rows: int
    resnet_eps: tuple[float, ...]


AUTOATTACK_FULL = AutoAttackSetup(
    digits=Setup(
        epochs=30, train_size=797, test_size=1000, batch_size=64, train_eps=0.2, train_steps=7,
        timing_epochs=0, timing_rounds=0, apgd_steps=100, apgd_restarts=1,
    ),
    resnet_width=8, resnet_epochs=3, resnet_rows=100, resnet_eps=(8 / 255, 4 / 255, 2 / 255),
)  # fmt: skip
AUTOATTACK_QUICK = AutoAttackSetup(
    digits=Setup(
        epochs=1, train_size=797, test_size=40, batch_size=64, train_eps=0.2, train_steps=7,
        timing_epochs=0, timing_rounds=0, apgd_steps=100, apgd_restarts=1,
    ),
    resnet_width=4, resnet_epochs=1, resnet_rows=10, resnet_eps=(2 / 255,),
)  # fmt: skip


@dataclass(frozen=True)
class Peer:
    """Where the peer AutoAttack runs: its virtualenv's python, and a folder keeping its results by job."""

    python: Path
    cache: Path


def upscaled(x: torch.Tensor) -> torch.Tensor:
    """Digits as CIFAR-shaped images: 8x8 -> 32x32 (nearest), three identical channels."""
    return F.interpolate(x.view(-1, 1, 8, 8), scale_factor=4, mode="nearest").repeat(1, 3, 1, 1)


def fit_resnet(data: TensorDataset, setup: AutoAttackSetup, seed: int = 0) -> nn.Module:
    """A clean-trained ResNet-18 of the setup's width on the upscaled digits (Adam, lr 1e-3)."""
    torch.manual_seed(seed)
    model = resnet18(setup.resnet_width)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = data.tensors
    for _ in range(setup.resnet_epochs):
        model.train()
        for batch in DataLoader(TensorDataset(upscaled(x), y), batch_size=64, shuffle=True):
            optimizer.zero_grad()
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            optimizer.step()
    return model.eval()


def trainguard_autoattack(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, preset: str
) -> tuple[CascadeResult, float]:
    """trainguard's preset at AutoAttack's settings (100 steps, 9 targets, 5,000 queries: the attacks' defaults),
    as a cascade timed in process CPU seconds; returns the result and the total CPU seconds."""
    attacks = {name: make_attack(name, model, eps=eps, steps=100, seed=0) for name in PRESETS[preset]}
    start = time.process_time()
    result = Cascade(attacks, clock=time.process_time)(x, y, eps)
    return result, time.process_time() - start


def peer_job_key(model: nn.Module, x: torch.Tensor, eps: tuple[float, ...], names: tuple[str, ...]) -> str:
    """The peer's results are kept under the hash of the model's weights, the rows, the eps and the attacks."""
    digest = hashlib.sha256()
    for tensor in (*model.state_dict().values(), x):
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    digest.update(json.dumps([list(eps), list(names)]).encode())
    return digest.hexdigest()[:16]


def start_peer(
    peer: Peer, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: tuple[float, ...], names: tuple[str, ...]
) -> tuple[Path, subprocess.Popen[bytes] | None]:
    """Starts the peer on this model and these rows (one torch thread, beside trainguard's run), unless its results
    for the same job are kept; returns the folder its `peer.json` lands in and the process (None: kept)."""
    folder = peer.cache / peer_job_key(model, x, eps, names)
    if (folder / "peer.json").exists():
        return folder, None
    folder.mkdir(parents=True, exist_ok=True)
    traced = torch.jit.trace(model.eval(), x[:2])
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    (folder / "model.pt").write_bytes(buffer.getvalue())
    job = {"model": "model.pt", "x": x, "y": y, "eps": list(eps), "classes": 10, "attacks": list(names), "threads": 1}
    torch.save(job, folder / "job.pt")
    script = Path(__file__).resolve().parent / "peer" / "torchattacks_autoattack.py"
    return folder, subprocess.Popen([str(peer.python), str(script), str(folder)])


def wait_for_peer(folder: Path, process: subprocess.Popen[bytes] | None, eps: float) -> dict[str, Any]:
    """The peer's result at `eps`, once it has written it (after each eps; all of them when it ends)."""
    while True:
        for name in ("peer.json", "peer.partial.json"):
            path = folder / name
            if path.exists() and str(eps) in (done := json.loads(path.read_text())["eps"]):
                return done[str(eps)]
        if process is not None and process.poll() is not None:
            raise SystemExit(f"the peer AutoAttack stopped (exit {process.returncode}) before eps {eps:g}")
        time.sleep(2)


def autoattack_section(
    models: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor, tuple[float, ...]]], preset: str, peer: Peer | None
) -> None:
    """Section (5): per model and eps, trainguard's cascade beside the peer's, robust accuracy and CPU seconds."""
    names = PRESETS[preset]
    print(f"\n## AutoAttack: trainguard `{preset}` ({', '.join(names)}) vs the peer (torchattacks: APGD-CE, APGD-T, "
          "FAB-T, Square at 100 steps, 9 targets, 5,000 queries), both as the reference's cascade (robust rows only "
          "onward); process CPU seconds, one torch thread each, run side by side; the largest eps first (the "
          "cheapest: few rows survive APGD-CE). Under each row, each attack's rows attacked and CPU seconds, and "
          "for trainguard the rows it sent through the model with an input gradient and without\n")  # fmt: skip
    started = {}
    if peer is not None:
        for label, (model, x, y, eps) in models.items():
            started[label] = start_peer(peer, model, x, y, eps, names)
    print("| model | eps | rows | clean | trainguard worst case | peer worst case | gap | rows disagreeing "
          f"| rows broken by {' / '.join(names)} | trainguard CPU s | peer CPU s |")  # fmt: skip
    print("| --- " * 11 + "|")
    gaps = []
    for label, (model, x, y, eps_list) in models.items():
        for eps in eps_list:
            result, seconds = trainguard_autoattack(model, x, y, eps, preset)
            peer_eps = wait_for_peer(*started[label], eps) if label in started else None
            peer_acc = float("nan") if peer_eps is None else peer_eps["robust"]
            worst = result.robust.float().mean().item()
            if peer_eps is not None:
                gaps.append((label, eps, worst - peer_acc))
            broke = " / ".join(str(int(b.sum())) for b in result.broken_by.values())
            peer_s = float("nan") if peer_eps is None else sum(c["seconds"] for c in peer_eps["costs"].values())
            disagree = "" if peer_eps is None else int((result.robust != torch.tensor(peer_eps["rows"])).sum())
            print(
                f"| {label} | {eps:.4g} | {len(x)} | {result.clean.float().mean().item():.3f} | {worst:.3f} | "
                f"{peer_acc:.3f} | {worst - peer_acc:+.3f} | {disagree} | {broke} | {seconds:.1f} | {peer_s:.1f} |",
                flush=True,
            )
            costs = ", ".join(
                f"{n} {c.rows} rows {c.seconds:.1f} s {c.gradients} grad-rows {c.forwards} fwd-rows"
                for n, c in result.costs.items()
            )
            peer_costs = (
                ""
                if peer_eps is None
                else ", ".join(f"{n} {c['rows']} rows {c['seconds']:.1f} s" for n, c in peer_eps["costs"].items())
            )
            print(f"    cost: trainguard: {costs}; peer: {peer_costs or 'not run'}", flush=True)
    if gaps:
        label, eps, gap = max(gaps, key=lambda g: abs(g[2]))
        print(f"\nlargest |gap| {abs(gap):.4f} ({label}, eps {eps:.4g}); goal on the digits CNN: <= 0.005 at every eps")


def cached_model(path: Path, empty: nn.Module, fit: Callable[[], nn.Module]) -> nn.Module:
    """The model fitted once and kept at `path` (so that a rerun attacks the same weights, and finds the peer's
    results for them); `empty` is the architecture to load them into."""
    if path.exists():
        empty.load_state_dict(torch.load(path))
        return empty.eval()
    model = fit()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def run_autoattack(args: argparse.Namespace) -> None:
    """Section (5) on the digits CNN (PGD-AT through the callback) and the ResNet, with the peer when installed."""
    setup = AUTOATTACK_QUICK if args.quick else AUTOATTACK_FULL
    cache = Path(args.cache)
    peer = Peer(Path(args.peer_python), cache / "peer") if not args.no_peer else None
    if peer is not None and not peer.python.exists():
        print(f"\n(no peer: {peer.python} is missing; `make bench-peer` installs it)")
        peer = None
    train, test = loaders(setup.digits)
    tag = hashlib.sha256(repr(setup).encode()).hexdigest()[:12]
    cnn = cached_model(
        cache / f"digits-cnn-{tag}.pt",
        DigitsCNN(),
        lambda: fit_lightning(train, setup.digits, setup.digits.epochs, adversarial=True, seed=0)[0],
    )
    resnet = cached_model(cache / f"resnet-{tag}.pt", resnet18(setup.resnet_width), lambda: fit_resnet(train, setup))
    x, y = test.tensors
    rows = setup.resnet_rows
    models = {
        f"digits CNN, PGD-AT eps {setup.digits.train_eps:g} (callback)": (cnn, x.view(-1, 1, 8, 8), y, EVAL_EPS[::-1]),
        f"ResNet-18 width {setup.resnet_width}, clean": (resnet, upscaled(x[:rows]), y[:rows], setup.resnet_eps),
    }
    autoattack_section(models, args.preset, peer)


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
    parser.add_argument("--autoattack-only", action="store_true", help="run section (5) alone")
    parser.add_argument("--no-autoattack", action="store_true", help="leave section (5) out")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="autoattack", help="trainguard's line-up in (5)")
    parser.add_argument("--no-peer", action="store_true", help="section (5) without the peer AutoAttack")
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--peer-python", default=str(root / ".venv-peer" / "bin" / "python"), help="the peer's venv")
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "trainguard-bench-autoattack"),
        help="where (5) keeps its fitted models and the peer's results by job",
    )
    args = parser.parse_args()
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(args.threads)
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    setup = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore")
    if args.autoattack_only:
        print(f"# AutoAttack on digits and a ResNet ({'quick' if args.quick else 'full'}), torch threads "
              f"{torch.get_num_threads()}, cpus {os.cpu_count()}, load before: {os.getloadavg()}")  # fmt: skip
        run_autoattack(args)
        print(f"\nload after: {os.getloadavg()}")
        return
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
    if not args.no_autoattack:
        run_autoattack(args)
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
