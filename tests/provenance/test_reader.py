"""Verify-on-read: bytes are read once, hashed, and parsed only if they match; the read log is exact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trainguard.provenance import ShardError, ShardReader, open_manifest
from trainguard.provenance.formats import DecodeBound


def test_reading_untouched_shards_logs_each_read_in_order(manifest: Path, key_pairs: Any) -> None:
    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice")))
    names = ["bob/shard-00.parquet", "alice/shard-00.parquet"]
    frames = dict(reader.frames(names))
    assert list(frames) == names
    assert len(frames["bob/shard-00.parquet"]) == 120
    assert [r.name for r in reader.log.records] == names
    for record in reader.log.records:
        assert record.sha256 == hashlib.sha256((manifest.parent / record.name).read_bytes()).hexdigest()
    lines = reader.log.to_json_lines().decode().splitlines()
    assert [json.loads(line)["name"] for line in lines] == names
    assert reader.log.digest() == hashlib.sha256(reader.log.to_json_lines()).hexdigest()


def test_shard_tampered_after_verification_is_refused_on_read(manifest: Path, key_pairs: Any) -> None:
    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice")))
    shard = manifest.parent / "alice" / "shard-01.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError) as caught:
        reader.read_frame("alice/shard-01.parquet")
    assert (caught.value.reason, caught.value.shard) == ("digest-mismatch", "alice/shard-01.parquet")
    assert reader.log.records == ()


@pytest.mark.parametrize(("name", "reason"), [("not-listed.parquet", "unlisted"), ("manifest.json", "unlisted")])
def test_only_listed_shards_can_be_read(manifest: Path, key_pairs: Any, name: str, reason: str) -> None:
    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice")))
    with pytest.raises(ShardError) as caught:
        reader.read_bytes(name)
    assert caught.value.reason == reason


def test_symlinked_shard_is_refused_on_read(manifest: Path, key_pairs: Any, tmp_path: Path) -> None:
    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice")))
    shard = manifest.parent / "raw.bin"
    (tmp_path / "copy").write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(tmp_path / "copy")
    with pytest.raises(ShardError) as caught:
        reader.read_bytes("raw.bin")
    assert caught.value.reason == "symlink"


def test_large_shards_stream_and_seek_through_signed_chunks(tmp_path: Path, key_pairs: Any, signer: Any) -> None:
    root = tmp_path / "big"
    root.mkdir()
    data = np.random.default_rng(1).bytes(5 * 1024 * 1024 + 123)
    (root / "big.bin").write_bytes(data)
    manifest = signer(root, key_pairs.alice, tmp_path / "m.json", chunk_size=1024 * 1024)
    verified = open_manifest(manifest, key_pairs.trust("alice"), data_dir=root)
    assert len(verified.manifest.shards[0].chunks) == 6
    reader = ShardReader(verified)
    assert b"".join(reader.iter_chunks("big.bin")) == data
    assert reader.read_chunk("big.bin", 5) == data[5 * 1024 * 1024 :]
    tampered = bytearray(data)
    tampered[3 * 1024 * 1024 + 7] ^= 1
    (root / "big.bin").write_bytes(bytes(tampered))
    assert reader.read_chunk("big.bin", 2) == data[2 * 1024 * 1024 : 3 * 1024 * 1024]
    with pytest.raises(ShardError, match="chunk 3"):
        reader.read_chunk("big.bin", 3)
    with pytest.raises(ShardError, match="chunk 3"):
        list(reader.iter_chunks("big.bin"))
    assert len(reader.log.records) == 1


def test_npy_shards_load_without_pickle(tmp_path: Path, key_pairs: Any, signer: Any) -> None:
    root = tmp_path / "arrays"
    root.mkdir()
    np.save(root / "ok.npy", np.arange(12.0).reshape(3, 4))
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    manifest = signer(root, key_pairs.alice, tmp_path / "m.json")
    verified = open_manifest(manifest, key_pairs.trust("alice"), data_dir=root)
    assert {s.name: s.records for s in verified.manifest.shards} == {
        "objects.npy": None,
        "ok.npy": 3,
    }  # object arrays are never counted, never loaded
    reader = ShardReader(verified)
    assert reader.read_array("ok.npy").shape == (3, 4)
    with pytest.raises(ShardError) as caught:
        reader.read_array("objects.npy")
    assert caught.value.reason == "format"


def _resign(manifest: Path, key: Any, change: Any) -> Path:
    """The manifest with every shard entry passed through `change`, signed again by `key`."""
    from dataclasses import replace

    from trainguard.provenance import PAYLOAD_TYPE, sign_envelope, write_manifest
    from trainguard.provenance.manifest import parse_statement, statement_bytes
    from trainguard.provenance.verify import read_envelope

    signed = parse_statement(read_envelope(manifest)[1].payload)
    shards = tuple(change(s) for s in signed.shards)
    return write_manifest(sign_envelope(PAYLOAD_TYPE, statement_bytes(replace(signed, shards=shards)), key), manifest)


def test_a_parquet_shard_with_more_rows_than_its_signed_records_is_refused_before_decoding(
    tmp_path: Path, key_pairs: Any, signer: Any
) -> None:
    from dataclasses import replace

    import pandas as pd

    root = tmp_path / "rows"
    root.mkdir()
    pd.DataFrame({"label": np.zeros(1000, dtype=np.int64)}).to_parquet(root / "s.parquet", index=False)
    manifest = signer(root, key_pairs.alice, tmp_path / "m.json")
    _resign(manifest, key_pairs.alice, lambda s: replace(s, records=10))
    reader = ShardReader(open_manifest(manifest, key_pairs.pub("alice"), data_dir=root))
    with pytest.raises(ShardError, match="1000 rows, signed 10 records") as caught:
        reader.read_frame("s.parquet")
    assert caught.value.reason == "records-mismatch"
    with pytest.raises(ShardError, match="1000 rows, signed 10 records"):
        list(reader.frames(["s.parquet"]))


def test_a_tiny_parquet_shard_that_decodes_to_millions_of_rows_hits_the_decode_limit(
    tmp_path: Path, key_pairs: Any, signer: Any
) -> None:
    import pandas as pd

    root = tmp_path / "bomb"
    root.mkdir()
    pd.DataFrame({"x": np.zeros(3_000_000, dtype=np.int64)}).to_parquet(root / "bomb.parquet", index=False)
    assert (root / "bomb.parquet").stat().st_size < 256 * 1024
    manifest = signer(root, key_pairs.alice, tmp_path / "m.json")
    verified = open_manifest(manifest, key_pairs.pub("alice"), data_dir=root)
    assert verified.manifest.shards[0].records == 3_000_000  # honestly signed: the ratio still refuses it
    with pytest.raises(ShardError, match="over the") as caught:
        ShardReader(verified).read_frame("bomb.parquet")
    assert caught.value.reason == "decode-limit"
    small = ShardReader(verified, bound=DecodeBound(ceiling=1024))
    with pytest.raises(ShardError, match="1024-byte limit"):
        small.read_frame("bomb.parquet")


def test_an_npy_shard_is_checked_by_its_header_before_loading(tmp_path: Path, key_pairs: Any, signer: Any) -> None:
    from dataclasses import replace

    root = tmp_path / "npy"
    root.mkdir()
    np.save(root / "a.npy", np.arange(12.0).reshape(3, 4))
    manifest = signer(root, key_pairs.alice, tmp_path / "m.json")
    _resign(manifest, key_pairs.alice, lambda s: replace(s, records=2))
    reader = ShardReader(open_manifest(manifest, key_pairs.pub("alice"), data_dir=root))
    with pytest.raises(ShardError) as caught:
        reader.read_array("a.npy")
    assert caught.value.reason == "records-mismatch"
    _resign(manifest, key_pairs.alice, lambda s: replace(s, records=3))
    reader = ShardReader(open_manifest(manifest, key_pairs.pub("alice"), data_dir=root), bound=DecodeBound(ceiling=64))
    with pytest.raises(ShardError) as caught:
        reader.read_array("a.npy")
    assert caught.value.reason == "decode-limit"


def test_an_npy_header_claiming_a_huge_shape_is_refused_without_allocating() -> None:
    from trainguard.provenance.reader import parse_array

    header = b"{'descr': '<f8', 'fortran_order': False, 'shape': (1000000000000,), }"
    data = b"\x93NUMPY\x01\x00" + len(header.ljust(118)).to_bytes(2, "little") + header.ljust(117) + b"\n"
    with pytest.raises(ShardError) as caught:
        parse_array("huge.npy", data)
    assert caught.value.reason == "decode-limit"


def test_streamed_chunks_must_add_up_to_the_signed_subject_digest(tmp_path: Path, key_pairs: Any, signer: Any) -> None:
    import hashlib
    from dataclasses import replace

    root = tmp_path / "big"
    root.mkdir()
    data, other = np.random.default_rng(2).bytes(3 * 1024), np.random.default_rng(3).bytes(3 * 1024)
    (root / "big.bin").write_bytes(data)
    manifest = signer(root, key_pairs.alice, tmp_path / "m.json", chunk_size=1024)
    chunks = tuple(hashlib.sha256(other[i : i + 1024]).hexdigest() for i in range(0, len(other), 1024))
    _resign(manifest, key_pairs.alice, lambda s: replace(s, chunks=chunks))  # chunk digests of other bytes
    (root / "big.bin").write_bytes(other)
    reader = ShardReader(open_manifest(manifest, key_pairs.pub("alice"), data_dir=root))
    with pytest.raises(ShardError, match="whole-file sha256") as caught:
        list(reader.iter_chunks("big.bin"))
    assert caught.value.reason == "digest-mismatch" and reader.log.records == ()


def _png_digits(root: Path, count: int) -> np.ndarray:
    """`count` digits as PNG shards img-NNN.png and their labels as labels.npy; returns the labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    root.mkdir()
    for index in range(count):
        Image.fromarray((bunch.images[index] * 255 / 16).astype(np.uint8), "L").save(root / f"img-{index:03d}.png")
    np.save(root / "labels.npy", bunch.target[:count].astype(np.int64))
    return bunch.target[:count]


