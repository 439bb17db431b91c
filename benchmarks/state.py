"""Benchmark: the signed cycle state's save and load cost per cycle does not grow with history.

Goal (issue 22): at 1, 100 and 10,000 cycles of 1,000 shard decisions each, the per-cycle cost of saving the state
(every event of a cycle: begin, manifests, one anti-rollback record, 1,000 decisions, evidence, three steps, accept)
and of loading it stays within 2x of the cost at cycle 1.

Three histories (1, 100 and 10,000 cycles) are built through the real `StateStore` (signed, chained log lines and a
signed head, fsynced), one cycle at a time. Then, in interleaved rounds (so a busy moment slows every history alike),
each history saves one more cycle and is loaded afresh; the medians are printed with the head's size and the log's
size on disk.

Run: `.venv/bin/python benchmarks/state.py [--cycles 1 100 10000] [--decisions 1000] [--rounds 9]`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from trainguard.pipeline.cycle_state import CycleState, HeldoutRecord, ModelRecord, ShardDecision
from trainguard.pipeline.state_log import StateStore
from trainguard.provenance.keys import SigningKey, generate_signing_key

CHECKPOINTS = (1, 100, 10_000)
ROUNDS = 9  # interleaved rounds: one more cycle saved and the state loaded, for each history


def _cycle(store: StateStore, state: CycleState, number: int, decisions: int) -> CycleState:
    """One cycle's worth of state changes, each saved as the cycle saves it."""
    shards = [
        ShardDecision(
            shard=f"owner/digits-contributed:src{i % 24}/c{number}-{i:05d}.parquet",
            sha256=f"{number:032x}{i:032x}",
            source=f"src{i % 24}",
            accepted=i % 10 != 0,
            check="roni",
            reason="" if i % 10 else "p-value 0.004 <= level 0.01: held-out margin of class 3 pushed down",
        )
        for i in range(decisions)
    ]
    state = store.update(state.begin(f"config-{number % 3}"))
    state = store.update(state.read_manifests({"/data/train.manifest.json": f"{number:064x}"}))
    state = store.update(state.accept_manifest("owner/digits-contributed", number, f"{number:064x}"))
    state = store.update(state.step_done("verification"))
    state = store.update(state.decide(shards))
    state = store.update(state.record_evidence([(d.source, d.sha256, 0.5) for d in shards], [d.sha256 for d in shards]))
    state = store.update(state.step_done("screening", {"roni/rejected": 100.0}))
    state = store.update(state.step_done("training", {"val/acc": 0.96, "val/robust_acc_eps0.1": 0.72}))
    model = ModelRecord(path=f"work/models/cycle-{number:04d}", sha256=f"{number:064x}")
    return store.update(state.accept(model, HeldoutRecord(manifest_sha256="cc" * 32, clean_accuracy=0.96)))


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _build(root: Path, key: SigningKey, cycles: int, decisions: int) -> tuple[StateStore, CycleState]:
    """A state with `cycles` cycles of history, built through the real store one cycle at a time."""
    store = StateStore(root / "state.json", key, ("bench", "work"))
    state = store.load()
    started = time.perf_counter()
    for number in range(1, cycles + 1):
        state = _cycle(store, state, number, decisions)
        if number % 1000 == 0:
            print(f"  ... {number} cycles built in {time.perf_counter() - started:.0f} s", flush=True)
    return store, state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, nargs="+", default=list(CHECKPOINTS))
    parser.add_argument("--decisions", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    key = generate_signing_key("ecdsa-p256")
    timings: dict[int, tuple[list[float], list[float]]] = {n: ([], []) for n in args.cycles}
    with tempfile.TemporaryDirectory() as folder:
        built = {n: _build(Path(folder) / f"history-{n}", key, n, args.decisions) for n in args.cycles}
        for round_ in range(args.rounds):  # interleaved, so a busy moment slows every history alike
            for n in args.cycles[round_ % len(args.cycles) :] + args.cycles[: round_ % len(args.cycles)]:
                store, state = built[n]
                begin = time.perf_counter()
                state = _cycle(store, state, n + round_ + 1, args.decisions)
                saved = time.perf_counter() - begin
                begin = time.perf_counter()
                loaded = StateStore(store.path, key, ("bench", "work")).load()
                timings[n][1].append(time.perf_counter() - begin)
                timings[n][0].append(saved)
                assert loaded.latest is not None and loaded.latest.cycle == n + round_ + 1
                built[n] = (store, state)
        sizes = {n: (built[n][0].path.stat().st_size, _size(built[n][0].log_dir)) for n in args.cycles}
    rows = [(n, statistics.median(timings[n][0]), statistics.median(timings[n][1]), *sizes[n]) for n in args.cycles]
    base_save, base_load = rows[0][1], rows[0][2]
    print(f"\nstate save and load per cycle, {args.decisions} decisions a cycle, median of {args.rounds} rounds")
    print(f"{'cycles':>8} {'save/cycle':>11} {'ratio':>6} {'load':>9} {'ratio':>6} {'head':>9} {'log on disk':>12}")
    for cycles, save, load, head, log in rows:
        saved, loaded_ = (
            f"{save * 1000:>9.1f}ms {save / base_save:>6.2f}",
            f"{load * 1000:>7.1f}ms {load / base_load:>6.2f}",
        )
        print(f"{cycles:>8} {saved} {loaded_} {head / 1024:>7.1f}KB {log / 2**20:>10.1f}MB")
    worst = max(max(save / base_save, load / base_load) for _, save, load, _, _ in rows)
    verdict = "met" if worst <= 2.0 else "NOT met"
    print(f"largest ratio to {rows[0][0]} cycle(s): {worst:.2f} (goal <= 2.0 up to {rows[-1][0]} cycles): {verdict}")


if __name__ == "__main__":
    main()
