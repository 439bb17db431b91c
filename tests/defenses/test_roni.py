"""RONI screening on digits: flipped labels and class-targeted poisoning are rejected with small p-values, clean
shards accepted; a source is judged whole (its union size-matched, its shard p-values combined across cycles)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from digits_demo.digits import load_digits_split
from torch import nn
from torch.nn import functional as F

from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.heldout import LabeledData
from trainguard.defenses.roni import (
    SCALE_DRAWS,
    Calibration,
    Candidate,
    ScreeningConfig,
    ScreeningReport,
    bootstrap_draws,
    group_by_source,
    screen_candidates,
    stratified_draws,
)

# The statistics are the subject: every parameter fine-tunes (the default scope would screen the MLP's last layer) and
# candidates are tested whole (by default one holding more than a quarter of the trusted rows of a class is subsampled).
FAST = {"level": 0.05, "calibration_draws": 99, "scope": "full", "pool_fraction": None}  # whole candidates
STRICT = {"calibration_draws": 399, "scope": "full", "pool_fraction": None}  # level 0.01: the least draws to reject


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


@pytest.fixture(scope="module")
def first_screening(digits: Split, model: nn.Module) -> ScreeningReport:
    """A first screening of one clean 50-row shard (FAST, "auto" learning rate): the calibration a next screening of
    the same model, trusted and held-out data may start from."""
    candidate = Candidate("a", "a", digits.shard(digits.pool[:50]))
    return screen_candidates(model, digits.trusted, digits.holdout, [candidate], ScreeningConfig(**FAST))


@pytest.fixture(scope="module")
def searched(first_screening: ScreeningReport) -> Calibration:
    """The first screening's calibration with its learning rate alone (no scales, no draws), for screenings whose
    "auto" rate search would be the very same (default grid, 20 steps, 4 checkpoints, per-class metrics, stratified,
    smallest candidate 50 rows: the search probes at that size), so the search (four rates, 120 probe copies each)
    runs once for all of them."""
    return replace(first_screening.calibration, scales=(), strata=())


def _flip(data: LabeledData, fraction: float, seed: int) -> LabeledData:
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(data), round(fraction * len(data)), replace=False)
    y = data.y.clone()
    y[rows] = torch.as_tensor((y[rows].numpy() + rng.integers(1, 10, len(rows))) % 10)
    return LabeledData(data.x, y)


def test_label_flipped_shard_is_rejected_with_a_small_p_value_and_its_clean_twin_accepted(
    digits: Split, model: nn.Module, searched: Calibration
) -> None:
    clean = digits.shard(digits.pool[:50])
    poisoned = _flip(clean, 0.2, seed=1)
    report = screen_candidates(
        model,
        digits.trusted,
        digits.holdout,
        [Candidate("shard-clean", "alice", clean), Candidate("shard-flipped", "mallory", poisoned)],
        ScreeningConfig(**STRICT),
        calibration=searched,
    )
    clean_decision, poisoned_decision = report.decisions
    assert clean_decision.accepted, clean_decision.reason
    assert clean_decision.adjusted_p_value > report.config.level
    assert not poisoned_decision.accepted
    assert poisoned_decision.p_value == pytest.approx(1 / (STRICT["calibration_draws"] + 1))
    assert poisoned_decision.adjusted_p_value <= report.config.level
    assert "margin" in poisoned_decision.reason and "p-value" in poisoned_decision.reason
    assert report.rejected == (poisoned_decision,)
    assert report.sources == ()  # one shard per source: nothing more to judge


def test_clean_candidates_are_accepted(digits: Split, model: nn.Module) -> None:
    candidates = [
        Candidate(f"shard-{i}", f"source-{i % 3}", digits.shard(digits.pool[50 * i : 50 * (i + 1)])) for i in range(10)
    ]
    config = ScreeningConfig(steps=10, **STRICT)  # half the steps: the smallest adjusted p-value 0.09+ (level 0.01)
    report = screen_candidates(model, digits.trusted, digits.holdout, candidates, config)
    assert [d.reason for d in report.rejected] == []
    assert not report.flagged
    histograms = {
        tuple(torch.bincount(c.data.y, minlength=10).tolist()) for c in [*candidates, *group_by_source(candidates)]
    }
    assert {s.counts for s in report.calibration.strata} == histograms  # each tested against its own histogram
    assert sorted({c.size for c in report.calibration.scales}) == [50, 150, 200]  # shards, and sources of 3 and 4
    draws = [len(s.scores) for s in report.calibration.strata]
    assert max(draws) <= STRICT["calibration_draws"] and np.median(draws) < 100  # clean ones stop early


def test_class_targeted_poisoning_is_caught_by_the_per_class_metrics_within_the_same_budget(
    digits: Split, model: nn.Module
) -> None:
    threes = digits.pool[digits.y[digits.pool].numpy() == 3][:3]
    others = digits.pool[digits.y[digits.pool].numpy() != 3][: 60 - len(threes)]
    targeted = digits.shard(np.concatenate([threes, others]))
    targeted.y[: len(threes)] = 8  # 3 of 60 rows: every 3 in the shard now says 8
    candidate = Candidate("shard-targeted", "mallory", targeted)

    overall_only = screen_candidates(
        model, digits.trusted, digits.holdout, [candidate], ScreeningConfig(per_class=False, **STRICT)
    )
    per_class = screen_candidates(model, digits.trusted, digits.holdout, [candidate], ScreeningConfig(**STRICT))

    decision = per_class.decisions[0]
    assert not decision.accepted
    assert "class 3" in decision.reason
    assert decision.p_value <= overall_only.decisions[0].p_value


def test_batched_and_sequential_training_give_the_same_p_values(digits: Split, model: nn.Module) -> None:
    candidates = [Candidate(f"s{i}", "a", digits.shard(digits.pool[40 * i : 40 * (i + 1)])) for i in range(3)]
    config = {"steps": 5, "chunk_size": 16, **FAST}
    batched = screen_candidates(model, digits.trusted, digits.holdout, candidates, ScreeningConfig(**config))
    rate = replace(batched.calibration, scales=(), strata=())  # the rate found batched: not searched again copy by copy
    sequential = screen_candidates(
        model, digits.trusted, digits.holdout, candidates, ScreeningConfig(batched=False, **config), calibration=rate
    )
    assert np.allclose([d.impact for d in batched.decisions], [d.impact for d in sequential.decisions], atol=1e-5)
    assert [d.p_value for d in batched.decisions] == [d.p_value for d in sequential.decisions]
    assert np.allclose(batched.calibration.strata[0].impacts, sequential.calibration.strata[0].impacts, atol=1e-5)


def test_progress_counts_every_copy_fine_tuned_up_to_the_plan(digits: Split, model: nn.Module) -> None:
    told: list[tuple[int, int]] = []
    candidates = [Candidate(f"s{i}", "a", digits.shard(digits.pool[40 * i : 40 * (i + 1)])) for i in range(2)]
    config = ScreeningConfig(steps=3, lr=0.01, chunk_size=64, **FAST)
    screen_candidates(model, digits.trusted, digits.holdout, candidates, config, progress=lambda *n: told.append(n))
    assert told[0] == (0, 3)  # two shards and their union up front; clean draws are planned as they are drawn
    done, planned = told[-1]
    assert done == planned >= 3 + 2 * SCALE_DRAWS + 2 * 2 * config.sequential_hits  # scales, a first stage each
    assert [d for d, _ in told] == sorted(d for d, _ in told) and [p for _, p in told] == sorted(p for _, p in told)
    assert all(d <= p for d, p in told) and len(told) > 3  # chunk by chunk, never past the plan


def test_screening_leaves_the_model_unchanged(digits: Split, model: nn.Module) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    candidate = [Candidate("s", "a", digits.shard(digits.pool[:30]))]
    screen_candidates(model, digits.trusted, digits.holdout, candidate, ScreeningConfig(**FAST))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_each_candidate_is_held_to_clean_draws_of_its_own_size(digits: Split, model: nn.Module) -> None:
    small = Candidate("small", "a", digits.shard(digits.pool[:30]))
    large = Candidate("large", "b", _flip(digits.shard(digits.pool[30:430]), 0.3, seed=2))
    config = ScreeningConfig(steps=10, **STRICT)  # 399 draws of 400 rows at half the steps: p-values 0.45+ and 0.0025
    report = screen_candidates(model, digits.trusted, digits.holdout, [small, large], config)
    assert [c.size for c in report.calibration.strata] == [30, 400]  # 400 rows drawn from 300 trusted: bootstrap
    assert [d.calibration_size for d in report.decisions] == [30, 400]
    assert [d.accepted for d in report.decisions] == [True, False]
    small_draws, big = report.calibration.strata
    assert np.std(big.impacts) < np.std(small_draws.impacts)  # bigger clean draws move the model less variably


def test_a_large_source_is_judged_against_draws_of_its_own_size_and_flagged(
    digits: Split, model: nn.Module, searched: Calibration
) -> None:
    """A 400-row source with 6% flips: its union is held to 400-row draws, its shards' p-values are combined."""
    source = _flip(digits.shard(digits.pool[:400]), 0.06, seed=4)
    shards = [
        Candidate(f"big-{i}", "big", LabeledData(source.x[50 * i : 50 * (i + 1)], source.y[50 * i : 50 * (i + 1)]))
        for i in range(8)
    ]
    report = screen_candidates(
        model, digits.trusted, digits.holdout, shards, ScreeningConfig(**STRICT), calibration=searched
    )
    (judged,) = report.sources
    assert judged.flagged and judged.union_p_value is not None
    union = torch.bincount(source.y, minlength=10).tolist()
    assert [s.size for s in report.calibration.strata if s.counts == tuple(union)] == [400]
    assert judged.combined_p_value <= report.config.level / 4
    assert all(not d.accepted for d in report.decisions)