def test_a_users_own_dataset_reads_verified_file_objects_and_trains(
    tmp_path: Path, key_pairs: Any, signer: Any
) -> None:
    import pytorch_lightning as pl
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    class PngDigits(Dataset):
        """A user's Dataset written against files; it gets them from the reader, verified."""

        def __init__(self, reader: ShardReader, count: int) -> None:
            self.reader, self.count = reader, count
            self.labels = np.load(reader.open("labels.npy"))

        def __len__(self) -> int:
            return self.count

        def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
            with Image.open(self.reader.open(f"img-{index:03d}.png")) as image:
                pixels = np.asarray(image, dtype=np.float32) / 255
            return torch.from_numpy(pixels).flatten(), int(self.labels[index])

    class Linear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(64, 10)

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    root = tmp_path / "pngs"
    labels = _png_digits(root, 32)
    reader = ShardReader(
        open_manifest(signer(root, key_pairs.alice, tmp_path / "m.json"), key_pairs.trust("alice"), data_dir=root)
    )
    dataset = PngDigits(reader, 32)
    assert [int(dataset[i][1]) for i in range(32)] == labels.tolist()
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(Linear(), DataLoader(dataset, batch_size=8))
    assert trainer.global_step == 4
    read = [r.name for r in reader.log.records]
    assert read.count("img-005.png") == 2 and read[0] == "labels.npy"  # every open is a verified, logged read
    tampered = bytearray((root / "img-005.png").read_bytes())
    tampered[-20] ^= 0xFF
    (root / "img-005.png").write_bytes(bytes(tampered))
    with pytest.raises(ShardError) as caught:
        dataset[5]
    assert (caught.value.reason, caught.value.shard) == ("digest-mismatch", "img-005.png")


