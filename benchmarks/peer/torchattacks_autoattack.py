"""The peer AutoAttack of `benchmarks/adversarial.py`, run in its own virtualenv (torchattacks pins requests 2.25,
which breaks mlflow: `make bench-peer` builds `.venv-peer` from `benchmarks/peer/requirements.txt`).

torchattacks' APGD (ce), APGDT, FAB (multi-targeted) and Square at the paper's settings (100 steps, 9 targets,
5,000 queries; not its `AutoAttack` class, whose attacks take 10 steps), composed as the reference composes them:
each attack only on the rows every earlier one left correctly classified. Reads `job.pt` (a TorchScript model file
name, inputs, labels, eps list, class count) from the folder given, writes `peer.json` there: per eps the robust
rows and, per attack, the rows attacked and the process CPU seconds (`peer.partial.json` after each eps until then).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torchattacks


def line_up(model: torch.nn.Module, eps: float, classes: int, names: list[str]) -> dict[str, torchattacks.Attack]:
    """The peer's attacks for the names of a trainguard preset, at the paper's settings."""
    every = {
        "apgd-ce": lambda: torchattacks.APGD(model, eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
        "apgd-t": lambda: torchattacks.APGDT(model, eps=eps, steps=100, n_restarts=1, n_classes=classes, seed=0),
        "fab-t": lambda: torchattacks.FAB(
            model, eps=eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=classes, seed=0
        ),
        "square": lambda: torchattacks.Square(model, eps=eps, n_queries=5000, n_restarts=1, seed=0),
    }
    return {name: every[name]() for name in names}


def main() -> None:
    folder = Path(sys.argv[1])
    job = torch.load(folder / "job.pt")
    torch.set_num_threads(int(job["threads"]))
    model = torch.jit.load(str(folder / job["model"])).eval()
    x, y = job["x"], job["y"]
    with torch.no_grad():
        clean = model(x).argmax(1) == y
    out = {"clean": clean.float().mean().item(), "torchattacks": torchattacks.__version__, "eps": {}}
    for eps in job["eps"]:
        robust = clean.clone()
        costs = {}
        for name, attack in line_up(model, eps, int(job["classes"]), list(job["attacks"])).items():
            todo = robust.nonzero().squeeze(1)
            start = time.process_time()
            if len(todo) > 0:
                adv = attack(x[todo], y[todo])
                with torch.no_grad():
                    still = model(adv).argmax(1) == y[todo]
                robust[todo[~still]] = False
            costs[name] = {"rows": len(todo), "seconds": time.process_time() - start}
        out["eps"][str(eps)] = {"robust": robust.float().mean().item(), "rows": robust.tolist(), "costs": costs}
        partial = folder / "peer.partial.json"
        partial.write_text(json.dumps(out))
        partial.replace(folder / ("peer.json" if len(out["eps"]) == len(job["eps"]) else "peer.partial.json"))


if __name__ == "__main__":
    main()
