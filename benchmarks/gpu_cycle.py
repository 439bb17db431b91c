"""The one-device cycle section of `benchmarks/gpu.py`: the images demo's cycle (sign, verify, screen, train, gate,
sign the model) on the given accelerator, timed stage by stage from its report."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def bench_cycle(accelerator: str, epochs: int | None = None) -> list[tuple[str, str, str]]:
    """Runs one images cycle in a scratch project on `accelerator` ("gpu" or "cpu"), with the config's epochs unless
    `epochs` shortens it (a CPU smoke run); rows of (what, value, note)."""
    from digits_demo.demo import stage_data

    from trainguard.pipeline.cycle import run_cycle

    with tempfile.TemporaryDirectory(prefix="trainguard-gpu-cycle-") as scratch:
        root = Path(scratch)
        shutil.copytree(REPO / "configs", root / "configs")  # its trust policy names keys relative to itself
        config = yaml.safe_load((REPO / "configs" / "digits-images.yaml").read_text())
        config["project"] = str(REPO / "examples")
        config["trainer"]["init_args"].update(accelerator=accelerator, devices=1)
        if epochs is not None:
            config["training"].update(bootstrap_epochs=epochs * 4)
            config["trainer"]["init_args"].update(max_epochs=epochs)
        config["tracking"] = {"uri": f"sqlite:///{root / 'mlruns.db'}", "experiment_name": "gpu-bench"}
        (root / "cycle.yaml").write_text(yaml.safe_dump(config))
        previous = Path.cwd()
        os.chdir(root)
        try:
            stage_data(root / "demo-work", "images")
            started = time.perf_counter()
            outcome = run_cycle(root / "cycle.yaml")
            seconds = time.perf_counter() - started
        finally:
            os.chdir(previous)
    clean = outcome.metrics.get("val/acc", float("nan"))
    epochs = config["trainer"]["init_args"]["max_epochs"]
    return [
        ("cycle", outcome.status, f"{seconds:.1f} s on {accelerator}, {epochs} epochs"),
        ("cycle shards refused", str(sum(not d.accepted for d in outcome.shards)), "tampered + poisoned by RONI"),
        ("cycle clean held-out accuracy", f"{clean:.3f}", ""),
    ]