def _diluted(digits: Split) -> list[Candidate]:
    """One source's 10 shards, each with 1 of 50 labels flipped: slightly harmful, most alone within the noise."""
    return [
        Candidate(f"m-{i}", "mallory", _flip(digits.shard(digits.pool[50 * i : 50 * (i + 1)]), 0.02, seed=10 + i))
        for i in range(10)
    ]


def test_a_diluted_source_is_flagged_as_a_source_while_each_shard_alone_passes(
    digits: Split, model: nn.Module, searched: Calibration
) -> None:
    offered = _diluted(digits)
    alone = [Candidate(c.name, f"own-{c.name}", c.data) for c in offered]  # one source per shard: no source test
    config = ScreeningConfig(**STRICT)
    separately = screen_candidates(model, digits.trusted, digits.holdout, alone, config, calibration=searched)
    passing = {d.name for d in separately.accepted}
    shards = [c for c in offered if c.name in passing]  # the attacker keeps the shards that pass one by one
    assert len(shards) >= 6

    # the same model, trusted and held-out data: the shards' draws are reused, the union draws its own
    together = screen_candidates(
        model, digits.trusted, digits.holdout, shards, config, calibration=separately.calibration
    )
    (source,) = together.sources
    assert source.flagged and source.combined_p_value < together.config.level / 4
    assert all(not d.accepted for d in together.decisions)
    flagged_by_source = [d for d in together.decisions if d.reason.startswith("source mallory flagged")]
    assert flagged_by_source and all("combined p-value" in d.reason for d in flagged_by_source)


