"""The cycle's plots, as matplotlib figures (for MLflow's `log_figure`) and as DVC plot data (JSON rows): robust
accuracy against eps, the gate's per-class accuracy before and after, and accuracy across cycles.

Pure data functions (`*_rows`) are separate from the drawing, so DVC and MLflow show the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from trainguard.defenses.heldout import HeldoutMetrics
from trainguard.pipeline.cycle_state import CycleRecord

ROBUST_PREFIX = "val/robust_acc_eps"


def robust_rows(robust_accuracy: Mapping[str, float]) -> list[dict[str, float]]:
    """[{eps, accuracy}] sorted by eps; eps given as text (`"0.1"`), accuracy NaN-free."""
    rows = [{"eps": float(eps), "accuracy": float(acc)} for eps, acc in robust_accuracy.items() if math.isfinite(acc)]
    return sorted(rows, key=lambda row: row["eps"])


def gate_rows(before: HeldoutMetrics, after: HeldoutMetrics) -> list[dict[str, float]]:
    """[{class, before, after}] per class present in the held-out set (NaN-free)."""
    return [
        {"class": float(index), "before": b, "after": a}
        for index, (b, a) in enumerate(zip(before.class_accuracy, after.class_accuracy, strict=True))
        if math.isfinite(a) and math.isfinite(b)
    ]


def cycle_rows(cycles: Sequence[CycleRecord]) -> list[dict[str, float]]:
    """[{cycle, val/acc, val/robust_acc_eps...}] for every cycle that trained (accepted or rejected)."""
    rows = []
    for record in cycles:
        picked = {k: v for k, v in record.metrics.items() if k == "val/acc" or k.startswith(ROBUST_PREFIX)}
        if record.status in ("accepted", "rejected") and picked:
            rows.append({"cycle": float(record.cycle), "accepted": float(record.status == "accepted"), **picked})
    return rows


@contextmanager
def _figure(title: str) -> Iterator[tuple[Any, Any]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.set_title(title)
    try:
        yield fig, ax
        fig.tight_layout()
    except BaseException:
        plt.close(fig)
        raise


def robust_figure(current: list[dict[str, float]], previous: list[dict[str, float]], cycle: int) -> Any:
    """Robust accuracy against eps for this cycle, beside the last accepted model's."""
    with _figure("robust accuracy vs eps") as (fig, ax):
        for rows, label, style in ((previous, "last accepted", "--"), (current, f"cycle {cycle}", "-")):
            if rows:
                ax.plot([r["eps"] for r in rows], [r["accuracy"] for r in rows], style, marker="o", label=label)
        ax.set_xlabel("eps (L-inf)")
        ax.set_ylabel("held-out accuracy under PGD")
        ax.set_ylim(0, 1.02)
        ax.legend()
    return fig


def gate_figure(rows: list[dict[str, float]]) -> Any:
    """Per-class held-out accuracy before and after training: what the gate compared."""
    with _figure("gate: per-class held-out accuracy") as (fig, ax):
        classes = [r["class"] for r in rows]
        ax.bar([c - 0.2 for c in classes], [r["before"] for r in rows], width=0.4, label="before")
        ax.bar([c + 0.2 for c in classes], [r["after"] for r in rows], width=0.4, label="after")
        ax.set_xticks(classes, [str(int(c)) for c in classes])
        ax.set_xlabel("class")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.legend()
    return fig


def cycles_figure(rows: list[dict[str, float]]) -> Any:
    """Clean and robust accuracy across cycles (hollow markers: rejected cycles)."""
    with _figure("accuracy across cycles") as (fig, ax):
        names = sorted({k for r in rows for k in r} - {"cycle", "accepted"})
        for name in names:
            points = [(r["cycle"], r[name], r["accepted"]) for r in rows if name in r]
            (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
            rejected = [p for p in points if not p[2]]
            ax.scatter([p[0] for p in rejected], [p[1] for p in rejected], facecolors="none", edgecolors="red")
            ax.scatter([p[0] for p in points if p[2]], [p[1] for p in points if p[2]], color=line.get_color())
        ax.set_xlabel("cycle")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    return fig
