"""RONI screening on digits: flipped labels and class-targeted poisoning are rejected, clean shards accepted."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from digits_demo.digits import load_digits_split
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.heldout import LabeledData
from trainguard.defenses.roni import (
    Candidate,
    ScreeningConfig,
    _decide,
    class_thresholds_of,
    group_by_source,
    robust_scale,
    robust_threshold,
    screen_candidates,
)


class Split:
    def __init__(self) -> None:
        digits = load_digits_split(seed=0)
        self.x, self.y = torch.tensor(digits.x), torch.tensor(digits.y)
        self.train = LabeledData(self.x[:500], self.y[:500])
        self.trusted = LabeledData(self.x[500:800], self.y[500:800])
        self.holdout = LabeledData(self.x[800:1160], self.y[800:1160])
        self.pool = np.arange(1160, len(self.y))

    def shard(self, rows: np.ndarray) -> LabeledData:
        return LabeledData(self.x[rows], self.y[rows].clone())


@pytest.fixture(scope="module")
def digits() -> Split:
    return Split()


@pytest.fixture(scope="module")
def model(digits: Split) -> nn.Module:
    """The current model: a small MLP fitted on the training split."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        for idx in torch.randperm(len(digits.train), generator=generator).split(64):
            opt.zero_grad()
            F.cross_entropy(net(digits.train.x[idx]), digits.train.y[idx]).backward()
            opt.step()
    return net


def _flip(data: LabeledData, fraction: float, seed: int) -> LabeledData:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(data), round(fraction * len(data)), replace=False)
    y = data.y.clone()
    y[rows] = torch.as_tensor((y[rows].numpy() + rng.integers(1, 10, len(rows))) % 10)
    return LabeledData(data.x, y)


def test_label_flipped_shard_is_rejected_and_its_clean_twin_accepted(digits: Split, model: nn.Module) -> None:
    clean = digits.shard(digits.pool[:50])
    poisoned = _flip(clean, 0.2, seed=1)
    report = screen_candidates(
        model,
        digits.trusted,
        digits.holdout,
        [Candidate("shard-clean", "alice", clean), Candidate("shard-flipped", "mallory", poisoned)],
    )
    clean_decision, poisoned_decision = report.decisions
    assert clean_decision.accepted, clean_decision.reason
    assert not poisoned_decision.accepted
    assert poisoned_decision.impact > poisoned_decision.threshold
    assert "soft accuracy dropped" in poisoned_decision.reason
    assert report.rejected == (poisoned_decision,)


def test_clean_candidates_are_accepted(digits: Split, model: nn.Module) -> None:
    candidates = [
        Candidate(f"shard-{i}", f"source-{i % 3}", digits.shard(digits.pool[50 * i : 50 * (i + 1)])) for i in range(10)
    ]
    report = screen_candidates(model, digits.trusted, digits.holdout, candidates)
    assert [d.reason for d in report.rejected] == []
    assert len(report.calibration_impacts) == ScreeningConfig().calibration_shards
    assert all(d.impact <= d.threshold for d in report.decisions)


def test_class_targeted_poisoning_is_caught_by_per_class_metric_when_overall_barely_moves(
    digits: Split, model: nn.Module
) -> None:
    threes = digits.pool[digits.y[digits.pool].numpy() == 3][:3]
    others = digits.pool[digits.y[digits.pool].numpy() != 3][: 60 - len(threes)]
    targeted = digits.shard(np.concatenate([threes, others]))
    targeted.y[: len(threes)] = 8  # 3 of 60 rows: every 3 in the shard now says 8
    candidate = Candidate("shard-targeted", "mallory", targeted)
    mild = {"k": 8.0, "class_k": 10.0}  # an overall rule lenient enough to let the shard through

    overall_only = screen_candidates(
        model, digits.trusted, digits.holdout, [candidate], ScreeningConfig(per_class=False, **mild)
    )
    per_class = screen_candidates(model, digits.trusted, digits.holdout, [candidate], ScreeningConfig(**mild))

    decision = per_class.decisions[0]
    assert overall_only.decisions[0].accepted
    assert decision.impact <= decision.threshold
    assert not decision.accepted
    assert "class 3" in decision.reason
    assert decision.class_impacts[3] > decision.class_thresholds[3]


