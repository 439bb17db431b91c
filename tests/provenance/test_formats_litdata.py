"""LitData optimized datasets read through trainguard: signed like any folder, index and chunks verified as litdata
fetches them (in DataLoader workers too), refusals as ShardErrors naming the chunk, items decoded into Samples."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import litdata
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litdata.streaming.reader import PrepareChunksThread
from PIL import Image

from trainguard.provenance import reader as reader_module
from trainguard.provenance import sign_dataset, write_manifest
from trainguard.provenance.errors import ShardError
from trainguard.provenance.formats import DecodeBound
from trainguard.provenance.formats.litdata import (
    VerifiedSource,
    VerifiedStreamingDataLoader,
    VerifiedStreamingDataset,
    check_index,
    decode_litdata_items,
    iter_samples,
)
from trainguard.provenance.manifest import DEFAULT_CHUNK_SIZE
from trainguard.provenance.reader import ShardReader
from trainguard.provenance.verify import VerifiedManifest, open_manifest, verify_dataset

ITEMS = 300


@cache
def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (bunch.images * 15).astype(np.uint8), bunch.target


def digit(index: int) -> dict[str, object]:
    """One optimized item: a digits image as an array (1, 8, 8) and as a PIL image, its label and its position."""
    images, labels = digits()
    image = images[index]
    return {"image": image[np.newaxis], "pil": Image.fromarray(image), "label": int(labels[index]), "index": index}


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 digits optimized by litdata into several chunks of about 12 kB.

    litdata's worker is forked (a spawned one imports this module again: several CPU s), and the process-wide start
    method that `optimize` sets (`force=True`) is put back: left at litdata's `spawn`, every later DataLoader in this
    process (other test files' too) would spawn its workers, unless it names its start method."""
    out = tmp_path_factory.mktemp("optimized") / "digits"
    digits()  # loaded here once: the forked worker finds them, and so do the tests that build items themselves
    before = multiprocessing.get_start_method(allow_none=True)
    try:
        litdata.optimize(
            fn=digit, inputs=list(range(ITEMS)), output_dir=str(out), chunk_bytes=12_000, num_workers=1,
            start_method="fork",
        )  # fmt: skip
    finally:
        multiprocessing.set_start_method(before, force=True)
    return out


@pytest.fixture
def data(optimized: Path, tmp_path: Path) -> Path:
    """A copy of the optimized dataset under `train/` in a data dir (each test may tamper with its own)."""
    root = tmp_path / "data"
    shutil.copytree(optimized, root / "train")
    return root


def signed(
    data: Path, key_pairs: object, tmp_path: Path, *exclude: Path, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> VerifiedManifest:
    envelope, _ = sign_dataset(
        data, key_pairs.alice, dataset="digits", source="alice", exclude=exclude, chunk_size=chunk_size
    )
    path = write_manifest(envelope, tmp_path / "digits.manifest.json")
    return open_manifest(path, key_pairs.trust("alice"), data_dir=data, state=tmp_path / "state.json")


def without_pil(item: dict[str, object]) -> dict[str, object]:
    """Drops the PIL field, which torch's default collate cannot batch."""
    return {key: value for key, value in item.items() if key != "pil"}


def chunk_names(data: Path) -> list[str]:
    index = json.loads((data / "train" / "index.json").read_text())
    return [f"train/{chunk['filename']}" for chunk in index["chunks"]]


def flip_a_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))


def test_an_optimized_dataset_signs_like_any_folder(data: Path, key_pairs: object, tmp_path: Path) -> None:
    envelope, manifest = sign_dataset(data, key_pairs.alice, dataset="digits", source="alice")
    path = write_manifest(envelope, tmp_path / "digits.manifest.json")

    assert {s.name for s in manifest.shards} == {"train/index.json", *chunk_names(data)}
    assert len(chunk_names(data)) >= 3
    report = verify_dataset(path, key_pairs.trust("alice"), data_dir=data, state=tmp_path / "state.json")
    assert report.ok, report.failures


def test_every_item_reads_back_and_each_chunk_is_verified_once(data: Path, key_pairs: object, tmp_path: Path) -> None:
    verified = signed(data, key_pairs, tmp_path)
    dataset = VerifiedStreamingDataset(verified, "train", cache_dir=tmp_path)

    items = list(dataset)

    plain = list(litdata.StreamingDataset(str(data / "train")))
    assert [item["index"] for item in items] == [item["index"] for item in plain] == list(range(ITEMS))
    assert all(np.array_equal(a["image"], b["image"]) for a, b in zip(items, plain, strict=True))
    signed_digests = {s.name: s.sha256 for s in verified.manifest.shards}
    reads = dataset.read_log().records
    assert sorted(r.name for r in reads) == sorted(["train/index.json", *chunk_names(data)])
    assert all(r.sha256 == signed_digests[r.name] for r in reads)
    assert all(r.manifest_sha256 == verified.manifest_sha256 for r in reads)


