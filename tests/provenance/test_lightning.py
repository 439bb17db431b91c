"""The torch / Lightning side: a data module over verified manifests and a callback that stops a tampered fit."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

from trainguard.provenance import ProvenanceError, VerificationFailed, VerifiedDataModule, VerifyDatasetCallback
from trainguard.provenance.allowlist import AllowedShard, AllowList
from trainguard.provenance.dataset import RankPartSampler, balanced_owners
from trainguard.provenance.errors import ReadLogMismatchError, ShardError
from trainguard.provenance.formats import Samples
from trainguard.provenance.verify import VerifiedManifest, open_manifest


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)
        self.steps = 0

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        self.steps += 1
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def validation_step(self, batch: Any, _: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.layer(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(**options: Any) -> pl.Trainer:
    settings = {
        "max_epochs": 1,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**(settings | options))


def plain_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.rand(32, 64), torch.randint(0, 10, (32,))), batch_size=16)


def test_data_module_reads_only_selected_shards_and_logs_them(manifest: Path, key_pairs: Any) -> None:
    module = VerifiedDataModule([manifest], key_pairs.trust("alice"), sources=["alice", "curator"], batch_size=32)
    model = Tiny()
    trainer().fit(model, datamodule=module)
    assert model.steps == 2
    assert len(module.train_set) == 240 and len(module.val_set) == 200
    read = [r.name for r in module.read_log.records]
    assert read == ["alice/shard-00.parquet", "alice/shard-01.parquet", "holdout.parquet"]
    assert module.read_log_digest() == hashlib.sha256(module.read_log.to_json_lines()).hexdigest()


def test_data_module_excludes_rejected_shards(manifest: Path, key_pairs: Any) -> None:
    module = VerifiedDataModule(
        [{"manifest": str(manifest)}],
        key_pairs.trust("alice"),
        exclude=["digits:alice/shard-01.parquet"],
        sources=["alice", "bob"],
        val_roles=None,
    )
    module.setup("fit")
    assert [name for _, name in ((d, s.name) for d, s in module.train_set.shards)] == [
        "alice/shard-00.parquet",
        "bob/shard-00.parquet",
    ]
    assert module.train_set.features.dtype == torch.float32 and module.train_set.labels.dtype == torch.int64


def test_callback_stops_the_fit_before_any_training_step(manifest: Path, key_pairs: Any) -> None:
    (manifest.parent / "alice" / "shard-00.parquet").write_bytes(b"poisoned rows")
    model = Tiny()
    callback = VerifyDatasetCallback([manifest], key_pairs.trust("alice"))
    with pytest.raises(VerificationFailed, match=r"alice/shard-00\.parquet: truncated") as caught:
        trainer(callbacks=[callback]).fit(model, plain_loader())
    assert isinstance(caught.value, ProvenanceError)
    assert model.steps == 0


def test_callback_stops_an_untrusted_manifest(manifest: Path, key_pairs: Any) -> None:
    model = Tiny()
    with pytest.raises(VerificationFailed, match="untrusted-signer"):
        trainer(callbacks=[VerifyDatasetCallback([manifest], key_pairs.trust("bob"))]).fit(model, plain_loader())
    assert model.steps == 0


def test_callback_logs_the_manifest_digest_and_signers_through_the_trainers_logger(
    manifest: Path, key_pairs: Any, mlflow_uri: str
) -> None:
    from mlflow import MlflowClient
    from pytorch_lightning.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="provenance-callback", tracking_uri=mlflow_uri)
    callback = VerifyDatasetCallback([manifest], key_pairs.trust("alice"))
    trainer(callbacks=[callback], logger=logger).fit(Tiny(), plain_loader())
    run = MlflowClient(mlflow_uri).get_run(logger.run_id)
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert run.data.params["provenance/digits/manifest_sha256"] == digest
    assert run.data.params["provenance/digits/signers"] == key_pairs.alice.keyid
    assert run.data.metrics["provenance/shards"] == 5
    assert run.data.metrics["provenance/bytes"] == callback.reports[0].bytes_checked > 0


def test_callback_tolerates_only_failures_of_excluded_shards(manifest: Path, key_pairs: Any) -> None:
    (manifest.parent / "bob" / "shard-00.parquet").write_bytes(b"refused earlier")
    excluded = VerifyDatasetCallback([manifest], key_pairs.trust("alice"), exclude=["digits:bob/shard-00.parquet"])
    model = Tiny()
    trainer(callbacks=[excluded]).fit(model, plain_loader())
    assert model.steps == 2
    assert [(f.shard, f.reason) for f in excluded.tolerated] == [("bob/shard-00.parquet", "truncated")]
    (manifest.parent / "raw.bin").write_bytes(b"tampered too")
    again = VerifyDatasetCallback([manifest], key_pairs.trust("alice"), exclude=["bob/shard-00.parquet"])
    with pytest.raises(VerificationFailed, match=r"raw\.bin"):
        trainer(callbacks=[again]).fit(Tiny(), plain_loader())


def _flip_a_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(content))


def _allowed(verified: VerifiedManifest) -> AllowList:
    """What a cycle's intake would allow: every parquet shard of the manifest, as verified."""
    dataset = verified.manifest.dataset
    shards = [s for s in verified.manifest.shards if s.name.endswith(".parquet")]
    return AllowList.of(AllowedShard(verified.manifest_sha256, dataset, s.name, s.sha256) for s in shards)