def test_batched_and_sequential_training_give_the_same_impacts(digits: Split, model: nn.Module) -> None:
    candidates = [Candidate(f"s{i}", "a", digits.shard(digits.pool[40 * i : 40 * (i + 1)])) for i in range(3)]
    config = {"steps": 5, "calibration_shards": 6, "chunk_size": 4}
    batched = screen_candidates(model, digits.trusted, digits.holdout, candidates, ScreeningConfig(**config))
    sequential = screen_candidates(
        model, digits.trusted, digits.holdout, candidates, ScreeningConfig(batched=False, **config)
    )
    assert np.allclose([d.impact for d in batched.decisions], [d.impact for d in sequential.decisions], atol=1e-5)
    assert np.allclose(batched.calibration_impacts, sequential.calibration_impacts, atol=1e-5)


def test_screening_leaves_the_model_unchanged(digits: Split, model: nn.Module) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    screen_candidates(model, digits.trusted, digits.holdout, [Candidate("s", "a", digits.shard(digits.pool[:30]))])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_candidates_of_different_sizes_are_screened_together(digits: Split, model: nn.Module) -> None:
    small = Candidate("small", "a", digits.shard(digits.pool[:30]))
    large = Candidate("large", "b", _flip(digits.shard(digits.pool[30:110]), 0.3, seed=2))
    report = screen_candidates(model, digits.trusted, digits.holdout, [small, large])
    assert report.calibration_size == 30
    assert [d.accepted for d in report.decisions] == [True, False]


def test_group_by_source_concatenates_each_sources_shards(digits: Split) -> None:
    shards = [
        Candidate("a1", "alice", digits.shard(digits.pool[:10])),
        Candidate("b1", "bob", digits.shard(digits.pool[10:15])),
        Candidate("a2", "alice", digits.shard(digits.pool[15:30])),
    ]
    grouped = group_by_source(shards)
    assert [(g.name, g.source, len(g.data)) for g in grouped] == [("a1+a2", "alice", 25), ("b1", "bob", 5)]


def test_unusable_inputs_are_refused_with_exit_code_2(digits: Split, model: nn.Module) -> None:
    with pytest.raises(ScreeningInputError) as empty:
        screen_candidates(model, digits.trusted, digits.holdout, [])
    assert empty.value.exit_code == 2
    with pytest.raises(ScreeningInputError, match="calibration needs shards of 400 rows"):
        screen_candidates(
            model, digits.trusted, digits.holdout, [Candidate("big", "a", digits.shard(digits.pool[:400]))]
        )
    with pytest.raises(ScreeningInputError):
        ScreeningConfig(calibration_shards=2)


def test_diverging_fine_tuning_fails_closed(digits: Split, model: nn.Module) -> None:
    candidate = Candidate("s", "a", digits.shard(digits.pool[:30]))
    with pytest.raises(ScreeningInputError, match="screening diverged"):
        screen_candidates(model, digits.trusted, digits.holdout, [candidate], ScreeningConfig(lr=1e30, steps=3))


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)


@given(st.lists(finite, min_size=1, max_size=40), st.floats(0, 10), finite)
def test_robust_threshold_is_shift_equivariant_and_at_least_the_median(values: list[float], k: float, shift: float):
    threshold = robust_threshold(values, k)
    assert threshold >= np.median(values) - 1e-9
    assert math.isclose(robust_threshold([v + shift for v in values], k), threshold + shift, rel_tol=1e-9, abs_tol=1e-6)


@given(st.lists(finite, min_size=1, max_size=40), st.floats(0, 5), st.floats(0, 5))
def test_robust_threshold_grows_with_k(values: list[float], k1: float, k2: float) -> None:
    low, high = sorted((k1, k2))
    assert robust_threshold(values, low) <= robust_threshold(values, high) + 1e-9