def test_earlier_cycles_evidence_flags_a_source_whose_new_shard_alone_passes(
    digits: Split, model: nn.Module, searched: Calibration
) -> None:
    shard = _diluted(digits)[0]
    fresh = screen_candidates(
        model, digits.trusted, digits.holdout, [shard], ScreeningConfig(**STRICT), calibration=searched
    )
    assert fresh.decisions[0].accepted and fresh.sources == ()
    history = {"mallory": [0.01, 0.02, 0.01, 0.03, 0.02]}  # five earlier shards, each slightly harmful
    later = screen_candidates(
        model, digits.trusted, digits.holdout, [shard], ScreeningConfig(**FAST), history=history, calibration=searched
    )
    (source,) = later.sources
    assert source.earlier == 5 and source.union_p_value is None
    assert source.flagged and not later.decisions[0].accepted
    assert later.decisions[0].reason.startswith("source mallory flagged: combined p-value")


def test_a_detectors_evidence_joins_the_source_test_and_flags_what_the_shards_alone_do_not(
    digits: Split, model: nn.Module, searched: Calibration
) -> None:
    shards, config = _diluted(digits)[:1], ScreeningConfig(**STRICT)
    alone = screen_candidates(model, digits.trusted, digits.holdout, shards, config, calibration=searched)
    assert alone.decisions[0].accepted and alone.sources == ()  # one shard, slightly harmful: passes

    def screened(p_value: float) -> ScreeningReport:
        evidence = {"mallory": [p_value]}  # e.g. the label-issue detector's test of the source's rows
        return screen_candidates(
            model, digits.trusted, digits.holdout, shards, config, calibration=alone.calibration, evidence=evidence
        )

    joined = screened(1e-6)  # far more rows flagged than the clean rate
    (source,) = joined.sources
    assert source.evidence == (1e-6,) and source.flagged and "and 1 detector p-value " in source.reason
    assert all(not d.accepted for d in joined.decisions)
    assert not screened(1.0).flagged  # evidence of nothing flags nothing


