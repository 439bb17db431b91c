"""Benchmark: `trainguard verify` vs single-thread hashlib on the same shards, and verify-on-read vs plain pandas.

Goals (issue 3), measured side by side in one run and printed as ratios:
- `trainguard verify` (whole process, start-up included) <= 0.6 x single-thread `hashlib.sha256` over the same
  bytes on a 2-core machine; peak RSS of verify < 200 MB;
- verify-on-read of parquet shards <= 1.10 x reading the same shards with `pandas.read_parquet`, unverified.

Issue 12, in the same run: 10,000 shards of 100 KB (1 GB) verified by `trainguard verify` <= 0.6 x a single-thread
hashlib loop over the same files (the manifest signs BLAKE3 beside SHA-256 and verify checks BLAKE3; the same data
under a SHA-256-only manifest is printed beside it); and a binned manifest of 1,000,000 entries (synthetic: every
entry is signed, but only rank 0's share of 64 exists as real 256-byte files): sign, verify all (top level and every
bin), and verify rank 0's share (its bins and the hashing of its files), each in its own process with its peak RSS.

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


def bench_small(root: Path, files: int, size: int, repeats: int) -> list[tuple[str, str, str, str]]:
    from trainguard.provenance import generate_signing_key, sign_dataset, write_keypair, write_manifest

    data = root / "small"
    rng = np.random.default_rng(2)
    paths = []
    for index in range(files):
        path = data / f"part-{index // 1000:03d}" / f"shard-{index:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(size))
        paths.append(path)
    key = generate_signing_key()
    _, public = write_keypair(key, root / "small-owner")
    envelope, _ = sign_dataset(data, key, source="bench")
    manifest_path = write_manifest(envelope, root / "small.manifest.json")
    hash_command = [sys.executable, "-c", HASH_ONE_THREAD, *map(str, paths)]
    verify_command = [str(BIN / "trainguard"), "verify", str(manifest_path), "--trust", str(public),
                      "--data-dir", str(data), "--state", str(root / "small-state.json")]  # fmt: skip
    sha256_path = _without_blake3(manifest_path, key, root / "small-sha256.manifest.json")
    sha256_command = [*verify_command[:2], str(sha256_path), *verify_command[3:-1], str(root / "sha256-state.json")]
    hashlib_times, verify_times, sha256_times = best_of(
        repeats,
        lambda: run_timed(hash_command)[0],
        lambda: run_timed(verify_command)[0],
        lambda: run_timed(sha256_command)[0],
    )
    a, b, c = min(hashlib_times), min(verify_times), min(sha256_times)
    median_ratio = statistics.median(verify_times) / statistics.median(hashlib_times)
    hash_inline, verify_inline = best_of(
        repeats, lambda: _blake3_loop(paths), lambda: _verify_one_thread(manifest_path, public, data)
    )
    overhead = (min(verify_inline) - min(hash_inline)) / files * 1e6
    label = f"{files} x {size // 1024} KB"
    return [
        (f"{label}: single-thread hashlib (e)", f"{a:.2f} s", "", f"median {statistics.median(hashlib_times):.2f} s"),
        (f"{label}: trainguard verify (f)", f"{b:.2f} s", "", f"median {statistics.median(verify_times):.2f} s"),
        ("ratio f/e (goal <= 0.60)", f"{b / a:.3f}", "", f"median ratio {median_ratio:.3f}"),
        (f"{label}: trainguard verify, sha256-only manifest", f"{c:.2f} s", f"{c / a:.3f}", "ratio to (e)"),
        ("one thread, in-process: blake3 loop (g)", f"{min(hash_inline):.2f} s", "", ""),
        (
            "one thread, in-process: verify_shards (h)",
            f"{min(verify_inline):.2f} s",
            "",
            f"(h-g)/shard {overhead:.1f} us",
        ),
        ("single-file manifest size", f"{manifest_path.stat().st_size / 1e6:.1f} MB", "", f"{files} shards"),
    ]


def _without_blake3(manifest_path: Path, key: object, out: Path) -> Path:
    """The same manifest signed again without BLAKE3 digests (as manifests signed before them are)."""
    from dataclasses import replace

    from trainguard.provenance import PAYLOAD_TYPE, parse_statement, sign_envelope, write_manifest
    from trainguard.provenance.manifest import statement_bytes
    from trainguard.provenance.verify import read_envelope

    signed = parse_statement(read_envelope(manifest_path)[1].payload)
    plain = replace(signed, shards=tuple(replace(s, blake3=None) for s in signed.shards))
    return write_manifest(sign_envelope(PAYLOAD_TYPE, statement_bytes(plain), key), out)  # type: ignore[arg-type]


def _blake3_loop(paths: list[Path]) -> float:
    """Seconds of a single-thread BLAKE3 loop over `paths` in this process (the digest verify checks)."""
    import blake3

    started = time.perf_counter()
    for path in paths:
        blake3.blake3(path.read_bytes()).hexdigest()
    return time.perf_counter() - started


def _verify_one_thread(manifest_path: Path, public: Path, data: Path) -> float:
    """Seconds of every shard check on one thread, the manifest already open: hashing plus per-shard work."""
    from trainguard.provenance import open_manifest
    from trainguard.provenance.verify import verify_shards

    verified = open_manifest(manifest_path, public, data_dir=data, state=data.parent / "small-inline-state.json")
    started = time.perf_counter()
    report = verify_shards(verified, workers=1)
    assert report.ok, report.failures[:3]
    return time.perf_counter() - started


MILLION_PHASE = """
import hashlib, os, resource, sys, time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from trainguard.provenance import TrustPolicy, load_signing_key, verify_dataset
from trainguard.provenance.bins import sign_binned, write_binned
from trainguard.provenance.manifest import Manifest, ShardEntry
phase, root, count, world = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
key = load_signing_key(root / "owner.key")
names = [f"part-{i // 1000:04d}/shard-{i:07d}.bin" for i in range(count)]
started = time.perf_counter()
if phase == "sign":
    now = datetime.now(UTC).replace(microsecond=0)
    real = hashlib.sha256(bytes(256)).hexdigest()
    shards = tuple(ShardEntry(n, real, 256, "bench", "train", 1) for n in names)
    write_binned(sign_binned(Manifest("million", 1, now, now + timedelta(days=1), shards), key), root / "m.json")
