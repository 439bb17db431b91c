"""Benchmark: `trainguard verify` vs single-thread hashlib on the same shards, and verify-on-read vs plain pandas.

Goals (issue 3), measured side by side in one run and printed as ratios:
- `trainguard verify` (whole process, start-up included) <= 0.6 x single-thread `hashlib.sha256` over the same
  bytes on a 2-core machine; peak RSS of verify < 200 MB;
- verify-on-read of parquet shards <= 1.10 x reading the same shards with `pandas.read_parquet`, unverified.

Run: `.venv/bin/python benchmarks/verify.py [--gib 2] [--files 16] [--repeats 3] [--read-repeats 15]`. The ratios
need a quiet machine: the script prints the load average before and after. `--files 1` measures one large shard,
which verify hashes chunk by chunk on every core (its signed chunk digests), where sha256 of the whole is sequential.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent
HASH_ONE_THREAD = """
import hashlib, sys
buffer = bytearray(4 * 1024 * 1024)
view = memoryview(buffer)
for path in sys.argv[1:]:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as stream:
        while count := stream.readinto(buffer):
            digest.update(view[:count])
    print(digest.hexdigest())
"""


def write_random_shards(root: Path, files: int, total_bytes: int) -> list[Path]:
    rng = np.random.default_rng(0)
    size = total_bytes // files
    paths = []
    for index in range(files):
        path = root / f"part-{index // 4}" / f"shard-{index:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as stream:
            for offset in range(0, size, 64 * 1024 * 1024):
                stream.write(rng.bytes(min(64 * 1024 * 1024, size - offset)))
        paths.append(path)
    return paths


def run_timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one child process.

    RSS comes from /usr/bin/time (the exec'ed program alone); wait4's figure would also count the pages a child
    inherits from this (large) benchmark process before exec.
    """
    timer = ["/usr/bin/time", "-f", "%M"] if Path("/usr/bin/time").exists() else []
    started = time.perf_counter()
    child = subprocess.Popen([*timer, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    assert child.stderr is not None
    stderr = child.stderr.read().decode()
    child.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[:2]} failed: {stderr[-500:]}")
    return elapsed, int(stderr.strip().splitlines()[-1]) if timer else usage.ru_maxrss


def best_of(repeats: int, *measures: Callable[[], float]) -> list[list[float]]:
    """Runs the measures interleaved `repeats` times (so background load hits them alike)."""
    results: list[list[float]] = [[] for _ in measures]
    for _ in range(repeats):
        for index, measure in enumerate(measures):
            results[index].append(measure())
    return results


def bench_verify(root: Path, gib: float, files: int, repeats: int) -> list[tuple[str, str, str, str]]:
    from trainguard.provenance import generate_signing_key, sign_dataset, write_keypair, write_manifest

    data = root / "shards"
    paths = write_random_shards(data, files, int(gib * 1024**3))
    key = generate_signing_key()
    _, public = write_keypair(key, root / "owner")
    started = time.perf_counter()
    envelope, manifest = sign_dataset(data, key, source="bench")
    sign_seconds = time.perf_counter() - started
    manifest_path = write_manifest(envelope, root / "bench.manifest.json")
    total = manifest.total_bytes
    hash_command = [sys.executable, "-c", HASH_ONE_THREAD, *map(str, paths)]
    verify_command = [str(BIN / "trainguard"), "verify", str(manifest_path), "--trust", str(public),
                      "--data-dir", str(data), "--state", str(root / "state.json")]  # fmt: skip
    rss: list[int] = []

    def hashlib_once() -> float:
        return run_timed(hash_command)[0]

    def verify_once() -> float:
        seconds, peak = run_timed(verify_command)
        rss.append(peak)
        return seconds

    startup = min(run_timed([str(BIN / "trainguard"), "--version"])[0] for _ in range(3))
    hashlib_times, verify_times = best_of(repeats, hashlib_once, verify_once)
    a, b = min(hashlib_times), min(verify_times)
    median_ratio = statistics.median(verify_times) / statistics.median(hashlib_times)
    gb = total / 1e9
    return [
        ("sign (in-process, sha256 + chunk digests)", f"{sign_seconds:.2f} s", f"{gb / sign_seconds:.2f} GB/s", ""),
        ("single-thread hashlib.sha256 subprocess (a)", f"{a:.2f} s", f"{gb / a:.2f} GB/s",
         f"median {statistics.median(hashlib_times):.2f} s"),
        ("trainguard verify subprocess (b)", f"{b:.2f} s", f"{gb / b:.2f} GB/s",
         f"median {statistics.median(verify_times):.2f} s"),
        ("trainguard --version (start-up)", f"{startup:.2f} s", "", ""),
        ("ratio b/a (goal <= 0.60)", f"{b / a:.3f}", "", f"median ratio {median_ratio:.3f}"),
        ("verify peak RSS (goal < 200 MB)", f"{max(rss) / 1024:.0f} MB", "", f"{total / 2**30:.2f} GiB, {files} files"),
    ]  # fmt: skip


def bench_read(root: Path, shards: int, rows: int, repeats: int) -> list[tuple[str, str, str, str]]:
    import pandas as pd

    from trainguard.provenance import (
        ShardReader,
        TrustPolicy,
        generate_signing_key,
        open_manifest,
        sign_dataset,
        write_manifest,
    )

    data = root / "parquet"
    data.mkdir()
    rng = np.random.default_rng(1)
    columns = [f"pixel_{i:02d}" for i in range(64)]
    for index in range(shards):
        frame = pd.DataFrame((rng.integers(0, 17, (rows, 64)) / 16).astype(np.float32), columns=columns)
        frame["label"] = rng.integers(0, 10, rows)
        frame.to_parquet(data / f"shard-{index:02d}.parquet", index=False)
    key = generate_signing_key()
    envelope, manifest = sign_dataset(data, key, source="bench")
    path = write_manifest(envelope, root / "parquet.manifest.json")
    verified = open_manifest(path, TrustPolicy.of((key.public,)), data_dir=data, state=root / "read-state.json")
    names = [s.name for s in manifest.shards]

    def plain() -> float:
        started = time.perf_counter()
        for name in names:
            pd.read_parquet(data / name)
        return time.perf_counter() - started

    def verified_read() -> float:
        started = time.perf_counter()
        for _ in ShardReader(verified).frames(names):
            pass
        return time.perf_counter() - started

    def verified_sequential() -> float:
        reader = ShardReader(verified)
        started = time.perf_counter()
        for name in names:
            reader.read_frame(name)
        return time.perf_counter() - started

    plain()  # warm the page cache and pyarrow
    plain_times, read_times, sequential_times = best_of(repeats, plain, verified_read, verified_sequential)
    p, v, s = min(plain_times), min(read_times), min(sequential_times)
    median_ratio = statistics.median(read_times) / statistics.median(plain_times)
    size = manifest.total_bytes / 1e6
    return [
        ("pandas.read_parquet, unverified (c)", f"{p:.3f} s", f"{size:.0f} MB", f"{shards} shards x {rows} rows"),
        ("verify-on-read, prefetching frames() (d)", f"{v:.3f} s", "", ""),
        ("verify-on-read, sequential read_frame()", f"{s:.3f} s", "", f"ratio {s / p:.3f}"),
        ("ratio d/c (goal <= 1.10)", f"{v / p:.3f}", "", f"median ratio {median_ratio:.3f}"),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parquet-shards", type=int, default=48, help="48 x ~2 MB: long enough runs to time")
    parser.add_argument("--parquet-rows", type=int, default=50_000)
    parser.add_argument("--read-repeats", type=int, default=15, help="reads are short (~0.1 s): more repeats")
    options = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="trainguard-bench-") as folder:
        rows = bench_verify(Path(folder), options.gib, options.files, options.repeats)
        rows += bench_read(Path(folder), options.parquet_shards, options.parquet_rows, options.read_repeats)
    print(f"load average after: {os.getloadavg()}")
    width = max(len(r[0]) for r in rows)
    for name, value, rate, note in rows:
        print(f"{name:<{width}}  {value:>10}  {rate:>10}  {note}")


if __name__ == "__main__":
    main()