def test_fdr_control_rejects_no_more_than_per_candidate_control(
    digits: Split, model: nn.Module, searched: Calibration
) -> None:
    candidates = [
        Candidate(f"c{i}", f"s{i}", _flip(digits.shard(digits.pool[50 * i : 50 * (i + 1)]), 0.3 if i < 2 else 0.0, i))
        for i in range(6)
    ]
    per_candidate = screen_candidates(
        model, digits.trusted, digits.holdout, candidates, ScreeningConfig(**FAST), calibration=searched
    )
    bh = screen_candidates(  # the same model, data and draws: the first screening's calibration
        model,
        digits.trusted,
        digits.holdout,
        candidates,
        ScreeningConfig(error_control="bh", **FAST),
        calibration=per_candidate.calibration,
    )
    assert [d.p_value for d in bh.decisions] == [d.p_value for d in per_candidate.decisions]
    assert {d.name for d in bh.rejected} <= {d.name for d in per_candidate.rejected}
    assert {"c0", "c1"} <= {d.name for d in per_candidate.rejected}


def test_calibration_from_an_earlier_report_is_reused_and_extended(
    digits: Split, model: nn.Module, first_screening: ScreeningReport
) -> None:
    first = first_screening  # candidate "a": the first 50 pool rows
    second = screen_candidates(
        model,
        digits.trusted,
        digits.holdout,
        [
            Candidate("a-again", "b", digits.shard(digits.pool[:50])),
            Candidate("c", "c", digits.shard(digits.pool[:80])),
        ],
        ScreeningConfig(**FAST),
        calibration=first.calibration,
    )
    assert second.calibration.scales[0] is first.calibration.scales[0]
    assert [c.size for c in second.calibration.scales] == [50, 80]
    (again,) = [s for s in second.calibration.strata if s.size == 50]  # the same histogram: its draws, extended
    assert again.scores[: len(first.calibration.strata[0].scores)] == first.calibration.strata[0].scores
    assert second.decisions[0].p_value == first.decisions[0].p_value


def test_bootstrap_draws_resample_the_pool_before_drawing() -> None:
    rows = bootstrap_draws(pool_size=300, size=400, count=200, seed=0)
    assert rows.shape == (200, 400) and rows.min() >= 0 and rows.max() < 300
    distinct = np.array([len(np.unique(r)) for r in rows])
    assert distinct.mean() < 0.63 * 300  # at most what one resample of the pool holds
    assert np.array_equal(rows, bootstrap_draws(300, 400, 200, seed=0))


