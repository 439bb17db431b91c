"""The intake's validation for each task (class labels for classification, declared target columns, shape and range
for regression and multilabel tables, real targets kept real), shard identity by signer, and source caps that
neither a minted source name nor a large trusted base can game."""

from __future__ import annotations

import numpy as np
import pandas as pd

from trainguard.pipeline.config import TargetsSection, ValidationSection
from trainguard.pipeline.intake import SignedShard, cap_sources, feature_columns, validate
from trainguard.provenance.dataset import table_samples
from trainguard.provenance.keys import generate_signing_key
from trainguard.provenance.policy import KeySet

MULTILABEL = ValidationSection(target_columns=("cat", "dog"), targets=TargetsSection(shape=(2,), min=0, max=1))


def _shard(
    name: str, source: str, frame: pd.DataFrame, section: ValidationSection, key_set: str = "owner", role: str = "train"
) -> SignedShard:
    samples = table_samples(name, frame, feature_columns(frame, section), section.table_targets)
    return SignedShard(name, "0" * 64, source, role, "d", "1" * 64, samples, frame, key_set)


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
    assert [d.shard for d in refused] == ["owner/d:bad"] and "cat" in refused[0].reason


def test_a_regression_table_keeps_its_real_target_and_is_not_checked_for_labels() -> None:
    section = ValidationSection(label_column="dog", targets=TargetsSection(min=0.0, max=2.0))
    shard = _shard("s", "alice", _frame(0, [0.5, 0.25]).drop(columns="cat"), section)
    assert shard.samples.targets.dtype == np.float32 and shard.samples.targets.shape == (2,)
    kept, refused = validate([shard], section)
    assert [s.name for s in kept] == ["s"] and refused == []


def test_a_namesake_shard_of_another_key_set_gets_its_own_verdict() -> None:
    section = ValidationSection(label_column="dog", targets=TargetsSection(min=0.0, max=2.0))
    frame = _frame(0, [0.5, 0.25]).drop(columns="cat")
    honest = _shard("s", "alice", frame, section, key_set="owner")
    out_of_range = _shard("s", "mallory", frame.assign(dog=np.float32(9.0)), section, key_set="other")
    kept, refused = validate([honest, out_of_range], section)
    assert [s.key for s in kept] == ["owner/d:s"] and [d.shard for d in refused] == ["other/d:s"]


def test_a_pattern_grant_makes_its_key_set_one_source_however_many_names_it_mints() -> None:
    keys = (generate_signing_key("ed25519").public,)
    wildcard = KeySet(keys, name="dave-key", sources=("*",))
    named = KeySet(keys, name="owner", sources=("alice", "bob"))
    assert {wildcard.attributed_source(f"dave-{i:02d}") for i in range(15)} == {"dave-key/*"}
    assert named.attributed_source("alice") == "alice"

    section = ValidationSection(label_column="dog", targets=TargetsSection(min=0.0, max=2.0))
    frame = _frame(0, [0.5] * 10).drop(columns="cat")
    honest = [_shard(f"h{i}", name, frame, section) for i, name in enumerate(["alice", "bob", "carol"])]
    minted = [_shard(f"m{i}", wildcard.attributed_source(f"dave-{i:02d}"), frame, section) for i in range(15)]
    kept, refused = cap_sources([*honest, *minted], max_fraction=0.3)
    assert sum(len(s.samples) for s in kept if s.source == "dave-key/*") <= 0.3 * sum(len(s.samples) for s in kept)
    assert {d.source for d in refused} == {"dave-key/*"}


def test_the_trusted_base_is_never_capped() -> None:
    section = ValidationSection(label_column="dog", targets=TargetsSection(min=0.0, max=2.0))
    frame = _frame(0, [0.5] * 10).drop(columns="cat")
    base = [_shard(f"t{i}", "curator", frame, section, role="trusted") for i in range(8)]
    contributions = [_shard("c0", "alice", frame, section), _shard("c1", "bob", frame, section)]
    kept, refused = cap_sources([*base, *contributions], max_fraction=0.2)
    assert refused == [] and len(kept) == 10