def test_a_verified_file_object_reads_and_seeks_but_never_writes(manifest: Path, key_pairs: Any) -> None:
    import io

    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice")))
    data = (manifest.parent / "raw.bin").read_bytes()
    with reader.open("raw.bin") as stream:
        assert stream.name == "raw.bin" and stream.readable() and stream.seekable() and not stream.writable()
        assert stream.read(10) == data[:10]
        stream.seek(-5, io.SEEK_END)
        assert stream.read() == data[-5:]
        for attempt in (lambda: stream.write(b"x"), lambda: stream.truncate(0), stream.getbuffer):
            with pytest.raises(io.UnsupportedOperation):
                attempt()
        stream.seek(0)
        assert stream.read() == data


def test_a_users_decoder_wins_for_its_suffix_and_its_samples_are_checked_against_signed_records(
    tmp_path: Path, key_pairs: Any, signer: Any
) -> None:
    import io

    from trainguard.provenance.formats import Samples, decoder_for, default_decoders

    def every_other_row(name: str, data: bytes) -> Samples:
        table = np.load(io.BytesIO(data), allow_pickle=False)[::2]
        return Samples(table[:, :-1], table[:, -1])

    def whole(name: str, data: bytes) -> Samples:
        table = np.load(io.BytesIO(data), allow_pickle=False)
        return Samples(table[:, :-1], table[:, -1])

    root = tmp_path / "arrays"
    root.mkdir()
    np.save(root / "t.npy", np.arange(12.0).reshape(3, 4))
    reader = ShardReader(
        open_manifest(signer(root, key_pairs.alice, tmp_path / "m.json"), key_pairs.pub("alice"), data_dir=root)
    )
    decoders = default_decoders({".npy": whole})
    assert decoder_for("t.npy", decoders) is whole and ".npz" in decoders
    assert reader.read_samples("t.npy", decoders).inputs.shape == (3, 3)
    with pytest.raises(ShardError, match="2 rows, signed 3 records") as caught:
        reader.read_samples("t.npy", every_other_row)
    assert caught.value.reason == "records-mismatch"