def test_stratified_draws_hold_the_candidates_count_of_each_class_from_that_classs_trusted_rows(
    digits: Split,
) -> None:
    labels = digits.trusted.y.numpy()
    counts = (0, 0, 20, 0, 5, 0, 0, 25, 0, 0)
    rows = stratified_draws(labels, counts, count=30, seed=0)
    assert rows.shape == (30, 50)
    assert all(np.bincount(labels[r], minlength=10).tolist() == list(counts) for r in rows)
    assert np.array_equal(rows, stratified_draws(labels, counts, count=30, seed=0))
    assert not np.array_equal(rows[:20], stratified_draws(labels, counts, count=20, seed=0, start=10))  # next stage
    lacking = np.where(labels == 7, 8, labels)  # no trusted 7s: the candidate's 7s come from all trusted rows
    fallback = stratified_draws(lacking, counts, count=30, seed=0)
    assert np.bincount(lacking[fallback[:, 25:]].ravel(), minlength=10)[[2, 4]].sum() > 0


def _three_class_shards(digits: Split, count: int, flip: float) -> list[Candidate]:
    """`count` shards of 50 pool rows of 3 random classes each (a clinic that sees a few conditions), each its own
    source, `flip` of their labels flipped."""
    labels = digits.y[digits.pool].numpy()
    shards = []
    for seed in range(count):
        rng = np.random.default_rng(seed)
        rows = rng.choice(digits.pool[np.isin(labels, rng.choice(10, 3, replace=False))], 50, replace=False)
        data = _flip(digits.shard(rows), flip, seed) if flip else digits.shard(rows)
        shards.append(Candidate(f"{'flipped' if flip else 'clean'}-{seed}", f"{flip}-{seed}", data))
    return shards


def test_clean_shards_of_three_classes_are_accepted_and_flipped_ones_rejected(digits: Split, model: nn.Module) -> None:
    """Held to draws of their own label histogram, clean 3-class shards are rejected at most at the level (8 of
    them at level 0.05: at most one); held to all-class draws they are not. 30% flips in such shards are caught."""
    clean, flipped = _three_class_shards(digits, 8, 0.0), _three_class_shards(digits, 8, 0.3)
    config = {"steps": 10, **FAST}
    report = screen_candidates(model, digits.trusted, digits.holdout, [*clean, *flipped], ScreeningConfig(**config))
    rejected = {d.name for d in report.rejected}
    assert len(rejected & {c.name for c in clean}) <= 1
    assert len(rejected & {c.name for c in flipped}) >= 6
    unstratified = screen_candidates(
        model, digits.trusted, digits.holdout, clean, ScreeningConfig(stratify=False, **config)
    )
    assert len(unstratified.rejected) >= 2  # what stratification fixes


def _two_class_shard_with_one_stranger(digits: Split, seed: int) -> LabeledData:
    """16 pool rows each of 3s and 5s, the first replaced by a row of another class still labelled a 3: one row the
    model contradicts, as an atypical clean row is."""
    rng = np.random.default_rng(seed)
    labels = digits.y[digits.pool].numpy()
    rows = np.concatenate([rng.choice(digits.pool[labels == c], 16, replace=False) for c in (3, 5)])
    shard = digits.shard(rows)
    shard.x[0] = digits.x[rng.choice(digits.pool[~np.isin(labels, (3, 5))])]
    return shard


def test_with_trim_one_row_the_model_contradicts_does_not_refuse_a_shard_of_two_classes(
    digits: Split, model: nn.Module
) -> None:
    """Trimming (`trim=0.02`: a 32-row shard's most contradicted row, its draws' alike) bounds what one row can do:
    four such shards pass, where fine-tuning on every row (the default) refuses at least three of them at the floor."""
    shards = [Candidate(f"s{k}", f"s{k}", _two_class_shard_with_one_stranger(digits, k)) for k in range(4)]
    config = {"level": 0.05, "calibration_draws": 99, "pool_fraction": None}  # whole shards, the head scope
    trimmed = screen_candidates(model, digits.trusted, digits.holdout, shards, ScreeningConfig(trim=0.02, **config))
    assert trimmed.rejected == ()
    untrimmed = screen_candidates(model, digits.trusted, digits.holdout, shards, ScreeningConfig(**config))
    assert untrimmed.config.trim == 0.0
    assert sum(d.p_value == pytest.approx(0.01) for d in untrimmed.decisions) >= 3


