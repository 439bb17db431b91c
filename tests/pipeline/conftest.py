"""Fixtures the pipeline tests share: a folder laid out as the digits demo leaves it, keys and signed data."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from digits_demo.demo import create_keys, sign_contributions, sign_trusted
from digits_demo.prepare import prepare_digits

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class DigitsProject:
    """A folder laid out as the digits demo leaves it before signing: the trust policy, keys, prepared batch 0."""

    root: Path
    keys: Path
    data: Path
    contributed: dict[str, str]

    def sign(self) -> None:
        """The curator signs the trusted base and held-out set, the data owner the contributions."""
        sign_trusted(self.data, self.keys)
        sign_contributions(self.data, self.keys, self.contributed)


@pytest.fixture
def digits_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> DigitsProject:
    """The digits layout in a fresh directory the test runs in (config paths are relative to it), not yet signed:
    a test may change the data first."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "digits-trust.yaml", tmp_path / "configs")
    keys, data = tmp_path / "demo-work" / "keys", tmp_path / "demo-work" / "data"
    create_keys(keys)
    return DigitsProject(tmp_path, keys, data, prepare_digits(data).contributed())


@pytest.fixture
def workdir(digits_project: DigitsProject) -> Path:
    """A fresh directory to run cycles in, with keys and signed batch 0."""
    digits_project.sign()
    return digits_project.root
