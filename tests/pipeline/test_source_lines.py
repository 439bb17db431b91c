"""A cycle's decisions in words: a source RONI refused is named with its clearest figure and the p-value that decided,
beside what the detectors found in its rows."""

from __future__ import annotations

from typing import Any, cast

from trainguard.pipeline.cycle_report import CycleReportDict
from trainguard.pipeline.cycle_state import ShardDecision
from trainguard.pipeline.source_lines import source_lines


def _refused(shard: str) -> ShardDecision:
    return ShardDecision(shard=shard, sha256="0" * 64, source="dave", accepted=False, check="roni", reason="flagged")


def _report(roni: dict[str, Any]) -> CycleReportDict:
    detection = {
        "detectors": {
            "label-issues": {"sources": [{"source": "dave", "flagged": True, "flagged_rows": 32, "rows": 300}]}
        }
    }
    return cast(CycleReportDict, {"detection": detection, "roni": roni})


def test_a_source_roni_flagged_is_named_with_its_worst_class_drop_and_the_deciding_p_value() -> None:
    flagged = {
        "source": "dave",
        "flagged": True,
        "union_impact": 0.1,
        "class_impacts": [0.0, 0.42, None],
        "adjusted_p_value": 0.0012,
        "reason": "source dave flagged",
    }
    shards = [_refused("dave/b1-0"), _refused("dave/b1-1")]
    (line,) = source_lines(shards, _report({"sources": [flagged], "decisions": []}))
    assert line.startswith("dave refused: label detector: 32 of 300 rows look mislabelled; ")
    assert "RONI: class 1 held-out margin -0.42 with this source's shards (p 0.001)" in line
    assert line.endswith(
        "Fix: " + "review the source's rows (report: roni) before it contributes again; `trainguard sources` lists it"
    )


def test_a_shard_roni_refused_alone_is_named_with_its_own_drop() -> None:
    decision = {"name": "dave/b1-0", "impact": 0.3, "class_impacts": [0.05, 0.1], "adjusted_p_value": 0.004}
    (line,) = source_lines([_refused("dave/b1-0")], _report({"sources": [], "decisions": [decision]}))
    assert "RONI: held-out margin -0.30 with this source's shard (p 0.004)" in line


def test_content_refused_in_an_earlier_cycle_says_so() -> None:
    (line,) = source_lines([_refused("dave/b1-0")], _report({"sources": [], "decisions": []}))
    assert "RONI: refused in an earlier cycle, the same content offered again" in line