def test_a_candidate_past_the_pool_share_is_tested_on_a_subsample_its_draws_can_match(
    digits: Split, model: nn.Module
) -> None:
    """Draws of more rows of a class than a quarter of the trusted rows of it repeat rows; such a candidate is tested
    on a seeded subsample holding at most that share of each class, and 30% flips in it are still caught."""
    clean, flipped = _three_class_shards(digits, 4, 0.0), _three_class_shards(digits, 4, 0.3)
    config = ScreeningConfig(steps=10, level=0.05, calibration_draws=99, scope="full", pool_fraction=0.25)
    report = screen_candidates(model, digits.trusted, digits.holdout, [*clean, *flipped], config)
    trusted = np.bincount(digits.trusted.y.numpy(), minlength=10)
    for stratum in report.calibration.strata:
        assert stratum.counts is not None
        assert all(k <= max(1, int(0.25 * trusted[c])) for c, k in enumerate(stratum.counts))
    assert {d.size for d in report.decisions} == {50}  # decisions name the whole shard
    assert max(d.calibration_size for d in report.decisions) < 50
    rejected = {d.name for d in report.rejected}
    assert len(rejected & {c.name for c in flipped}) >= 3 and len(rejected & {c.name for c in clean}) <= 1
    assert all("subsample of its 50 rows" in d.reason for d in report.rejected)
    # screened again on the first screening's draws: the same subsamples score the same
    again = screen_candidates(
        model, digits.trusted, digits.holdout, [*clean, *flipped], config, calibration=report.calibration
    )
    assert [d.p_value for d in again.decisions] == [d.p_value for d in report.decisions]  # seeded subsamples


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
    twice = [Candidate("s", "a", digits.shard(digits.pool[:10]))] * 2
    with pytest.raises(ScreeningInputError, match="unique"):
        screen_candidates(model, digits.trusted, digits.holdout, twice)
    with pytest.raises(ScreeningInputError, match="cannot reach p <= level/4"):
        ScreeningConfig(calibration_draws=100)  # at level 0.01 a union test could never reject
    with pytest.raises(ScreeningInputError):
        ScreeningConfig(level=0.0)
    with pytest.raises(ScreeningInputError):
        ScreeningConfig(error_control="holm")  # type: ignore[arg-type]


def test_diverging_fine_tuning_fails_closed(digits: Split, model: nn.Module) -> None:
    candidate = Candidate("s", "a", digits.shard(digits.pool[:30]))
    config = ScreeningConfig(lr=1e30, steps=3, **FAST)
    with pytest.raises(ScreeningInputError, match="screening diverged"):
        screen_candidates(model, digits.trusted, digits.holdout, [candidate], config)


def test_auto_lr_takes_a_stable_rate_where_poisoned_probe_draws_stand_out_most(digits: Split, model: nn.Module) -> None:
    """Rate 20 wrecks clean copies (never taken); of the stable rates, the probe's poisoned draws (a tenth of their
    labels moved) stand further above their clean twins at the one taken."""
    candidates = [Candidate("s", "a", digits.shard(digits.pool[:40]))]
    auto = ScreeningConfig(lr_grid=(20.0, 0.5, 0.05), **FAST)
    report = screen_candidates(model, digits.trusted, digits.holdout, candidates, auto)
    chosen = report.lr
    assert chosen in (0.5, 0.05)
    other = 0.05 if chosen == 0.5 else 0.5
    probed = dict(report.calibration.probed)
    assert probed[20.0] is None and probed[other] is not None
    assert probed[chosen] >= probed[other]


def test_auto_lr_refuses_when_no_rate_of_the_grid_is_stable(digits: Split, model: nn.Module) -> None:
    candidate = Candidate("s", "a", digits.shard(digits.pool[:30]))
    with pytest.raises(ScreeningInputError, match="no stable learning rate"):
        screen_candidates(
            model, digits.trusted, digits.holdout, [candidate], ScreeningConfig(lr_grid=(1e30, 1e20), **FAST)
        )


