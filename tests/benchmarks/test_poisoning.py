"""`benchmarks/poisoning.py --quick` runs end to end on a scenario of each kind, so the benchmark cannot rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_quick_run_prints_rates_intervals_and_attack_success(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import poisoning

    argv = ["poisoning.py", "--quick", "--seeds", "1", "--only", "flip-20%", "backdoor concentrated"]
    monkeypatch.setattr(sys, "argv", argv)
    poisoning.main()

    out = capsys.readouterr().out
    rows = {line.split("|")[0].strip(): line for line in out.splitlines() if "|" in line}
    assert set(rows) >= {"flip-20%", "backdoor concentrated"}
    assert "[" in rows["flip-20%"].split("|")[3]  # FPR with its bootstrap interval
    assert "->" in rows["backdoor concentrated"].split("|")[5]  # attack success before -> after screening
    assert float(rows["flip-20%"].split("|")[1].split()[0]) >= 0.5  # 20% flips: caught
