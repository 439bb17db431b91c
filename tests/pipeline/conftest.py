"""Fixtures the pipeline tests share: a folder laid out as the digits demo leaves it, keys and signed data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from digits_demo.demo import create_keys, sign_contributions, sign_trusted
from digits_demo.prepare import prepare_digits

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh directory to run cycles in (config paths are relative to it), with keys and signed batch 0."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "digits-trust.yaml", tmp_path / "configs")
    root = tmp_path / "demo-work"
    create_keys(root / "keys")
    data = root / "data"
    contributed = prepare_digits(data).contributed()
    sign_trusted(data, root / "keys")
    sign_contributions(data, root / "keys", contributed)
    return tmp_path
