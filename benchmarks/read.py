"""Benchmark: verified vs plain reading, with decoding, of the same images, side by side in one run.

The same N PNG images 32 x 32 RGB (digits upscaled, with noise) and their labels, in two formats:

- WebDataset: tars of `--per-tar` images. Plain = `webdataset.WebDataset` reading the files directly with
  `.decode("rgb").to_tuple("png", "cls")`; verified = `WebDatasetDecoder` on the bytes `ShardReader` checked
  against the signed manifest.
- LitData: `litdata.optimize` output (~`--chunk-mb` MB chunks, items `{"image": PNG bytes, "label": int}`). Plain =
  `litdata.StreamingDataset` on the optimized dir, unverified; verified = `VerifiedStreamingDataset` in a fresh
  private cache (so every chunk is verified and copied again). Both decode every PNG with the same Pillow function.

Each verified measure opens (checks) the signed manifest too. The measures alternate plain/verified and section by
section within every repeat, so background load hits them alike. Goal (issue 11): verified <= 1.10 x plain, per
section, on 2 cores. Run: `.venv/bin/python benchmarks/read.py [--repeats 5] [--tars 64] [--per-tar 256]
[--chunk-mb 4]`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from trainguard.provenance.verify import VerifiedManifest

GOAL = 1.10
SIDE = 32
LabeledPng = tuple[bytes, int]
"""One image: its PNG bytes and its label."""


@dataclass(frozen=True)
class Section:
    """One format: how to read and decode every image plainly and verified; each returns the samples it read."""

    name: str
    setup: str
    plain: Callable[[], int]
    verified: Callable[[], int]


@dataclass(frozen=True)
class Row:
    """One repeat of one section: seconds to read and decode everything plainly and verified, and samples read."""

    section: str
    repeat: int
    plain_s: float
    verified_s: float
    samples: int

    @property
    def ratio(self) -> float:
        return self.verified_s / self.plain_s


def digit_images(count: int) -> list[LabeledPng]:
    """`count` 32 x 32 RGB digit PNGs (8 x 8 digits upscaled 4 x, with Gaussian noise) and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        row = index % len(bunch.images)
        grey = np.kron(bunch.images[row] * 15, np.ones((4, 4)))
        pixels = np.clip(grey[:, :, None] + rng.normal(0, 8, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        images.append((buffer.getvalue(), int(bunch.target[row])))
    return images


def decode_png(data: bytes) -> np.ndarray:
    """A PNG as (H, W, 3) float32 in [0, 1], as webdataset's `decode("rgb")` gives it."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255


def signed(data: Path) -> tuple[Callable[[], VerifiedManifest], int]:
    """Signs `data` with a fresh key; returns a function opening (checking) its manifest, and its shard count."""
    from trainguard.provenance import TrustPolicy, generate_signing_key, open_manifest, sign_dataset, write_manifest

    key = generate_signing_key()
    envelope, manifest = sign_dataset(data, key, dataset=data.name, source="bench")
    path = write_manifest(envelope, data.parent / f"{data.name}.manifest.json")
    trust, state = TrustPolicy.of((key.public,)), data.parent / f"{data.name}.state.json"
    return lambda: open_manifest(path, trust, data_dir=data, state=state), len(manifest.shards)


def webdataset_section(root: Path, images: list[LabeledPng], per_tar: int) -> Section:
    """Image tars of `per_tar` images: plain `webdataset.WebDataset` vs `WebDatasetDecoder` on verified bytes."""
    import webdataset as wds

    from trainguard.provenance.formats.webdataset import WebDatasetDecoder
    from trainguard.provenance.reader import ShardReader

    data = root / "webdataset"
    data.mkdir()
    urls = []
    for part, start in enumerate(range(0, len(images), per_tar)):
        path = data / f"part-{part:05d}.tar"
        with wds.TarWriter(str(path), encoder=False, mtime=0.0) as writer:
            for index, (png, label) in enumerate(images[start : start + per_tar], start):
                writer.write({"__key__": f"{index:08d}", "png": png, "cls": str(label).encode()})
        urls.append(str(path))
    names = [Path(url).name for url in urls]
    open_verified, _ = signed(data)
    decoder = WebDatasetDecoder(mode="RGB", shape=(3, SIDE, SIDE))

    def plain() -> int:
        dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb").to_tuple("png", "cls")
        return sum(1 for _ in dataset)

    def verified() -> int:
        reader = ShardReader(open_verified())
        return sum(len(decoder(name, reader.read_bytes(name))) for name in names)

    return Section("webdataset", f"{len(urls)} tars x {per_tar} images", plain, verified)


def _litdata_item(image: LabeledPng) -> dict[str, object]:
    return {"image": image[0], "label": image[1]}


def litdata_section(root: Path, images: list[LabeledPng], chunk_mb: float) -> Section:
    """An optimized dataset of PNG bytes: plain `litdata.StreamingDataset` vs `VerifiedStreamingDataset`, both
    decoding every image with `decode_png`."""
    import litdata

    from trainguard.provenance.formats.litdata import VerifiedStreamingDataset

    data = root / "litdata"
    litdata.optimize(fn=_litdata_item, inputs=images, output_dir=str(data), chunk_bytes=int(chunk_mb * 1e6),
                     num_workers=1)  # fmt: skip
    open_verified, shards = signed(data)
    formats = json.loads((data / "index.json").read_text())["config"]["data_format"]
    labels = sum(label for _, label in images)

    def read_all(dataset: object) -> int:
        count = total = 0
        for item in dataset:  # type: ignore[attr-defined]
            assert decode_png(item["image"]).shape == (SIDE, SIDE, 3)
            total += int(item["label"])
            count += 1
        assert total == labels, (total, labels)
        return count

    def plain() -> int:
        return read_all(litdata.StreamingDataset(str(data)))

    def verified() -> int:
        dataset = VerifiedStreamingDataset(open_verified(), cache_dir=root / "litdata-cache")
        count = read_all(dataset)
        assert len(dataset.read_log().records) == shards, "every chunk and the index verified once"
        return count

    setup = f"{shards - 1} chunks of ~{chunk_mb:g} MB + index.json, items {' + '.join(formats)}"
    return Section("litdata", setup, plain, verified)


def measure(sections: list[Section], repeats: int, samples: int) -> list[Row]:
    """Runs every section's plain and verified reads once to warm up, then `repeats` times, interleaved."""
    for section in sections:  # the page cache, imports and lazy setup
        section.plain(), section.verified()
    rows = []
    for repeat in range(repeats):
        for section in sections:
            plain_s, plain_n = _timed(section.plain)
            verified_s, verified_n = _timed(section.verified)
            assert plain_n == verified_n == samples, (section.name, plain_n, verified_n)
            rows.append(Row(section.name, repeat, plain_s, verified_s, verified_n))
    return rows


def _timed(run: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    count = run()
    return time.perf_counter() - start, count


def report(sections: list[Section], rows: list[Row]) -> None:
    """Every repeat, then per section: best-of times and ratio, median ratio, samples/s and the goal."""
    print(f"{'section':<12}{'repeat':>7}{'samples':>9}{'plain s':>10}{'verified s':>12}{'ratio':>8}")
    for row in rows:
        print(
            f"{row.section:<12}{row.repeat:>7}{row.samples:>9}{row.plain_s:>10.3f}{row.verified_s:>12.3f}"
            f"{row.ratio:>8.3f}"
        )
    print()
    print(f"{'section':<12}{'best plain s':>14}{'best verified s':>17}{'best-of ratio':>15}{'median ratio':>14}"
          f"{'verified/s':>12}  goal <= {GOAL:.2f}  (data)")  # fmt: skip
    for section in sections:
        mine = [r for r in rows if r.section == section.name]
        plain, verified = min(r.plain_s for r in mine), min(r.verified_s for r in mine)
        median = statistics.median(r.ratio for r in mine)
        met = "met" if verified / plain <= GOAL and median <= GOAL else "MISSED"
        print(
            f"{section.name:<12}{plain:>14.3f}{verified:>17.3f}{verified / plain:>15.3f}{median:>14.3f}"
            f"{mine[0].samples / verified:>12,.0f}  {met:<13}  ({section.setup})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tars", type=int, default=64)
    parser.add_argument("--per-tar", type=int, default=256)
    parser.add_argument("--chunk-mb", type=float, default=4.0, help="LitData chunk size")
    options = parser.parse_args()
    samples = options.tars * options.per_tar
    with tempfile.TemporaryDirectory(prefix="trainguard-read-bench-") as folder:
        os.environ.setdefault("TRAINGUARD_HOME", str(Path(folder) / "home"))
        root = Path(folder)
        images = digit_images(samples)
        sections = [
            webdataset_section(root, images, options.per_tar),
            litdata_section(root, images, options.chunk_mb),
        ]
        print(f"{samples} images 32 x 32 PNG; cores {os.cpu_count()}, load average before {os.getloadavg()[0]:.2f}")
        rows = measure(sections, options.repeats, samples)
        print(f"load average after {os.getloadavg()[0]:.2f}")
        report(sections, rows)
    print(f"torchvision imported: {'torchvision' in sys.modules}")


if __name__ == "__main__":
    main()
