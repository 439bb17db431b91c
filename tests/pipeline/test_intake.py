"""The intake's validation for each task: class labels for classification, declared target columns, shape and range
for regression and multilabel tables, and real targets kept real."""

from __future__ import annotations

import numpy as np
import pandas as pd

from trainguard.pipeline.config import TargetsSection, ValidationSection
from trainguard.pipeline.intake import SignedShard, feature_columns, validate
from trainguard.provenance.dataset import table_samples

MULTILABEL = ValidationSection(target_columns=("cat", "dog"), targets=TargetsSection(shape=(2,), min=0, max=1))


def _shard(name: str, source: str, frame: pd.DataFrame, section: ValidationSection) -> SignedShard:
    samples = table_samples(name, frame, feature_columns(frame, section), section.table_targets)
    return SignedShard(name, "0" * 64, source, "train", "d", "1" * 64, samples, frame)


def _frame(seed: int, cat: list[float]) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    features = pd.DataFrame(rng.random((len(cat), 3)).astype(np.float32), columns=["a", "b", "c"])
    return features.assign(cat=np.array(cat, np.float32), dog=np.float32(1.0))


def test_multilabel_tables_keep_their_label_vectors_and_refuse_values_outside_the_range() -> None:
    good = _shard("good", "alice", _frame(0, [0.0, 1.0, 1.0]), MULTILABEL)
    assert feature_columns(good.frame, MULTILABEL) == ["a", "b", "c"]
    assert good.samples.targets.shape == (3, 2) and good.samples.targets.dtype == np.float32
    bad = _shard("bad", "bob", _frame(1, [0.0, 2.0, 1.0]), MULTILABEL)
    kept, refused = validate([good, bad], MULTILABEL)
    assert [s.name for s in kept] == ["good"]
    assert [d.shard for d in refused] == ["d:bad"] and "cat" in refused[0].reason


def test_a_regression_table_keeps_its_real_target_and_is_not_checked_for_labels() -> None:
    section = ValidationSection(label_column="dog", targets=TargetsSection(min=0.0, max=2.0))
    shard = _shard("s", "alice", _frame(0, [0.5, 0.25]).drop(columns="cat"), section)
    assert shard.samples.targets.dtype == np.float32 and shard.samples.targets.shape == (2,)
    kept, refused = validate([shard], section)
    assert [s.name for s in kept] == ["s"] and refused == []
