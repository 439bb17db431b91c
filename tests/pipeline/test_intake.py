"""The intake's validation for each task (class labels for classification, declared target columns, shape and range
for regression and multilabel tables, real targets kept real), shard identity by signer, and source caps that
neither a minted source name nor a large trusted base can game."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from trainguard.pipeline.config import LimitsSection, TargetsSection, ValidationSection, load_config
from trainguard.pipeline.errors import CycleAbortedError
from trainguard.pipeline.intake import (
    SignedShard,
    cap_sources,
    decoded_bytes,
    feature_columns,
    validate,
    verify_and_read,
)
from trainguard.provenance.dataset import table_samples
from trainguard.provenance.keys import generate_signing_key
from trainguard.provenance.policy import KeySet
from trainguard.provenance.rollback import RollbackRecords

REPO = Path(__file__).resolve().parents[2]
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


def test_the_intake_holds_at_most_its_ceiling_of_decoded_data(workdir: Path) -> None:
    document = yaml.safe_load((REPO / "configs" / "digits.yaml").read_text())
    document["project"] = str(REPO / "examples")
    (workdir / "cycle.yaml").write_text(yaml.safe_dump(document))
    config = load_config(workdir / "cycle.yaml", check_components=False)

    whole = verify_and_read(config, RollbackRecords(), {})
    base = sum(decoded_bytes(s.samples, s.frame) for s in (*whole.trusted, *whole.holdout))
    one = decoded_bytes(whole.train[0].samples, whole.train[0].frame)
    limited = config.model_copy(update={"limits": LimitsSection(max_decoded_bytes=base + one)})
    capped = verify_and_read(limited, RollbackRecords(), {})
    assert len(capped.trusted) == len(whole.trusted) and len(capped.train) == 1
    assert {d.reason.split(":")[0] for d in capped.refused} == {"intake-ceiling"}
    assert len(capped.refused) == len(whole.train) - 1

    too_small = config.model_copy(update={"limits": LimitsSection(max_decoded_bytes=base // 2)})
    with pytest.raises(CycleAbortedError, match="intake-ceiling"):
        verify_and_read(too_small, RollbackRecords(), {})
