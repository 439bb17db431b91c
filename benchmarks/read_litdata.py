"""Benchmark: reading a LitData optimized dataset through VerifiedStreamingDataset vs plain litdata.StreamingDataset.

Goal (issue 11): verified reading of every item, decoded, <= 1.10 x plain `litdata.StreamingDataset` on the same
optimized dir, unverified (20,000 32x32 RGB uint8 images + labels in ~4 MB chunks, on 2 cores). Each repeat builds a
fresh dataset (the verified one a fresh private cache, so every chunk is verified and copied again); the measures run
interleaved so background load hits them alike, and the best and median ratios come from one run.

Run: `.venv/bin/python benchmarks/read_litdata.py [--items 20000] [--chunk-mb 4] [--repeats 7]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

SIDE = 32


def image(index: int) -> dict[str, object]:
    """One item: a (3, 32, 32) uint8 image and its label, the same for the same index."""
    rng = np.random.default_rng(index)
    return {"image": rng.integers(0, 256, (3, SIDE, SIDE), dtype=np.uint8), "label": index % 10}


def read_all(dataset: object) -> int:
    """Iterates every item and touches its decoded image and label; returns the label sum (so nothing is skipped)."""
    total = 0
    for item in dataset:  # type: ignore[attr-defined]
        assert item["image"].shape == (3, SIDE, SIDE)
        total += int(item["label"])
    return total


def best_of(repeats: int, *measures: Callable[[], float]) -> list[list[float]]:
    """Runs the measures interleaved `repeats` times."""
    results: list[list[float]] = [[] for _ in measures]
    for _ in range(repeats):
        for index, measure in enumerate(measures):
            results[index].append(measure())
    return results


def bench_litdata(root: Path, items: int = 20_000, chunk_mb: float = 4.0, repeats: int = 7) -> list[tuple[str, ...]]:
    import litdata

    from trainguard.provenance import TrustPolicy, generate_signing_key, open_manifest, sign_dataset, write_manifest
    from trainguard.provenance.formats.litdata import VerifiedStreamingDataset

    data = root / "optimized"
    started = time.perf_counter()
    litdata.optimize(fn=image, inputs=list(range(items)), output_dir=str(data), chunk_bytes=int(chunk_mb * 1e6),
                     num_workers=1)  # fmt: skip
    optimize_seconds = time.perf_counter() - started
    key = generate_signing_key()
    envelope, manifest = sign_dataset(data, key, source="bench")
    path = write_manifest(envelope, root / "optimized.manifest.json")
    verified = open_manifest(path, TrustPolicy.of((key.public,)), data_dir=data, state=root / "state.json")
    expected = sum(i % 10 for i in range(items))

    def plain() -> float:
        started = time.perf_counter()
        assert read_all(litdata.StreamingDataset(str(data))) == expected
        return time.perf_counter() - started

    def verified_read() -> float:
        started = time.perf_counter()
        dataset = VerifiedStreamingDataset(verified, cache_dir=root / "cache")
        assert read_all(dataset) == expected
        seconds = time.perf_counter() - started
        assert len(dataset.read_log().records) == len(manifest.shards)
        return seconds

    plain()  # warm the page cache and imports
    plain_times, verified_times = best_of(repeats, plain, verified_read)
    p, v = min(plain_times), min(verified_times)
    median_ratio = statistics.median(verified_times) / statistics.median(plain_times)
    size = manifest.total_bytes / 1e6
    return [
        ("litdata.optimize (setup)", f"{optimize_seconds:.2f} s", f"{size:.0f} MB",
         f"{len(manifest.shards) - 1} chunks + index.json"),
        ("litdata.StreamingDataset, unverified (a)", f"{p:.3f} s", f"{items / p:,.0f} items/s",
         f"median {statistics.median(plain_times):.3f} s"),
        ("VerifiedStreamingDataset (b)", f"{v:.3f} s", f"{items / v:,.0f} items/s",
         f"median {statistics.median(verified_times):.3f} s"),
        ("ratio b/a (goal <= 1.10)", f"{v / p:.3f}", "", f"median ratio {median_ratio:.3f}"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--chunk-mb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=7)
    options = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="trainguard-bench-") as folder:
        rows = bench_litdata(Path(folder), options.items, options.chunk_mb, options.repeats)
    print(f"load average after: {os.getloadavg()}")
    width = max(len(r[0]) for r in rows)
    for name, value, rate, note in rows:
        print(f"{name:<{width}}  {value:>10}  {rate:>16}  {note}")


if __name__ == "__main__":
    main()
