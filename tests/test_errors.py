"""One root for every trainguard error: each package's family, and the errors the packages share, are under it."""

from __future__ import annotations

import pytest

import trainguard
from trainguard import defenses, pipeline, provenance
from trainguard.defenses.errors import DefenseError, ScreeningInputError
from trainguard.errors import TrainguardError
from trainguard.pipeline.errors import PipelineError
from trainguard.provenance.errors import ProvenanceError, ShardFormatError
from trainguard.ranks import RankError


@pytest.mark.parametrize(
    "error", [ProvenanceError, ShardFormatError, DefenseError, ScreeningInputError, PipelineError, RankError]
)
def test_every_trainguard_error_is_caught_by_the_one_root(error: type[Exception]) -> None:
    with pytest.raises(TrainguardError):
        raise error("a one-line reason")


def test_the_root_is_importable_from_trainguard_and_every_package() -> None:
    assert trainguard.TrainguardError is TrainguardError
    assert provenance.TrainguardError is defenses.TrainguardError is pipeline.TrainguardError is TrainguardError
    assert (provenance.ProvenanceError, defenses.DefenseError, pipeline.PipelineError) == (
        ProvenanceError,
        DefenseError,
        PipelineError,
    )