def test_litdata_reads_only_the_verified_copies_in_a_private_cache(
    data: Path, key_pairs: object, tmp_path: Path
) -> None:
    verified = signed(data, key_pairs, tmp_path)
    dataset = VerifiedStreamingDataset(verified, "train", cache_dir=tmp_path / "cache", max_cache_size="100GB")
    list(dataset)

    cache = Path(dataset.input_dir.path)
    assert cache.is_relative_to(tmp_path / "cache") and not cache.is_relative_to(data)
    assert dataset.posix_fast is None
    assert os.stat(cache.parent).st_mode & 0o077 == 0
    signed_digests = {s.name: s.sha256 for s in verified.manifest.shards}
    for name in ["train/index.json", *chunk_names(data)]:
        copy = cache / Path(name).name
        assert copy.read_bytes() == (data / name).read_bytes(), name
    assert {r.sha256 for r in dataset.read_log().records} <= set(signed_digests.values())


def test_a_tampered_chunk_stops_iteration_before_any_of_its_items(
    data: Path, key_pairs: object, tmp_path: Path
) -> None:
    verified = signed(data, key_pairs, tmp_path)
    first, second = chunk_names(data)[:2]
    flip_a_byte(data / second)
    first_chunk_items = json.loads((data / "train/index.json").read_text())["chunks"][0]["chunk_size"]
    dataset = VerifiedStreamingDataset(verified, "train", cache_dir=tmp_path)

    yielded = []
    with pytest.raises(ShardError) as refused:
        for item in dataset:
            yielded.append(item["index"])

    assert refused.value.reason == "digest-mismatch"
    assert refused.value.shard == second
    assert second in str(refused.value) and "\n" not in str(refused.value)
    assert all(index < first_chunk_items for index in yielded)
    assert second not in {r.name for r in dataset.read_log().records}
    assert dataset.refusal().shard == second
    assert first in {r.name for r in dataset.read_log().records} or not yielded


@pytest.mark.parametrize(
    ("block", "chunk_size"), [(7, DEFAULT_CHUNK_SIZE), (1 << 20, DEFAULT_CHUNK_SIZE), (4096, 1000)]
)
def test_a_chunk_is_copied_in_one_pass_and_logged_once_its_whole_digest_matches(
    data: Path, key_pairs: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int, chunk_size: int
) -> None:
    monkeypatch.setattr(reader_module, "COPY_BLOCK", block)
    verified = signed(data, key_pairs, tmp_path, chunk_size=chunk_size)  # 1000: the chunks have chunk digests too
    reader = ShardReader(verified)
    name = chunk_names(data)[0]

    reader.copy_to(name, str(tmp_path / "copy"))

    assert (tmp_path / "copy").read_bytes() == (data / name).read_bytes()
    assert [(r.name, r.sha256) for r in reader.log.records] == [(name, reader.entry(name).sha256)]


def test_a_chunk_changed_after_signing_is_refused_and_never_logged(
    data: Path, key_pairs: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reader_module, "COPY_BLOCK", 1000)
    verified = signed(data, key_pairs, tmp_path)
    flipped, grown, cut = chunk_names(data)[:3]
    flip_a_byte(data / flipped)
    with (data / grown).open("ab") as stream:
        stream.write(b"x")
    os.truncate(data / cut, (data / cut).stat().st_size - 1)
    reader = ShardReader(verified)

    for name, reason in [(flipped, "digest-mismatch"), (grown, "appended"), (cut, "truncated")]:
        with pytest.raises(ShardError) as refused:
            reader.copy_to(name, str(tmp_path / Path(name).name))
        assert (refused.value.shard, refused.value.reason) == (name, reason)

    assert reader.log.records == ()


