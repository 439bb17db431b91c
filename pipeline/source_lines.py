"""A cycle's decisions in words: one line per source that lost shards or rows, naming the clearest evidence and
what to do about it. The statistics behind each line stay in the JSON report and MLflow (and `--verbose` prints
the per-shard reasons); these lines are what a user reads first."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TypeGuard

from trainguard.pipeline.cycle_report import CycleReportDict, DetectionSection, RoniSection
from trainguard.pipeline.cycle_state import ShardDecision

DETECTOR_WORDS = {
    "label-issues": ("label detector", "look mislabelled"),
    "spectral": ("spectral detector", "look like a backdoor's (spectral signature)"),
    "clustering": ("activation clustering", "form a cluster of their own"),
}
FIXES = {
    "verify": "re-sign the shard from its original, or take it out of the manifest",
    "validate": "correct the data, or the config's validation section if the data is right",
    "limits": "have other sources contribute, or raise limits.max_fraction_per_source",
    "operator": "`trainguard sources release` when the source may be trained on again",
    "detection": "review the source's flagged rows (report: detection) before it contributes again",
    "roni": "review the source's rows (report: roni) before it contributes again; `trainguard sources` lists it",
}
VERIFY_WORDS = {
    "digest-mismatch": "its bytes differ from the signed digest (changed after signing)",
    "size-mismatch": "its size differs from the signed size (changed after signing)",
    "truncated": "it is shorter than signed",
    "appended": "bytes were appended after signing",
    "chunk": "a signed chunk's digest differs (changed after signing)",
    "missing": "the signed file is missing",
    "format": "it cannot be decoded",
    "intake-ceiling": "decoding it would pass limits.max_decoded_bytes",
}
"""What a verify refusal's reason (its first word) means; the digests and details stay in the report."""
CHECK_WORDS = {
    "verify": "signature or read check",
    "validate": "validation",
    "limits": "source cap",
    "operator": "operator",
}


def source_lines(shards: Sequence[ShardDecision], report: CycleReportDict) -> tuple[str, ...]:
    """One line per source with a refused shard this cycle (then per source with rows left out of training), from
    the cycle's decisions and the report's detection, RONI and row sections."""
    offered: dict[str, list[ShardDecision]] = defaultdict(list)
    for decision in shards:
        if decision.check != "trusted":
            offered[decision.source].append(decision)
    detected = _detector_findings(report.get("detection", {}))
    left_out = _rows_left_out(shards, report)
    lines = []
    for source, decisions in offered.items():
        refused = [d for d in decisions if not d.accepted]
        if not refused:
            continue
        checks = list(dict.fromkeys(d.check for d in refused))
        evidence = [_evidence(check, source, refused, detected, report.get("roni", {})) for check in checks]
        whole = "refused" if len(refused) == len(decisions) else f"{len(refused)} of {len(decisions)} shards refused"
        fix = FIXES.get(checks[0], "see the report")
        rows = left_out.pop(source, None)
        also = f"; from its accepted shards, {rows}" if rows else ""
        lines.append(f"{source} {whole}: {'; '.join(evidence)}{also}. Fix: {fix}")
    return (*lines, *(f"{source} accepted, {rows}" for source, rows in left_out.items()))


def _evidence(
    check: str,
    source: str,
    refused: Sequence[ShardDecision],
    detected: Mapping[str, list[str]],
    roni: RoniSection,
) -> str:
    mine = [d for d in refused if d.check == check]
    if check in ("roni", "detection"):
        parts = list(detected.get(source, ()))
        if check == "roni":
            parts.append(_roni_words(source, mine, roni))
        return "; ".join(parts) if parts else f"{check}: {mine[0].reason}"
    words = CHECK_WORDS.get(check, check)
    more = f" (and {len(mine) - 1} more shards)" if len(mine) > 1 else ""
    reason = mine[0].reason
    if check == "verify":  # at intake, or at training's read ("changed after intake: <reason>: ...")
        reason = VERIFY_WORDS.get(reason.removeprefix("changed after intake: ").split(":", 1)[0], reason)
    return f"{words}: {reason}{more}"


def _detector_findings(detection: DetectionSection) -> dict[str, list[str]]:
    """Per source, a phrase for each detector that flagged it: '<detector>: 85 of 90 rows look mislabelled'."""
    found: dict[str, list[str]] = defaultdict(list)
    for name, summary in detection.get("detectors", {}).items():
        label, meaning = DETECTOR_WORDS.get(name, (name, "are flagged"))
        for finding in summary.get("sources", ()):
            if finding["flagged"]:
                found[finding["source"]].append(
                    f"{label}: {finding['flagged_rows']} of {finding['rows']} rows {meaning}"
                )
    return found


def _roni_words(source: str, refused: Sequence[ShardDecision], roni: RoniSection) -> str:
    """RONI's clearest figure: the largest drop of the held-out margin (a class's, else overall) that fine-tuning on
    the source's shards caused, with the p-value that decided."""
    judged = next((s for s in roni.get("sources", ()) if s["source"] == source and s["flagged"]), None)
    names = {d.shard for d in refused}
    decisions = [d for d in roni.get("decisions", ()) if d["name"] in names]
    if judged is None and not decisions:
        return "RONI: refused in an earlier cycle, the same content offered again"
    if judged is not None and judged["class_impacts"]:
        drop, p, what = _worst(judged["union_impact"], judged["class_impacts"]), judged["adjusted_p_value"], "shards"
    elif decisions:
        worst = max(decisions, key=lambda d: _worst(d["impact"], d["class_impacts"])[1])
        drop = _worst(worst["impact"], worst["class_impacts"])
        p = judged["adjusted_p_value"] if judged is not None else worst["adjusted_p_value"]
        what = "shards" if judged is not None else "shard" if len(decisions) == 1 else "worst shard"
    elif judged is not None:
        return f"RONI: {judged['reason']}"
    metric, value = drop
    return f"RONI: {metric} {-value:+.2f} with this source's {what} (p {p:.1g})"


def _worst(overall: float | None, classes: Sequence[float | None]) -> tuple[str, float]:
    """The metric that dropped most: a class's held-out margin, or the overall one."""
    drops = [(f"class {k} held-out margin", v) for k, v in enumerate(classes) if _finite(v)]
    if _finite(overall):
        drops.append(("held-out margin", float(overall)))
    return max(drops, key=lambda d: d[1], default=("held-out margin", math.nan))


def _finite(value: float | None) -> TypeGuard[float]:
    return value is not None and math.isfinite(value)


def _rows_left_out(shards: Sequence[ShardDecision], report: CycleReportDict) -> dict[str, str]:
    """Per source still trained on, the rows training skips in words: flagged by the detectors (quarantine-rows) or
    copied from another source's shard."""
    source_of = {d.shard: d.source for d in shards if d.accepted}
    flagged = report.get("detection", {}).get("quarantined_rows", {})
    copied = report.get("copied_rows", {})
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for index, rows in enumerate((flagged, copied)):
        for shard, listed in rows.items():
            if shard in source_of:
                counts[source_of[shard]][index] += len(listed)
    words = {}
    for source, (by_detectors, by_copy) in counts.items():
        parts = [f"{by_detectors} flagged by the detectors"] * bool(by_detectors)
        parts += [f"{by_copy} copied from another source's shard"] * bool(by_copy)
        if parts:
            total = by_detectors + by_copy
            words[source] = f"{total} row{'s' * (total != 1)} left out of training ({', '.join(parts)})"
    return words
