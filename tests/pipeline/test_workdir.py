"""The work folder's paths (`WorkDir`): each cycle's names parse back to its number, and nothing else does."""

from __future__ import annotations

from pathlib import Path

from trainguard.pipeline.workdir import RECEIPT_SUFFIX, WorkDir, cycle_name, cycle_number


def test_every_numbered_path_of_a_cycle_parses_back_to_its_number() -> None:
    work = WorkDir(Path("work"))
    for cycle in (1, 42, 9999, 12345):
        assert cycle_number(work.model(cycle).name) == cycle
        assert cycle_number(work.receipt(cycle).name, RECEIPT_SUFFIX) == cycle
        assert cycle_number(work.report(cycle).name, ".json") == cycle
        assert cycle_number(work.read_log(cycle).name, ".jsonl") == cycle
        assert cycle_number(work.screening(cycle).name) == cycle
        assert cycle_number(work.allow_table(cycle).name, ".allow.parquet") == cycle
        assert cycle_number(work.decisions_table(cycle).name, ".decisions.parquet") == cycle
    assert work.report(7) == Path("work/reports/cycle-0007.json")
    assert work.model(7).parent == work.models and work.receipt(7).parent == work.reports
    assert work.decisions_table(7) == Path("work/reports/cycle-0007.decisions.parquet")
    assert work.allow_table(7).parent == work.reports


def test_names_not_built_by_cycle_name_are_no_cycle() -> None:
    for name in ("cycle-7", "cycle-0007.json.tmp", "cycle-0007x", "cycle-1234567890", "Cycle-0007", "report.json"):
        assert cycle_number(name) is None and cycle_number(name, ".json") is None
    assert cycle_number(cycle_name(7) + ".receipt.json") is None  # a receipt is not a model folder