def test_verified_chunks_are_prefetched_one_at_a_time_and_other_datasets_keep_litdata_scheduling(
    data: Path, key_pairs: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LITDATA_ASYNC_CHUNK_PREFETCH", raising=False)
    dataset = VerifiedStreamingDataset(signed(data, key_pairs, tmp_path), "train", cache_dir=tmp_path)

    seen = []
    for item in dataset:
        if not seen:
            seen.append(dataset.cache._reader._prepare_thread._async_prefetch())
        seen.append(item["index"])

    assert seen == [False, *range(ITEMS)]
    chunks = [{"chunk_bytes": 1 << 26}] * 4
    s3 = SimpleNamespace(_config=SimpleNamespace(_downloader=object(), _remote_dir="s3://bucket/data", _chunks=chunks))
    assert PrepareChunksThread._async_prefetch(s3) is True


def test_a_tampered_index_is_refused_before_any_chunk_is_read(data: Path, key_pairs: object, tmp_path: Path) -> None:
    verified = signed(data, key_pairs, tmp_path)
    path = data / "train" / "index.json"
    index = json.loads(path.read_text())
    index["chunks"][0]["chunk_size"] -= 1  # hides the chunk's last item
    path.write_text(json.dumps(index))

    with pytest.raises(ShardError) as refused:
        VerifiedStreamingDataset(verified, "train", cache_dir=tmp_path)

    assert (refused.value.shard, refused.value.reason) == ("train/index.json", "digest-mismatch")


def test_an_index_naming_a_chunk_the_manifest_does_not_list_is_refused(
    data: Path, key_pairs: object, tmp_path: Path
) -> None:
    unlisted = chunk_names(data)[-1]
    verified = signed(data, key_pairs, tmp_path, data / unlisted)

    with pytest.raises(ShardError) as refused:
        VerifiedStreamingDataset(verified, "train", cache_dir=tmp_path)

    assert (refused.value.shard, refused.value.reason) == (unlisted, "unlisted")
    assert "train/index.json" in str(refused.value)


def index_with(data: Path, **config: object) -> bytes:
    index = json.loads((data / "train" / "index.json").read_text())
    index["config"].update(config)
    return json.dumps(index).encode()


def test_items_litdata_would_unpickle_are_refused(data: Path, key_pairs: object, tmp_path: Path) -> None:
    source = VerifiedSource(signed(data, key_pairs, tmp_path), "train", tmp_path / "journal")

    with pytest.raises(ShardError) as refused:
        check_index(source, index_with(data, data_format=["numpy", "pickle", "int"]))

    assert (refused.value.shard, refused.value.reason) == ("train/index.json", "format")
    assert "pickle" in str(refused.value)


def test_an_index_giving_a_chunk_another_size_than_signed_is_refused(
    data: Path, key_pairs: object, tmp_path: Path
) -> None:
    source = VerifiedSource(signed(data, key_pairs, tmp_path), "train", tmp_path / "journal")
    index = json.loads((data / "train" / "index.json").read_text())
    index["chunks"][1]["chunk_bytes"] += 1

    with pytest.raises(ShardError) as refused:
        check_index(source, json.dumps(index).encode())

    assert (refused.value.shard, refused.value.reason) == (chunk_names(data)[1], "format")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.one_of(st.binary(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["config", "chunks", "data_format", "filename", "chunk_bytes", "compression"]), inner,
        max_size=4),
    max_leaves=12).map(lambda value: json.dumps(value).encode())))  # fmt: skip
def test_any_index_is_accepted_or_refused_as_a_shard_error(
    data: Path, key_pairs: object, tmp_path: Path, document: bytes
) -> None:
    source = VerifiedSource(signed_once(data, key_pairs, tmp_path), "train", tmp_path / "journal")
    try:
        check_index(source, document)
    except ShardError as error:
        assert error.reason in {"format", "unlisted", "unsafe-path", "duplicate-name"}
        assert "\n" not in str(error)


_SIGNED: dict[Path, VerifiedManifest] = {}


def signed_once(data: Path, key_pairs: object, tmp_path: Path) -> VerifiedManifest:
    if data not in _SIGNED:
        _SIGNED[data] = signed(data, key_pairs, tmp_path)
    return _SIGNED[data]


def test_dataloader_workers_verify_the_chunks_and_the_main_process_collects_their_reads(
    data: Path, key_pairs: object, tmp_path: Path
) -> None:
    """Forked workers (Linux's default), each building its own reader; spawned ones: the next test."""
    verified = signed(data, key_pairs, tmp_path)
    dataset = VerifiedStreamingDataset(verified, "train", cache_dir=tmp_path, transform=without_pil)
    loader = VerifiedStreamingDataLoader(dataset, batch_size=32, num_workers=2, multiprocessing_context="fork")

    indexes = sorted(int(i) for batch in loader for i in batch["index"])

    assert indexes == list(range(ITEMS))
    readers = dataset.readers()
    assert sorted(readers) == sorted(["train/index.json", *chunk_names(data)])
    assert readers["train/index.json"] == {os.getpid()}
    chunk_readers = set().union(*(readers[name] for name in chunk_names(data)))
    assert os.getpid() not in chunk_readers and len(chunk_readers) == 2


def test_a_tampered_chunk_in_a_worker_surfaces_as_its_shard_error(
    data: Path, key_pairs: object, tmp_path: Path
) -> None:
    """A spawned worker (the dataset crosses pickled, its downloader rebuilt without a reader); one is enough: it
    reads every chunk, the tampered one among them, and each spawned worker imports this module again."""
    verified = signed(data, key_pairs, tmp_path)
    tampered = chunk_names(data)[2]
    flip_a_byte(data / tampered)
    loader = VerifiedStreamingDataLoader(
        VerifiedStreamingDataset(verified, "train", cache_dir=tmp_path, transform=without_pil),
        batch_size=32,
        num_workers=1,
        multiprocessing_context="spawn",
    )

    with pytest.raises(ShardError) as refused:
        for _ in loader:
            pass

    assert (refused.value.shard, refused.value.reason) == (tampered, "digest-mismatch")
    assert "\n" not in str(refused.value)