@pytest.mark.parametrize(
    ("decoder", "message"),
    [
        (lambda name, data: 1 / 0, "decoder <lambda> failed: ZeroDivisionError"),
        (lambda name, data: (np.zeros(3), np.zeros(3)), "returned tuple, not Samples"),
    ],
)
def test_a_users_decoder_that_fails_fails_closed_naming_the_shard(
    manifest: Path, key_pairs: Any, decoder: Any, message: str
) -> None:
    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice")))
    with pytest.raises(ShardError, match=message) as caught:
        reader.read_samples("raw.bin", decoder)
    assert (caught.value.reason, caught.value.shard) == ("format", "raw.bin")


def _garbage(parquet: bytes) -> bytes:
    return bytes(range(256)) * (len(parquet) // 256 + 1)


def _broken_pages(parquet: bytes) -> bytes:
    """The parquet with its first page header overwritten: the footer still reads, the pages raise pyarrow's
    OSError ("Couldn't deserialize thrift")."""
    return parquet[:4] + b"\xff" * 24 + parquet[28:]


@pytest.mark.parametrize("spoil", [_garbage, _broken_pages])
def test_a_signed_parquet_that_does_not_decode_is_refused_by_name_on_every_read_path(
    tmp_path: Path, key_pairs: Any, signer: Any, spoil: Any
) -> None:
    import io

    import pandas as pd

    from trainguard.provenance.dataset import ShardDataset
    from trainguard.provenance.formats import default_decoders

    buffer = io.BytesIO()
    pd.DataFrame({"x": np.arange(50, dtype=np.float32), "label": np.arange(50)}).to_parquet(buffer, index=False)
    root = tmp_path / "data"
    root.mkdir()
    (root / "s.parquet").write_bytes(spoil(buffer.getvalue()))
    reader = ShardReader(
        open_manifest(signer(root, key_pairs.alice, tmp_path / "m.json"), key_pairs.trust("alice"), data_dir=root)
    )
    for read in (
        lambda: reader.read_frame("s.parquet"),
        lambda: list(reader.frames(["s.parquet"])),
        lambda: reader.read_samples("s.parquet", default_decoders()),
        lambda: ShardDataset([reader], roles=None),
    ):
        with pytest.raises(ShardError) as caught:
            read()
        assert (caught.value.reason, caught.value.shard) == ("format", "s.parquet")
        assert str(caught.value).startswith("shard s.parquet: ") and "\n" not in str(caught.value)


def test_a_users_decoder_is_held_to_the_decode_ratio_of_the_shards_signed_size(manifest: Path, key_pairs: Any) -> None:
    from trainguard.provenance.formats import Samples

    def inflate(name: str, data: bytes) -> Samples:
        return Samples(np.zeros((len(data), 256), np.uint8), np.zeros(len(data), np.uint8))

    reader = ShardReader(open_manifest(manifest, key_pairs.trust("alice")))
    with pytest.raises(ShardError, match=f"over the {256 * 3000}-byte limit") as caught:
        reader.read_samples("raw.bin", inflate)
    assert (caught.value.reason, caught.value.shard) == ("decode-limit", "raw.bin")
    generous = ShardReader(reader.verified, bound=DecodeBound(ratio=300))
    assert len(generous.read_samples("raw.bin", inflate)) == 3000


@given(ratio=st.floats(0.01, 10_000), ceiling=st.integers(1, 2**40), size=st.integers(0, 2**40))
def test_the_decode_bound_is_the_smaller_of_ratio_times_size_and_the_ceiling(
    ratio: float, ceiling: int, size: int
) -> None:
    limit = DecodeBound(ratio, ceiling).limit(size)
    assert 0 <= limit <= ceiling and limit <= ratio * max(size, 1)
    assert limit in (ceiling, int(ratio * max(size, 1)))
    with pytest.raises(ValueError, match="positive"):
        DecodeBound(ratio, 0)
