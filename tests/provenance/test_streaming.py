"""Streaming shards: each DataLoader worker verifies and decodes its own shards; the main process keeps one exact
read log and gets a worker's refusal as the ShardError it was."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from trainguard.provenance import open_manifest
from trainguard.provenance.errors import ShardError
from trainguard.provenance.streaming import StreamingLoader, StreamingShards

if TYPE_CHECKING:
    from conftest import Keys


def _npz_shards(root: Path, count: int = 6, size: int = 10) -> None:
    root.mkdir()
    rng = np.random.default_rng(0)
    for index in range(count):
        inputs = rng.random((size, 1, 8, 8), dtype=np.float32)
        np.savez(root / f"part-{index}.npz", inputs=inputs, targets=np.full(size, index, np.int64))


@pytest.fixture
def shards(signer: Any, tmp_path: Path, key_pairs: Keys) -> Any:
    root = tmp_path / "arrays"
    _npz_shards(root)
    manifest = signer(root, key_pairs.alice, tmp_path / "arrays.json", sources={}, roles={})
    return open_manifest(manifest, key_pairs.trust("alice"), data_dir=root, state=tmp_path / "state.json")


def test_workers_verify_their_own_shards_and_the_main_process_keeps_one_log(shards: Any, tmp_path: Path) -> None:
    dataset = StreamingShards([shards], journal_dir=tmp_path)
    loader = StreamingLoader(dataset, batch_size=5, num_workers=2)
    targets = torch.cat([y for _, y in loader])
    assert sorted(targets.tolist()) == sorted([i for i in range(6) for _ in range(10)])
    entries = [line for line in dataset.journal.read_text().splitlines()]
    assert len(entries) == 6
    log = dataset.read_log()
    assert sorted(r.name for r in log.records) == [f"part-{i}.npz" for i in range(6)]
    assert {r.manifest_sha256 for r in log.records} == {shards.manifest_sha256}
    pids = {__import__("json").loads(line)["pid"] for line in entries}
    assert os.getpid() not in pids and len(pids) == 2, "the shards were verified inside the two workers"


def test_a_tampered_shard_in_a_worker_surfaces_as_its_shard_error(shards: Any, tmp_path: Path) -> None:
    target = shards.data_dir / "part-3.npz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    loader = StreamingLoader(StreamingShards([shards], journal_dir=tmp_path), batch_size=5, num_workers=2)
    with pytest.raises(ShardError) as refused:
        list(loader)
    assert (refused.value.shard, refused.value.reason) == ("part-3.npz", "digest-mismatch")
    assert "\n" not in str(refused.value)


def test_each_epoch_reshuffles_the_shards_and_a_trainer_fits_on_them(shards: Any, tmp_path: Path) -> None:
    dataset = StreamingShards([shards], journal_dir=tmp_path, seed=1)
    first = dataset.own_shards()
    dataset.set_epoch(1)
    assert sorted(dataset.own_shards()) == sorted(first) and dataset.own_shards() != first

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 6))

        def training_step(self, batch: Any, _: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    trainer.fit(Tiny(), StreamingLoader(dataset, batch_size=8, num_workers=1))
    assert trainer.global_step > 0
    assert len(dataset.read_log().records) == 12, "two epochs, six shards each, every read journalled"