def test_the_report_carries_each_candidates_p_value_as_strict_json(
    digits: Split, model: nn.Module, searched: Calibration
) -> None:
    candidates = [Candidate(f"s{i}", "alice", digits.shard(digits.pool[50 * i : 50 * (i + 1)])) for i in range(2)]
    config = ScreeningConfig(**FAST)
    data = screen_candidates(model, digits.trusted, digits.holdout, candidates, config, calibration=searched).to_dict()
    assert [set(d) >= {"p_value", "adjusted_p_value", "source_p_value", "calibration_size"} for d in data["decisions"]]
    assert data["sources"][0]["source"] == "alice" and 0 < data["sources"][0]["p_value"] <= 1
    assert sorted({c["size"] for c in data["calibration"]}) == [50, 100]
    assert all(sum(c["counts"]) == c["size"] for c in data["calibration"])
    assert data["level"] == 0.05 and data["error_control"] == "per-candidate"


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
    config = ScreeningConfig(**{**STRICT, "scope": "head", "steps": 10})  # half the steps: clean p 0.4+, flipped 0.0025
    report = screen_candidates(bn_model, digits.trusted, digits.holdout, [*clean, *flipped], config)
    assert (report.scope, report.head) == ("head", "fc")
    assert [d.accepted for d in report.decisions] == [True] * 4 + [False] * 4
    assert all(torch.equal(before[k], v) for k, v in bn_model.state_dict().items())


def test_auto_scope_screens_the_linear_head_and_the_whole_of_a_model_without_one(
    digits: Split, bn_model: nn.Module
) -> None:
    candidate = [Candidate("s", "a", digits.shard(digits.pool[:40]))]
    auto = ScreeningConfig(steps=3, lr=0.01, **{**FAST, "scope": "auto"})
    report = screen_candidates(bn_model, digits.trusted, digits.holdout, candidate, auto)
    assert (report.scope, report.head) == ("head", "fc")
    torch.manual_seed(0)
    convolutional = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 10, 8), nn.Flatten())  # no nn.Linear
    report = screen_candidates(convolutional, digits.trusted, digits.holdout, candidate, auto)
    assert (report.scope, report.head) == ("full", None)


class ScaledOutput(nn.Module):
    """An MLP whose forward does more after its last Linear: no head from there gives the model's output."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 2.0


def test_auto_scope_screens_the_whole_model_where_no_head_gives_its_output_or_a_hook_feeds_it(
    digits: Split, model: nn.Module
) -> None:
    candidate = [Candidate("s", "a", digits.shard(digits.pool[:40]))]
    auto = ScreeningConfig(steps=3, lr=0.01, **{**FAST, "scope": "auto"})
    torch.manual_seed(0)
    report = screen_candidates(ScaledOutput(), digits.trusted, digits.holdout, candidate, auto)
    assert (report.scope, report.head) == ("full", None)
    with pytest.raises(ScreeningInputError, match="not the head"):
        screen_candidates(ScaledOutput(), digits.trusted, digits.holdout, candidate, replace(auto, scope="head"))
    hooked = screen_candidates(
        model, digits.trusted, digits.holdout, candidate, auto, forward=lambda module, batch, x: module(x)
    )
    assert hooked.scope == "full"


@pytest.mark.timeout(900)  # 120 whole-network copies per rate: 5 s alone, several times that on two loaded cores
def test_full_scope_on_a_batch_norm_network_finds_a_finite_rate(digits: Split, bn_model: nn.Module) -> None:
    candidates = [Candidate("flipped", "m", _flip(digits.shard(digits.pool[:10]), 0.3, seed=3))]
    # the rate search is the subject: a coarse grid, 5 steps, 10-row probe draws (the candidate's size) and a sixth of
    # the held-out rows keep full scope's probe (120 copies a rate) cheap; only 0.005 of the grid is stable
    config = ScreeningConfig(
        scope="full", steps=5, checkpoints=2, level=0.2, calibration_draws=19, lr_grid=(0.5, 0.05, 0.005)
    )
    holdout = LabeledData(digits.holdout.x[:60], digits.holdout.y[:60])
    report = screen_candidates(bn_model, digits.trusted, holdout, candidates, config)
    assert report.scope == "full"
    assert report.lr in config.lr_grid
    assert all(math.isfinite(v) for v in report.calibration.strata[0].impacts)  # the shard's histogram's draws