def test_items_decode_into_samples_that_keep_their_shape(data: Path, key_pairs: object, tmp_path: Path) -> None:
    dataset = VerifiedStreamingDataset(signed(data, key_pairs, tmp_path), "train", cache_dir=tmp_path)

    batches = list(iter_samples(dataset, 128))
    from_pil = decode_litdata_items("digits", [digit(i) for i in range(5)], inputs="pil")

    assert [len(b) for b in batches] == [128, 128, ITEMS - 256]
    assert batches[0].inputs.shape == (128, 1, 8, 8) and batches[0].inputs.dtype == np.uint8
    assert np.array_equal(np.concatenate([b.targets for b in batches]), digits()[1][:ITEMS])
    assert from_pil.inputs.shape == (5, 1, 8, 8)
    assert np.array_equal(from_pil.inputs, batches[0].inputs[:5])


def test_items_without_the_named_fields_are_refused_naming_them() -> None:
    with pytest.raises(ShardError) as refused:
        decode_litdata_items("digits/train", [{"image": np.zeros((1, 8, 8)), "target": 3}])

    assert (refused.value.shard, refused.value.reason) == ("digits/train", "format")
    assert "'label'" in str(refused.value) and "target" in str(refused.value)


def test_items_of_different_shapes_are_refused() -> None:
    items = [{"image": np.zeros((1, 8, 8)), "label": 0}, {"image": np.zeros((1, 9, 9)), "label": 1}]

    with pytest.raises(ShardError) as refused:
        decode_litdata_items("digits/train", items)

    assert refused.value.reason == "format"


def as_example(item: dict[str, object]) -> tuple[torch.Tensor, int]:
    """An item as (pixels scaled to [0, 1], flattened; label) for a linear model."""
    return torch.as_tensor(item["image"], dtype=torch.float32).flatten() / 240, item["label"]


def test_a_lightning_trainer_fits_on_a_verified_litdata_loader(data: Path, key_pairs: object, tmp_path: Path) -> None:
    # Lightning is imported here, not by the module: a spawned DataLoader worker imports this module again.
    import pytorch_lightning as pl

    class Linear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(64, 10)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.5)

    verified = signed(data, key_pairs, tmp_path)
    dataset = VerifiedStreamingDataset(verified, "train", cache_dir=tmp_path, transform=as_example)
    model = Linear()
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip

    trainer.fit(model, VerifiedStreamingDataLoader(dataset, batch_size=50, num_workers=1, persistent_workers=True))

    assert trainer.state.finished and trainer.global_step == 3 * ITEMS // 50
    chunks_read = [r.name for r in dataset.read_log().records if r.name != "train/index.json"]
    assert sorted(set(chunks_read)) == sorted(chunk_names(data))


def test_a_signed_chunk_whose_items_do_not_decode_is_refused_naming_the_dataset(
    data: Path, key_pairs: object, tmp_path: Path
) -> None:
    first = data / chunk_names(data)[0]
    content = bytearray(first.read_bytes())
    items_start = 4 + 4 * (int.from_bytes(content[:4], "little") + 1)  # after the item count and offsets
    content[items_start:] = b"\xff" * (len(content) - items_start)
    first.write_bytes(bytes(content))
    dataset = VerifiedStreamingDataset(signed(data, key_pairs, tmp_path), "train", cache_dir=tmp_path)

    with pytest.raises(ShardError) as refused:
        list(dataset)

    assert (refused.value.shard, refused.value.reason) == ("digits/train", "format")
    assert "litdata decoding failed" in str(refused.value) and "\n" not in str(refused.value)
    assert dataset.refusal().reason == "format"


def test_an_item_decoding_past_the_decode_bound_of_its_chunk_is_refused(
    data: Path, key_pairs: object, tmp_path: Path
) -> None:
    verified = signed(data, key_pairs, tmp_path)
    largest = max(s.size for s in verified.manifest.shards if s.name.endswith(".bin"))
    tight = DecodeBound(ratio=100 / largest)  # an item may decode to 100 bytes; each holds two 64-pixel images
    dataset = VerifiedStreamingDataset(verified, "train", cache_dir=tmp_path, bound=tight)

    with pytest.raises(ShardError) as refused:
        next(iter(dataset))

    assert (refused.value.shard, refused.value.reason) == ("digits/train", "decode-limit")
    assert f"at an item, over the {tight.limit(largest)}-byte limit" in str(refused.value)
    assert len(list(VerifiedStreamingDataset(verified, "train", cache_dir=tmp_path))) == ITEMS
