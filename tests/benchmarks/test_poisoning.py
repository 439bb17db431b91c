"""`benchmarks/poisoning.py --quick` runs end to end on a scenario of each kind, so the benchmark cannot rot; each
attack the detectors were not tuned for is built as its row says (issue #26), and the slow drip carries its history."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _tables(out: str, columns: list[str]) -> dict[str, dict[str, list[str]]]:
    """Each heading's table (a column's, or the summary's): scenario -> its cells."""
    tables: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in out.splitlines():
        heading = next((c for c in columns if line.startswith(f"{c}: ")), None)
        if heading is not None:
            current = tables.setdefault(heading, {})
        elif current is not None and "|" in line:
            cells = [cell.strip() for cell in line.split("|")]
            current[cells[0]] = cells
    return tables


def test_the_quick_run_prints_each_column_with_rates_intervals_and_attack_success(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import poisoning

    # the quick run at its smallest: one seed, 4 clean sources (not 24) and the fewest draws RONI takes at level 0.2,
    # with 5 fine-tuning steps: every column and the summary print as in the benchmark, their rates are no measure
    argv = ["poisoning.py", "--quick", "--seeds", "1", "--clean-sources", "4", "--draws", "19", "--option", "level=0.2"]
    argv += ["--option", "steps=5", "--only", "flip-20%", "backdoor concentrated", "slow drip"]
    monkeypatch.setattr(sys, "argv", argv)
    poisoning.main()

    out = capsys.readouterr().out
    tables = _tables(out, [*poisoning.DETECTORS, "summary"])
    summary = tables.pop("summary")
    assert set(tables) == set(poisoning.DETECTORS)
    for rows in tables.values():
        assert set(rows) >= {"flip-20%", "backdoor concentrated", "slow drip"}
        assert "[" in rows["flip-20%"][3]  # FPR with its bootstrap interval
        assert "->" in rows["backdoor concentrated"][5]  # attack success before -> after screening
        assert float(rows["flip-20%"][1].split()[0]) >= 0.5  # 20% flips: caught
    # the detectors' quarantine leaves most of the patched, relabelled rows out of training
    quarantined = tables["RONI + detectors (quarantine-rows)"]["backdoor concentrated"][6]
    assert float(quarantined.split(",")[0]) >= 0.5
    # the summary: RONI alone beside the default combination, the drip's first flagged cycle, a pooled FPR
    assert "[" in summary["flip-20%"][3] and "[" in summary["flip-20%"][4]
    assert summary["backdoor concentrated"][5] != "-" and summary["backdoor concentrated"][6] != "-"
    assert summary["slow drip"][1].startswith("by cycle 3: ")
    assert "slow drip: first cycle a shard is rejected, per seed: A " in out
    assert "pooled clean FPR over all scenarios: A " in out


def test_quarantined_rows_land_on_the_patched_rows_of_the_right_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import numpy as np
    import poisoning

    world = poisoning.World.of(0)
    offer = poisoning.SCENARIOS["backdoor spread"](world, np.random.default_rng(0))
    offer.found = poisoning.detections(world, offer)
    offer.screened = poisoning.Verdict.shards([False] * len(offer.candidates), offer)  # the detectors alone
    verdict = poisoning.combined("quarantine-rows")(world, offer, poisoning.ScreeningConfig(scope="full"))

    quarantined, bad = np.concatenate(verdict.quarantined), np.concatenate(offer.bad_rows)
    assert not any(verdict.rejected)
    assert quarantined[bad].mean() >= 0.8  # the patched rows, relabelled 0, are found where they are
    assert quarantined[~bad].mean() <= 0.1  # and few of the others


@pytest.fixture(scope="module")
def poisoning():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import poisoning

        yield poisoning
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def world(poisoning):
    return poisoning.World.of(0)


def _attacker_shards(offer):
    return [(c, bad) for c, bad in zip(offer.candidates, offer.bad_rows, strict=True) if c.source in offer.attackers]


def test_the_blended_trigger_is_one_fixed_pattern_at_alpha_that_keeps_pixels_in_range(poisoning, world) -> None:
    x = world.x[:100]
    triggered = poisoning.blended(x)

    assert 0.1 <= poisoning.ALPHA <= 0.2
    assert triggered.min() >= 0.0 and triggered.max() <= 1.0
    assert torch.allclose(triggered - (1 - poisoning.ALPHA) * x, (poisoning.ALPHA * poisoning.PATTERN).expand_as(x))
    assert (triggered - x).abs().max() <= poisoning.ALPHA  # a faint blend, not a patch


@pytest.mark.parametrize("scenario", ["blended concentrated", "blended spread"])
def test_blended_rows_are_other_classes_relabelled_to_the_target(poisoning, world, scenario) -> None:
    offer = poisoning.SCENARIOS[scenario](world, np.random.default_rng(0))
    shards = _attacker_shards(offer)
    assert sum(int(bad.sum()) for _, bad in shards) == poisoning.BACKDOOR_ROWS
    assert poisoning.BACKDOORS[scenario] is poisoning.blended
    for candidate, bad in shards:
        assert (candidate.data.y[torch.as_tensor(bad)] == poisoning.TARGET).all()


@pytest.mark.parametrize(
    ("scenario", "shards"),
    [("clean-label concentrated", 2), ("clean-label spread", 18), ("clean-label adv concentrated", 2)],
)
def test_clean_label_rows_all_carry_the_target_label_and_the_patch(poisoning, world, scenario, shards) -> None:
    offer = poisoning.SCENARIOS[scenario](world, np.random.default_rng(0))
    attacker = _attacker_shards(offer)
    assert len(attacker) == shards
    assert sum(int(bad.sum()) for _, bad in attacker) == poisoning.BACKDOOR_ROWS
    for candidate, bad in attacker:
        poisoned = candidate.data.take(torch.as_tensor(np.flatnonzero(bad)))
        assert (poisoned.y == poisoning.TARGET).all()  # no relabelling: the labels are the rows' own
        assert torch.equal(poisoning.patched(poisoned.x), poisoned.x)  # the trigger is on them
        others = candidate.data.x[torch.as_tensor(np.flatnonzero(~bad))].reshape(-1, 8, 8)[:, 6:, 6:]
        assert not (others == 1.0).all(dim=(1, 2)).any()


def test_hardened_rows_stay_within_epsilon_and_the_current_model_no_longer_reads_their_class(poisoning, world) -> None:
    zeros = world.y == poisoning.TARGET
    x, y = world.x[zeros][:40], world.y[zeros][:40]
    hard = poisoning.hardened(world.model, x, y, poisoning.HARDENING)

    assert (hard - x).abs().max() <= poisoning.HARDENING + 1e-6
    assert hard.min() >= 0.0 and hard.max() <= 1.0
    with torch.no_grad():
        before = (world.model(x).argmax(1) == y).float().mean()
        after = (world.model(hard).argmax(1) == y).float().mean()
    assert before >= 0.9 and after <= 0.5


def test_sybil_sources_are_distinct_with_one_shard_of_ten_percent_flips_each(poisoning, world) -> None:
    offer = poisoning.SCENARIOS[f"sybil {poisoning.SYBILS}x10%"](world, np.random.default_rng(0))
    attacker = _attacker_shards(offer)

    assert len(offer.attackers) == poisoning.SYBILS == 12
    assert sorted(c.source for c, _ in attacker) == sorted(offer.attackers)  # one shard each
    assert [int(bad.sum()) for _, bad in attacker] == [round(0.1 * poisoning.SHARD)] * poisoning.SYBILS


@pytest.mark.parametrize("rate", [0.1, 0.2])
def test_adaptive_flips_relabel_the_rows_the_model_finds_likeliest_to_be_another_class(poisoning, world, rate) -> None:
    offer = poisoning.SCENARIOS[f"adaptive flip-{round(100 * rate)}%"](world, np.random.default_rng(0))
    with torch.no_grad():
        probabilities = torch.softmax(world.model(world.x), 1)
    for candidate, bad in _attacker_shards(offer):
        assert int(bad.sum()) == round(rate * poisoning.SHARD)
        rows = [int(np.flatnonzero((world.x == x).all(1))[0]) for x in candidate.data.x]
        others = probabilities[rows].scatter(1, world.y[rows][:, None], -1.0)
        best, runner_up = others.max(1)
        assert torch.equal(candidate.data.y[torch.as_tensor(bad)], runner_up[torch.as_tensor(bad)])
        assert best[torch.as_tensor(bad)].min() >= best[torch.as_tensor(~bad)].max()  # the most plausible flips


def test_the_slow_drip_sends_one_flipped_shard_per_cycle_beside_the_same_clean_sources(poisoning, world) -> None:
    offers = poisoning.CYCLED["slow drip"](world, np.random.default_rng(0))

    assert len(offers) == poisoning.DRIP_CYCLES
    for offer in offers:
        drip = _attacker_shards(offer)
        assert offer.attackers == {"drip"} and len(drip) == 1
        assert int(drip[0][1].sum()) == round(poisoning.DRIP_FLIPS * poisoning.SHARD)
        assert {c.source for c in offer.candidates} == {f"clean{s}" for s in range(poisoning.CLEAN_SOURCES)} | {"drip"}
    assert len({c.name for offer in offers for c in offer.candidates}) == sum(len(o.candidates) for o in offers)


def test_each_cycle_of_the_slow_drip_carries_every_source_s_earlier_shard_p_values(poisoning, world) -> None:
    offers = poisoning.CYCLED["slow drip"](world, np.random.default_rng(0))
    tally = poisoning.Tally()
    config = poisoning.ScreeningConfig(scope="head", level=0.2, calibration_draws=19, steps=5)
    poisoning.judge_cycles(world, offers, config, {"RONI": tally})

    for cycle, offer in enumerate(offers):
        sources = {c.source for c in offer.candidates}
        assert set(offer.history) == (sources if cycle else set())
        assert all(len(p_values) == cycle and all(0 < p <= 1 for p in p_values) for p_values in offer.history.values())
    assert offers[-1].history["drip"][:3] == offers[3].history["drip"]  # the same p-values, carried on
    assert len(tally.first_flagged) == 1 and tally.poisoned == [poisoning.DRIP_CYCLES]
