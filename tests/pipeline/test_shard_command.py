"""`trainguard shard` through the CLI: labelled images become signed WebDataset tars and a CSV table parquet
shards, which read back verified; unusable input exits 2 with one line."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from trainguard.provenance.formats.webdataset import WebDatasetDecoder, read_webdataset
from trainguard.provenance.reader import ShardReader
from trainguard.provenance.verify import open_manifest

TRAINGUARD = str(Path(sys.executable).parent / "trainguard")
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def trainguard(cli: Run, tmp_path: Path) -> Run:
    """`trainguard(*args)`: the command run in the test's folder by the CLI's entry point in this process (`cli`);
    one test below starts `trainguard shard` as its own process."""
    return lambda *args: cli(tmp_path, *args)


def digit_png(row: int) -> tuple[bytes, int]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    buffer = io.BytesIO()
    Image.fromarray((bunch.images[row] * 255 / 16).astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue(), int(bunch.target[row])


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """30 digit PNGs in class-per-sub-folder layout: images/<label>/<row>.png."""
    root = tmp_path / "images"
    for row in range(30):
        data, label = digit_png(row)
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        (root / str(label) / f"{row:04d}.png").write_bytes(data)
    return root


@pytest.fixture
def alice(tmp_path: Path, trainguard: Run) -> tuple[Path, Path]:
    """alice's private key and a trust policy granting her key."""
    assert trainguard("keygen", "--out", tmp_path / "keys" / "alice").returncode == 0
    policy = tmp_path / "keys" / "policy.json"
    policy.write_text('{"keys": ["alice.pub"], "roles": ["train", "trusted", "holdout"]}')
    return tmp_path / "keys" / "alice.key", policy


