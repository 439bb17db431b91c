"""`benchmarks/gpu.py`'s adversarial section runs on CPU at a tiny width, so the GPU benchmark cannot rot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_the_adversarial_section_measures_callback_and_hand_loop_side_by_side(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu

    rows = gpu.bench_adversarial(torch.device("cpu"), 2, batch_size=4, batches=2, warmup=1, rounds=1)

    assert [row.label for row in rows] == ["clean", "PGD-7", "PGD-7, log_success=False", "FGSM-RS"]
    for row in rows:
        lightning, hand = (float(row.cells[c].replace(",", "")) for c in ("callback img/s", "hand AMP loop img/s"))
        assert lightning > 0 and hand > 0
        assert float(row.cells["callback / hand"]) > 0
    gpu.print_table("adversarial", rows)
    assert "| PGD-7 |" in capsys.readouterr().out
