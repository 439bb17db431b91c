"""Benchmark: verified vs plain reading, with decoding, of the same shards, side by side in one run.

WebDataset: 64 tars x 256 PNG images 32 x 32 RGB (digits upscaled, with noise). Plain = `webdataset.WebDataset`
reading the files directly with `.decode("rgb").to_tuple("png", "cls")`; verified = `WebDatasetDecoder` on the
bytes `ShardReader` checked against the signed manifest. Goal (issue 11): verified <= 1.10 x plain on 2 cores.

Each format is one `bench_<format>(root, repeats) -> list[Row]` function (its own data under `root`); `main()` runs
them all and prints their rows. Run: `.venv/bin/python benchmarks/read.py [--repeats 5] [--tars 64] [--per-tar 256]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Row:
    """One repeat of one format: seconds to read and decode everything plainly and verified, and samples read."""

    section: str
    repeat: int
    plain_s: float
    verified_s: float
    samples: int

    @property
    def ratio(self) -> float:
        return self.verified_s / self.plain_s


def write_image_tars(root: Path, tars: int, per_tar: int) -> list[Path]:
    """`tars` WebDataset tars of `per_tar` 32 x 32 RGB digit PNGs with .cls labels."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from webdataset import TarWriter

    bunch = load_digits()
    rng = np.random.default_rng(0)
    paths = []
    for part in range(tars):
        path = root / f"part-{part:05d}.tar"
        with TarWriter(str(path), encoder=False, mtime=0.0) as writer:
            for index in range(part * per_tar, (part + 1) * per_tar):
                row = index % len(bunch.images)
                grey = np.kron(bunch.images[row] * 15, np.ones((4, 4)))
                pixels = np.clip(grey[:, :, None] + rng.normal(0, 8, (32, 32, 3)), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "PNG")
                writer.write(
                    {"__key__": f"{index:08d}", "png": buffer.getvalue(), "cls": str(bunch.target[row]).encode()}
                )
        paths.append(path)
    return paths


def signed_reader_factory(root: Path) -> Callable[[], object]:
    """Signs `root` once with a fresh key; returns a function opening a new verified `ShardReader` of it."""
    from trainguard.provenance.keys import generate_signing_key, write_keypair
    from trainguard.provenance.reader import ShardReader
    from trainguard.provenance.signing import sign_dataset, write_manifest
    from trainguard.provenance.verify import open_manifest

    keys = root.parent / "keys"
    key = generate_signing_key("ed25519")
    write_keypair(key, keys / "owner")
    (keys / "policy.json").write_text(json.dumps({"keys": ["owner.pub"]}))
    envelope, _ = sign_dataset(root, key, dataset="bench", source="owner")
    manifest = write_manifest(envelope, root.parent / "manifest.json")
    return lambda: ShardReader(open_manifest(manifest, keys / "policy.json", data_dir=root))


def bench_webdataset(root: Path, repeats: int, tars: int = 64, per_tar: int = 256) -> list[Row]:
    """Plain webdataset vs verified decoding of the same image tars, alternating, `repeats` times."""
    import webdataset as wds

    from trainguard.provenance.formats.webdataset import WebDatasetDecoder

    data = root / "webdataset"
    data.mkdir()
    paths = write_image_tars(data, tars, per_tar)
    open_reader = signed_reader_factory(data)
    urls = [str(p) for p in paths]
    decoder = WebDatasetDecoder(mode="RGB", shape=(3, 32, 32))

    def plain() -> int:
        dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb").to_tuple("png", "cls")
        return sum(1 for _ in dataset)

    def verified() -> int:
        reader = open_reader()
        return sum(len(decoder(p.name, reader.read_bytes(p.name))) for p in paths)  # type: ignore[attr-defined]

    plain(), verified()  # warm the page cache and imports
    rows = []
    for repeat in range(repeats):
        plain_s, plain_n = _timed(plain)
        verified_s, verified_n = _timed(verified)
        assert plain_n == verified_n == tars * per_tar, (plain_n, verified_n)
        rows.append(Row("webdataset", repeat, plain_s, verified_s, verified_n))
    return rows


def _timed(run: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    count = run()
    return time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tars", type=int, default=64)
    parser.add_argument("--per-tar", type=int, default=256)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trainguard-read-bench-") as folder:
        os.environ.setdefault("TRAINGUARD_HOME", str(Path(folder) / "home"))
        print(f"cores {os.cpu_count()}, load average before {os.getloadavg()[0]:.2f}")
        rows = bench_webdataset(Path(folder), options.repeats, options.tars, options.per_tar)
        print(f"{'section':<12}{'repeat':>7}{'samples':>9}{'plain s':>10}{'verified s':>12}{'ratio':>8}")
        for row in rows:
            print(
                f"{row.section:<12}{row.repeat:>7}{row.samples:>9}{row.plain_s:>10.3f}{row.verified_s:>12.3f}"
                f"{row.ratio:>8.3f}"
            )
        for section in dict.fromkeys(r.section for r in rows):
            ratios = [r.ratio for r in rows if r.section == section]
            best = min(r.verified_s for r in rows if r.section == section) / min(
                r.plain_s for r in rows if r.section == section
            )
            print(f"{section}: best-of ratio {best:.3f}, median ratio {statistics.median(ratios):.3f} (goal <= 1.10)")
        print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