def test_a_class_per_folder_of_images_becomes_signed_tars_that_read_back_verified(
    tmp_path: Path, image_folder: Path, alice: tuple[Path, Path], trainguard: Run
) -> None:
    out = tmp_path / "shards"
    done = trainguard(
        "shard", image_folder, "--out", out, "--shard-size", "8", "--key", alice[0], "--source", "alice",
        "--dataset", "digits-wds",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "wrote 4 shards (30 samples, at most 8 each, shuffled with seed 0)" in done.stdout
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == [f"part-{i:05d}.tar" for i in range(4)]
    reader = ShardReader(open_manifest(out / "manifest.json", alice[1], dataset="digits-wds"))
    parts = [read_webdataset(reader, name, WebDatasetDecoder(mode="L")) for name in names]
    assert [len(p) for p in parts] == [8, 8, 8, 6]
    labels = sorted(int(label) for part in parts for label in part.targets)
    assert labels == sorted(digit_png(row)[1] for row in range(30))
    assert parts[0].inputs.shape[1:] == (1, 8, 8)


def test_a_path_label_csv_with_named_classes_maps_them_to_sorted_ids(
    tmp_path: Path, image_folder: Path, trainguard: Run
) -> None:
    rows = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png"))[:5]
    listing = tmp_path / "labels.csv"
    listing.write_text("path,label\n" + "".join(f"{r},{'cat' if i % 2 else 'dog'}\n" for i, r in enumerate(rows)))
    out = tmp_path / "shards"
    done = trainguard("shard", image_folder, "--labels", listing, "--out", out, "--shard-size", "10", "--keep-order")
    assert done.returncode == 0, done.stderr
    assert "classes: 0=cat, 1=dog" in done.stdout
    samples = WebDatasetDecoder()("part-00000.tar", (out / "part-00000.tar").read_bytes())
    assert samples.targets.tolist() == [1, 0, 1, 0, 1]


def test_a_csv_table_becomes_signed_parquet_shards_of_n_rows(
    tmp_path: Path, alice: tuple[Path, Path], trainguard: Run
) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    frame = pd.DataFrame(bunch.data[:120] / 16, columns=[f"pixel_{i:02d}" for i in range(64)])
    frame["y"] = bunch.target[:120]
    table = tmp_path / "digits.csv"
    frame.to_csv(table, index=False)
    out = tmp_path / "tables"
    done = trainguard(
        "shard", "--from-csv", table, "--label-column", "y", "--shard-size", "50", "--out", out,
        "--key", alice[0], "--source", "alice",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    reader = ShardReader(open_manifest(out / "manifest.json", alice[1]))
    assert [s.records for s in reader.verified.manifest.shards] == [50, 50, 20]
    back = pd.concat(reader.read_frame(s.name) for s in reader.verified.manifest.shards)
    assert reader.verified.manifest.shuffle_seed == 0
    assert not np.array_equal(back["y"].to_numpy(), frame["y"].to_numpy())  # dealt in another order
    np.testing.assert_allclose(_sorted_rows(back.to_numpy()), _sorted_rows(frame.to_numpy()), rtol=1e-6)
    kept = tmp_path / "kept"
    done = trainguard(
        "shard", "--from-csv", table, "--label-column", "y", "--shard-size", "50", "--out", kept, "--keep-order",
        "--key", alice[0], "--source", "alice",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    reader = ShardReader(open_manifest(kept / "manifest.json", alice[1]))
    assert reader.verified.manifest.shuffle_seed is None
    back = pd.concat(reader.read_frame(s.name) for s in reader.verified.manifest.shards)
    np.testing.assert_allclose(back.to_numpy(), frame.to_numpy(), rtol=1e-6)


def _sorted_rows(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


def _shard_labels(out: Path, policy: Path) -> list[list[int]]:
    """The labels of each tar shard under `out`, in shard order, read through its verified manifest."""
    reader = ShardReader(open_manifest(out / "manifest.json", policy))
    names = [s.name for s in reader.verified.manifest.shards]
    return [[int(t) for t in read_webdataset(reader, n, WebDatasetDecoder(mode="L")).targets] for n in names]


def test_shard_shuffles_by_default_and_records_the_seed(
    tmp_path: Path, image_folder: Path, alice: tuple[Path, Path], trainguard: Run
) -> None:
    """A class-per-folder tree dealt in order fills each shard with 2-4 classes; shuffled (seed 0 unless --seed),
    each shard mixes more, the seed is signed into the manifest, and the same seed deals the same shards."""
    runs = {"seed0": ["--seed", "0"], "again": [], "seed7": ["--seed", "7"], "kept": ["--keep-order"]}
    for name, extra in runs.items():
        done = trainguard(
            "shard", image_folder, "--out", tmp_path / name, "--shard-size", "8", "--key", alice[0],
            "--source", "alice", *extra,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    kept = _shard_labels(tmp_path / "kept", alice[1])
    assert [len(set(labels)) for labels in kept] == [3, 4, 3, 2]  # 3 images a class, 8 a shard, in folder order
    shuffled = _shard_labels(tmp_path / "seed0", alice[1])
    assert sum(len(set(labels)) for labels in shuffled) > 12
    assert sorted(x for labels in shuffled for x in labels) == sorted(x for labels in kept for x in labels)
    assert _shard_labels(tmp_path / "again", alice[1]) == shuffled
    assert _shard_labels(tmp_path / "seed7", alice[1]) != shuffled
    seeds = {name: open_manifest(tmp_path / name / "manifest.json", alice[1]).manifest.shuffle_seed for name in runs}
    assert seeds == {"seed0": 0, "again": 0, "seed7": 7, "kept": None}


def test_reshard_signs_the_next_version(
    tmp_path: Path, image_folder: Path, alice: tuple[Path, Path], trainguard: Run
) -> None:
    """Re-sharding into the same folder replaces the earlier run's shards and signs version 2, which the cycle's
    anti-rollback accepts after version 1."""
    out = tmp_path / "shards"
    for size, version in (("8", 1), ("10", 2), ("30", 3)):
        done = trainguard(
            "shard", image_folder, "--out", out, "--shard-size", size, "--key", alice[0], "--source", "alice",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert f"version {version} ->" in done.stdout
        verified = open_manifest(out / "manifest.json", alice[1])
        assert verified.manifest.version == version
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "manifest.sigstore.json", "part-00000.tar"]
    assert [s.records for s in verified.manifest.shards] == [30]


def test_reshard_refuses_a_folder_another_key_signed_and_leaves_it_alone(
    tmp_path: Path, image_folder: Path, alice: tuple[Path, Path], trainguard: Run
) -> None:
    out = tmp_path / "shards"
    done = trainguard("shard", image_folder, "--out", out, "--key", alice[0], "--source", "alice")
    assert done.returncode == 0, done.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert trainguard("keygen", "--out", tmp_path / "keys" / "bob").returncode == 0
    done = trainguard("shard", image_folder, "--out", out, "--key", tmp_path / "keys" / "bob.key", "--source", "bob")
    assert done.returncode == 2
    assert "is not a manifest signed by --key" in done.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_shard_gives_the_roles_sign_gives(
    tmp_path: Path, image_folder: Path, alice: tuple[Path, Path], trainguard: Run
) -> None:
    out = tmp_path / "shards"
    done = trainguard(
        "shard", image_folder, "--out", out, "--shard-size", "8", "--key", alice[0], "--source", "curator",
        "--role", "trusted", "--roles", '{"part-00003.tar": "holdout"}',
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    shards = open_manifest(out / "manifest.json", alice[1]).manifest.shards
    assert [s.role for s in shards] == ["trusted", "trusted", "trusted", "holdout"]


def _undecodable(root: Path) -> None:
    (root / "3" / "0099.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")


def _stray_file(root: Path) -> None:
    (root / "notes.txt").write_text("hello")


def _nested(root: Path) -> None:
    (root / "3" / "deeper").mkdir()
    (root / "3" / "deeper" / "0099.png").write_bytes(digit_png(0)[0])


@pytest.mark.parametrize(
    ("spoil", "says"),
    [
        (_undecodable, "0099.png: member 3/0099.png is not a decodable"),
        (_stray_file, "notes.txt: expected only image files in <label>/ sub-folders"),
        (_nested, "deeper/0099.png: expected only image files in <label>/ sub-folders"),
    ],
)
def test_an_unusable_images_folder_exits_2_with_one_line(
    tmp_path, image_folder, spoil, says: str, trainguard: Run
) -> None:
    spoil(image_folder)
    done = trainguard("shard", image_folder, "--out", tmp_path / "shards")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert says in done.stderr
    assert not list((tmp_path / "shards").glob("*.tar"))


def test_a_labels_csv_naming_a_path_outside_the_folder_exits_2(
    tmp_path: Path, image_folder: Path, trainguard: Run
) -> None:
    listing = tmp_path / "labels.csv"
    listing.write_text("path,label\n../secret.png,1\n")
    done = trainguard("shard", image_folder, "--labels", listing, "--out", tmp_path / "shards")
    assert done.returncode == 2
    assert "'../secret.png' is not a safe relative image path" in done.stderr


def _outside(tmp_path: Path) -> Path:
    """A folder outside IMAGES holding a secret image."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "0001.png").write_bytes(digit_png(1)[0])
    return secret


@pytest.mark.parametrize(
    ("plant", "listed", "refused"),
    [
        (lambda root, secret: (root / "leak").symlink_to(secret, True), "leak/0001.png", "leak is a symbolic"),
        (
            lambda root, secret: (root / "3" / "x.png").symlink_to(secret / "0001.png"),
            "3/x.png",
            "3/x.png is a symbolic",
        ),
    ],
    ids=["class-folder", "image"],
)
def test_a_labels_csv_through_a_symlink_leading_outside_the_images_folder_exits_2_naming_it(
    tmp_path: Path, image_folder: Path, plant, listed: str, refused: str, trainguard: Run
) -> None:
    plant(image_folder, _outside(tmp_path))
    listing = tmp_path / "labels.csv"
    inside = sorted(p.relative_to(image_folder).as_posix() for p in (image_folder / "0").glob("*.png"))
    listing.write_text("path,label\n" + "".join(f"{r},0\n" for r in inside) + f"{listed},1\n")
    done = trainguard("shard", image_folder, "--labels", listing, "--out", tmp_path / "shards")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"{refused} link, refused (it may lead outside IMAGES)" in done.stderr
    assert not list((tmp_path / "shards").glob("*.tar"))


def test_a_symlinked_class_folder_leading_outside_the_images_folder_exits_2(
    tmp_path: Path, image_folder: Path, trainguard: Run
) -> None:
    (image_folder / "leak").symlink_to(_outside(tmp_path), target_is_directory=True)
    done = trainguard("shard", image_folder, "--out", tmp_path / "shards")
    assert done.returncode == 2
    assert "leak: expected only image files in <label>/ sub-folders (symlink)" in done.stderr
    assert not list((tmp_path / "shards").glob("*.tar"))


def test_a_table_without_the_label_column_exits_2(tmp_path: Path) -> None:
    """As its own process: the `trainguard` console script starts `shard` and ends in one line (the other tests run
    the command in this process, by `cli`)."""
    table = tmp_path / "t.csv"
    table.write_text("a,b\n1,2\n")
    command = [TRAINGUARD, "shard", "--from-csv", str(table), "--label-column", "y", "--out", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip() == f"trainguard: error: --from-csv {table}: no column 'y' (columns: a, b)"


def test_a_non_empty_out_folder_exits_2_and_is_left_alone(tmp_path: Path, image_folder: Path, trainguard: Run) -> None:
    out = tmp_path / "shards"
    out.mkdir()
    (out / "part-00000.tar").write_bytes(b"old")
    done = trainguard("shard", image_folder, "--out", out)
    assert done.returncode == 2
    assert "exists and is not empty" in done.stderr
    assert (out / "part-00000.tar").read_bytes() == b"old"


def test_neither_images_nor_a_table_is_a_usage_error(tmp_path: Path, trainguard: Run) -> None:
    done = trainguard("shard", "--out", tmp_path / "out")
    assert done.returncode == 2
    assert "give either IMAGES" in done.stderr
