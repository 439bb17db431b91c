"""Records a RONI screening locally (a JSON report and a PNG plot) and shapes it for a tracker: a compact summary
(level, counts, flagged sources, time), the screening config as params, and every candidate's and every source's
decision as one table each; `pipeline.tracking` sends them to MLflow in a fixed number of calls however many shards
were screened.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from trainguard.defenses.roni import ScreeningReport
from trainguard.files import atomic_write

DECISIONS_TABLE = "roni/decisions.json"
SOURCES_TABLE = "roni/sources.json"


@dataclass(frozen=True)
class ScreeningFiles:
    """The local record of one screening: the JSON report and the impacts plot.

    Attributes:
        json_path: `roni-report.json`: the report's `to_dict()`, strict JSON.
        plot_path: `roni-impacts.png`: each candidate's -log10 adjusted p-value against the level.
    """

    json_path: Path
    plot_path: Path


def plot_impacts(report: ScreeningReport, path: Path) -> Path:
    """Bar chart of each candidate's -log10 adjusted p-value (red when rejected) against the level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(report.decisions) + 2), 4))
    try:
        names = [d.name for d in report.decisions]
        colors = ["tab:green" if d.accepted else "tab:red" for d in report.decisions]
        heights = [-math.log10(d.adjusted_p_value) for d in report.decisions]
        ax.bar(range(len(names)), heights, color=colors, label="candidates")
        level = report.config.level
        ax.axhline(-math.log10(level), color="black", linestyle="--", label=f"level {level:g}")
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_ylabel("-log10 adjusted p-value")
        ax.set_title(f"RONI screening: adjusted p-value per candidate ({report.config.error_control})")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def write_screening(report: ScreeningReport, directory: Path) -> ScreeningFiles:
    """Writes `roni-report.json` (strict JSON, written atomically) and `roni-impacts.png` into `directory`.

    Args:
        report: What `screen_candidates` returned.
        directory: The folder to write into (created if missing; existing files of those names are replaced).

    Returns:
        The paths of the two files.
    """
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / "roni-report.json"
    atomic_write(json_path, json.dumps(report.to_dict(), indent=2, allow_nan=False).encode())
    return ScreeningFiles(json_path, plot_impacts(report, directory / "roni-impacts.png"))


def screening_summary(report: ScreeningReport) -> dict[str, float]:
    """The screening's headline numbers, the same in MLflow and in the local report."""
    return {
        "roni/level": report.config.level,
        "roni/candidates": float(len(report.decisions)),
        "roni/accepted": float(len(report.accepted)),
        "roni/rejected": float(len(report.rejected)),
        "roni/flagged_sources": float(len(report.flagged)),
        "roni/seconds": report.seconds,
    }


def screening_params(report: ScreeningReport) -> dict[str, object]:
    """The screening config and the calibration sizes it used, as `roni.<field>` params."""
    sizes = ",".join(str(size) for size in sorted({c.size for c in report.calibration.strata}))
    return {"roni.calibration_sizes": sizes, **{f"roni.{k}": v for k, v in asdict(report.config).items()}}


def decision_table(report: ScreeningReport) -> dict[str, list[object]]:
    """One column per decision field, one row per candidate (for `log_table`: one artifact, not a metric each)."""
    return _columns(report.to_dict()["decisions"])


def source_table(report: ScreeningReport) -> dict[str, list[object]]:
    """One column per source-decision field, one row per source."""
    return _columns(report.to_dict()["sources"])


def _columns(rows: object) -> dict[str, list[object]]:
    assert isinstance(rows, list)
    columns = list(rows[0]) if rows else []
    return {column: [row[column] for row in rows] for column in columns}