def test_a_training_shard_changed_after_intake_is_refused_by_name_and_the_fit_goes_on_without_it(
    manifest: Path, key_pairs: Any
) -> None:
    verified = open_manifest(manifest, key_pairs.trust("alice"))
    allow = _allowed(verified)  # the intake's decision, made before the shard changed
    changed = manifest.parent / "alice" / "shard-01.parquet"
    before = torch.from_numpy(pd.read_parquet(changed).drop(columns="label").to_numpy(np.float32))
    _flip_a_byte(changed)
    module = VerifiedDataModule.from_verified([verified], allow, refuse_changed=True, batch_size=32)
    model = Tiny()
    trainer(limit_train_batches=None).fit(model, datamodule=module)

    assert model.steps == 8  # 240 rows of the two unchanged training shards, in batches of 32
    ((refused_shard, reason, detail),) = [(r.shard.name, r.reason, r.detail) for r in module.refused]
    assert (refused_shard, reason) == ("alice/shard-01.parquet", "digest-mismatch")
    assert detail.startswith("shard digits:alice/shard-01.parquet: changed after intake (digest-mismatch): ")
    assert [r.name for r in module.read_log.records] == [
        "alice/shard-00.parquet",
        "bob/shard-00.parquet",
        "holdout.parquet",
    ]
    assert [s.name for _, s in module.train_set.shards] == ["alice/shard-00.parquet", "bob/shard-00.parquet"]
    trained = module.train_set.features
    assert not (trained[:, None, :] == before[None, :, :]).all(-1).any(), "no row of the changed shard is served"
    allow.check_reads(module.read_log, [r.shard for r in module.refused])
    with pytest.raises(ReadLogMismatchError, match=r"alice/shard-01\.parquet is on the allow-list but training never"):
        allow.check_reads(module.read_log)


@pytest.mark.parametrize("role", ["trusted", "holdout"])
def test_a_trusted_or_held_out_shard_changed_after_intake_still_stops_the_fit(
    data_dir: Path, key_pairs: Any, signer: Any, role: str
) -> None:
    name = {"trusted": "alice/shard-00.parquet", "holdout": "holdout.parquet"}[role]
    roles = {"holdout.parquet": "holdout", "alice/shard-00.parquet": "trusted"}
    manifest = signer(data_dir, key_pairs.alice, data_dir / "manifest.json", dataset="digits", roles=roles)
    verified = open_manifest(manifest, key_pairs.trust("alice"))
    allow = _allowed(verified)
    _flip_a_byte(data_dir / name)
    module = VerifiedDataModule.from_verified([verified], allow, refuse_changed=True)
    model = Tiny()
    with pytest.raises(ShardError, match=rf"shard {re.escape(name)}: whole-file sha256 \w+ differs") as stopped:
        trainer().fit(model, datamodule=module)
    assert stopped.value.reason == "digest-mismatch" and model.steps == 0


def _raw_images(name: str, data: bytes) -> Samples:
    """A user's own format: one label byte then 64 pixel bytes per sample, decoded to (N, 1, 8, 8)."""
    rows = np.frombuffer(data, np.uint8).reshape(-1, 65)
    return Samples(rows[:, 1:].reshape(-1, 1, 8, 8).astype(np.float32) / 255.0, rows[:, 0].astype(np.int64))