@given(
    st.lists(st.floats(-1, 1), min_size=3, max_size=30),
    st.lists(st.floats(1e3, 1e12), min_size=0, max_size=30),
)
def test_a_minority_of_outliers_cannot_drag_the_threshold_away(clean: list[float], outliers: list[float]) -> None:
    outliers = outliers[: (len(clean) - 1) // 2]
    bound = max(clean) + 3 * 1.4826 * (max(clean) - min(clean))
    assert robust_threshold(clean + outliers, 3.0) <= bound + 1e-9
    assert robust_scale(clean + outliers) <= 1.4826 * (max(clean) - min(clean)) + 1e-9


def test_a_class_missing_from_the_holdout_never_rejects() -> None:
    values = np.array([[0.1, np.nan], [0.2, np.nan], [0.3, np.nan]])
    thresholds = class_thresholds_of(values, 2.0)
    assert thresholds[1] == math.inf
    assert math.isclose(thresholds[0], 0.2 + 2.0 * robust_scale([0.1, 0.2, 0.3]))


def test_auto_lr_is_the_largest_grid_rate_whose_calibration_copies_keep_their_soft_accuracy(
    digits: Split, model: nn.Module
) -> None:
    candidates = [Candidate("s", "a", digits.shard(digits.pool[:40]))]
    auto = ScreeningConfig(lr_grid=(20.0, 0.5, 0.05), calibration_shards=8)
    too_large = ScreeningConfig(lr=20.0, calibration_shards=8)
    assert screen_candidates(model, digits.trusted, digits.holdout, candidates, auto).lr == 0.5
    collapsed = screen_candidates(model, digits.trusted, digits.holdout, candidates, too_large)
    assert np.median(collapsed.calibration_impacts) > auto.lr_tolerance


def test_auto_lr_refuses_when_no_rate_of_the_grid_is_stable(digits: Split, model: nn.Module) -> None:
    candidate = Candidate("s", "a", digits.shard(digits.pool[:30]))
    with pytest.raises(ScreeningInputError, match="no stable learning rate"):
        screen_candidates(model, digits.trusted, digits.holdout, [candidate], ScreeningConfig(lr_grid=(1e30, 1e20)))


def test_zero_spread_calibration_keeps_a_floor_between_the_median_and_the_threshold() -> None:
    saturated = [0.0] * 40  # a saturated model: clean copies all keep held-out soft accuracy ~1
    assert robust_threshold(saturated, 5.0) == 0.0
    assert robust_threshold(saturated, 5.0, floor=1e-3) == pytest.approx(5e-3)
    per_class = class_thresholds_of(np.zeros((40, 3)), 18.0, floor=1e-3)
    assert per_class == pytest.approx([18e-3] * 3)
    assert not _decide(1e-6, robust_threshold(saturated, 5.0, floor=1e-3), np.full(3, 1e-6), per_class)
    assert _decide(1e-6, robust_threshold(saturated, 5.0), np.full(3, 1e-6), np.zeros(3))


class BatchNormNet(nn.Module):
    """A batch-norm CNN over 8x8 digits, torchvision-style: pooled features into an `fc` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer2(self.layer1(x.reshape(-1, 1, 8, 8)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 4), 1))


@pytest.fixture(scope="module")
def bn_model(digits: Split) -> nn.Module:
    torch.manual_seed(0)
    net = BatchNormNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        for idx in torch.randperm(len(digits.train), generator=generator).split(64):
            opt.zero_grad()
            F.cross_entropy(net(digits.train.x[idx]), digits.train.y[idx]).backward()
            opt.step()
    return net.eval()


def test_head_scope_on_a_batch_norm_network_rejects_flipped_shards_and_accepts_clean_ones(
    digits: Split, bn_model: nn.Module
) -> None:
    clean = [Candidate(f"clean-{i}", "alice", digits.shard(digits.pool[50 * i : 50 * (i + 1)])) for i in range(4)]
    flipped = [
        Candidate(f"flipped-{i}", "mallory", _flip(digits.shard(digits.pool[50 * i : 50 * (i + 1)]), 0.3, seed=i))
        for i in range(4, 8)
    ]
    before = {k: v.clone() for k, v in bn_model.state_dict().items()}
    report = screen_candidates(
        bn_model, digits.trusted, digits.holdout, [*clean, *flipped], ScreeningConfig(scope="head")
    )
    assert (report.scope, report.head) == ("head", "fc")
    assert [d.accepted for d in report.decisions] == [True] * 4 + [False] * 4
    assert all(torch.equal(before[k], v) for k, v in bn_model.state_dict().items())


def test_auto_scope_screens_the_head_of_models_above_the_size_threshold(digits: Split, bn_model: nn.Module) -> None:
    candidate = [Candidate("s", "a", digits.shard(digits.pool[:40]))]
    small = ScreeningConfig(steps=3, calibration_shards=5)
    big = ScreeningConfig(steps=3, calibration_shards=5, head_above=1000)
    assert screen_candidates(bn_model, digits.trusted, digits.holdout, candidate, small).scope == "full"
    assert screen_candidates(bn_model, digits.trusted, digits.holdout, candidate, big).scope == "head"


def test_full_scope_on_a_batch_norm_network_finds_a_finite_rate(digits: Split, bn_model: nn.Module) -> None:
    candidates = [Candidate("flipped", "m", _flip(digits.shard(digits.pool[:50]), 0.3, seed=3))]
    report = screen_candidates(
        bn_model, digits.trusted, digits.holdout, candidates, ScreeningConfig(scope="full", calibration_shards=10)
    )
    assert report.scope == "full"
    assert all(math.isfinite(v) for v in report.calibration_impacts)
    assert np.median(report.calibration_impacts) <= report.config.lr_tolerance
