"""`benchmarks/poisoning.py --quick` runs end to end on a scenario of each kind, so the benchmark cannot rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _tables(out: str, columns: list[str]) -> dict[str, dict[str, list[str]]]:
    """Each column's table: scenario -> its cells."""
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

    argv = ["poisoning.py", "--quick", "--seeds", "1", "--only", "flip-20%", "backdoor concentrated"]
    monkeypatch.setattr(sys, "argv", argv)
    poisoning.main()

    tables = _tables(capsys.readouterr().out, list(poisoning.DETECTORS))
    assert set(tables) == set(poisoning.DETECTORS)
    for rows in tables.values():
        assert set(rows) >= {"flip-20%", "backdoor concentrated"}
        assert "[" in rows["flip-20%"][3]  # FPR with its bootstrap interval
        assert "->" in rows["backdoor concentrated"][5]  # attack success before -> after screening
        assert float(rows["flip-20%"][1].split()[0]) >= 0.5  # 20% flips: caught
    # the detectors' quarantine leaves most of the patched, relabelled rows out of training
    quarantined = tables["RONI + detectors (quarantine-rows)"]["backdoor concentrated"][6]
    assert float(quarantined.split(",")[0]) >= 0.5


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