def _flip(image: torch.Tensor) -> torch.Tensor:
    return image.flip(-1)


class TinyConv(Tiny):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 10))


def test_a_decoder_hook_yields_samples_of_their_own_shape_through_transforms_and_workers(
    signer: Any, tmp_path: Path, key_pairs: Any
) -> None:
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for index in range(3):
        rows = np.concatenate([rng.integers(0, 10, (20, 1)), rng.integers(0, 256, (20, 64))], axis=1)
        (root / f"part-{index}.img").write_bytes(rows.astype(np.uint8).tobytes())
    manifest = signer(root, key_pairs.alice, tmp_path / "images.json", sources={}, roles={})
    module = VerifiedDataModule(
        [{"manifest": str(manifest), "data_dir": str(root)}],
        key_pairs.trust("alice"),
        state_file=tmp_path / "state.json",
        decoders={".img": _raw_images},
        transform=_flip,
        val_roles=None,
        batch_size=8,
        num_workers=2,
    )
    model = TinyConv()
    trainer(limit_train_batches=3).fit(model, datamodule=module)
    assert model.steps == 3
    assert tuple(module.train_set.features.shape) == (60, 1, 8, 8)
    x, _ = module.train_set[0]
    assert torch.equal(x, module.train_set.features[0].flip(-1))
    assert [r.name for r in module.read_log.records] == ["part-0.img", "part-1.img", "part-2.img"]


def test_a_shard_with_no_decoder_is_refused_by_name(signer: Any, tmp_path: Path, key_pairs: Any) -> None:
    root = tmp_path / "blobs"
    root.mkdir()
    (root / "a.bin").write_bytes(b"\x00" * 65)
    manifest = signer(root, key_pairs.alice, tmp_path / "blobs.json", sources={}, roles={})
    module = VerifiedDataModule([{"manifest": str(manifest), "data_dir": str(root)}], key_pairs.trust("alice"))
    with pytest.raises(ShardError, match=r"shard a.bin: no decoder for this format") as refused:
        module.setup("fit")
    assert refused.value.reason == "format"


@given(st.lists(st.integers(0, 10_000), max_size=40), st.integers(1, 8))
def test_balanced_owners_split_every_item_once_and_keep_parts_within_one_item(weights: list[int], parts: int) -> None:
    owners = balanced_owners(weights, parts)
    assert len(owners) == len(weights) and set(owners) <= set(range(parts))
    assert owners == balanced_owners(weights, parts), "every rank computes the same split"
    totals = [sum(w for w, o in zip(weights, owners, strict=True) if o == p) for p in range(parts)]
    assert max(totals) - min(totals) <= max(weights, default=0)


def test_a_rank_part_sampler_pads_its_part_to_the_common_length() -> None:
    sampler = RankPartSampler(list(range(5)), 12, shuffle=True, seed=3)
    indices = list(sampler)
    assert len(indices) == len(sampler) == 12 and set(indices) == set(range(5))
    sampler.set_epoch(1)
    assert list(sampler) != indices


def test_table_targets_keep_their_type_integer_labels_real_values_or_several_columns() -> None:
    """Integer labels stay int64 (classification), a real target column stays float32 (regression), several target
    columns give (N, k) float32 targets (multi-output regression, multi-label 0/1), never features."""
    import pandas as pd

    from trainguard.provenance.dataset import table_samples

    frame = pd.DataFrame({"a": [0.1, 0.2], "b": [0.3, 0.4], "label": [1, 0], "price": [2.5, 3.0], "cat": [1, 0]})
    labels = table_samples("t", frame, ["a", "b"], "label")
    assert labels.targets.dtype == np.int64 and labels.inputs.shape == (2, 2)
    real = table_samples("t", frame[["a", "b", "price"]], None, "price")
    assert real.targets.dtype == np.float32 and real.inputs.shape == (2, 2)
    several = table_samples("t", frame[["a", "b", "price", "cat"]], None, ("price", "cat"))
    assert several.targets.shape == (2, 2) and several.targets.dtype == np.float32 and several.inputs.shape == (2, 2)
    with pytest.raises(ShardError, match=r"no target columns \['dog'\]"):
        table_samples("t", frame, None, ("price", "dog"))