elif phase == "links":
    for index, name in enumerate(names):
        if index % 50_000 == 0:  # ext4 allows 65,000 links to one inode
            (root / f"one-{index}.bin").write_bytes(bytes(256))
            base = root / f"one-{index}.bin"
        if index % 1000 == 0:
            (root / "data" / name).parent.mkdir(parents=True)
        os.link(base, root / "data" / name)
else:
    share = None if phase == "all" else (0, world)
    report = verify_dataset(root / "m.json", TrustPolicy.of((key.public,)), data_dir=root / "data",
                            state=root / "state.json", record=False, share=share, allow_extra=phase == "share-extra")
    assert report.ok, report.failures[:3]
    print("shards", report.shards)
print("seconds", time.perf_counter() - started, "rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_million(root: Path, count: int, world: int) -> list[tuple[str, str, str, str]]:
    from trainguard.provenance import generate_signing_key, write_keypair

    root.mkdir()
    (root / "data").mkdir()
    write_keypair(generate_signing_key(), root / "owner")

    def phase(name: str) -> tuple[str, str, str]:
        done = subprocess.run([sys.executable, "-c", MILLION_PHASE, name, str(root), str(count), str(world)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"million-entry phase {name} failed: {done.stderr[-1000:]}")
        words = done.stdout.split()
        seconds, rss = float(words[words.index("seconds") + 1]), int(words[words.index("rss") + 1]) / 1024
        shards = f"{int(words[1]):,} shards" if words[0] == "shards" else ""
        return f"{seconds:.2f} s", f"{rss:.0f} MB", shards

    rows = [
        (f"{count:,} entries: sign (bins + write)", *phase("sign")[:2], "entries given, no hashing"),
        ("setup: a hard link per entry (256-byte files)", *phase("links")[:2], ""),
        ("verify all: every bin, every file hashed", *phase("all")),
        (f"verify rank 0 of {world}: its bins, its files", *phase("share")),
        (f"verify rank 0 of {world}, --allow-extra (no walk)", *phase("share-extra")),
    ]
    bins = sorted((root / "m.json.bins").iterdir())
    each = sum(b.stat().st_size for b in bins) / len(bins) / 1e3
    top = (root / "m.json").stat().st_size / 1e3
    return [*rows, ("top-level statement / bins", f"{top:.0f} kB", "", f"{len(bins)} bins, {each:.0f} kB each")]


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
    parser.add_argument("--small-files", type=int, default=10_000)
    parser.add_argument("--small-kib", type=int, default=100)
    parser.add_argument("--million", type=int, default=1_000_000, help="entries of the binned manifest")
    parser.add_argument("--world", type=int, default=64, help="ranks the binned manifest is shared among")
    options = parser.parse_args()
    print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="trainguard-bench-") as folder:
        rows = bench_verify(Path(folder), options.gib, options.files, options.repeats)
        rows += bench_small(Path(folder), options.small_files, options.small_kib * 1024, options.repeats)
        rows += bench_million(Path(folder) / "million", options.million, options.world)
        rows += bench_read(Path(folder), options.parquet_shards, options.parquet_rows, options.read_repeats)
    print(f"load average after: {os.getloadavg()}")
    width = max(len(r[0]) for r in rows)
    for name, value, rate, note in rows:
        print(f"{name:<{width}}  {value:>10}  {rate:>10}  {note}")


if __name__ == "__main__":
    main()
