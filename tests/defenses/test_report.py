"""The local screening record: strict JSON and a PNG plot, written safely; its tracking is in
tests/pipeline/test_tracking.py."""

from __future__ import annotations

import json
from pathlib import Path

from tests.defenses.conftest import screening_report
from trainguard.defenses.report import decision_table, source_table, write_screening


def test_the_local_report_is_strict_json_beside_a_png_plot(tmp_path: Path) -> None:
    files = write_screening(screening_report(), tmp_path / "cycle-1")
    local = json.loads(files.json_path.read_text())
    assert [d["accepted"] for d in local["decisions"]] == [True, False]
    assert local["decisions"][0]["class_impacts"] == [0.01, None]  # strict JSON: no Infinity/NaN
    assert files.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_tables_hold_one_row_per_candidate_and_per_source() -> None:
    table = decision_table(screening_report())
    assert table["name"] == ["shard-a", "shard-m"] and table["accepted"] == [True, False]
    assert table["p_value"] == [0.5, 0.002]
    sources = source_table(screening_report())
    assert sources["source"] == ["alice"] and sources["flagged"] == [False]


def test_the_local_report_never_follows_a_symlink_planted_at_its_temp_name(tmp_path: Path) -> None:
    folder, victim = tmp_path / "cycle-3", tmp_path / "victim"
    folder.mkdir()
    victim.write_bytes(b"precious")
    (folder / ".roni-report.json.tmp").symlink_to(victim)
    files = write_screening(screening_report(), folder)
    assert victim.read_bytes() == b"precious"
    assert json.loads(files.json_path.read_text())["decisions"][0]["name"] == "shard-a"
