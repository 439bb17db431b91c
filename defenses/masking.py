"""The gradient-masking flags AutoAttack's authors recommend (Croce & Hein, 2020, Sec. 5; Carlini et al., 2019,
"On evaluating adversarial robustness"): a model whose gradients mislead the white-box attacks shows it in two ways.

1. The black-box Square attack, which reads only scores, breaks rows APGD and FAB left robust. On models whose
   gradients are sound, Square after the white-box attacks lowers robust accuracy by at most a few tenths of a point
   in the authors' tables; so more than 1 % of the rows evaluated (and at least 3, so that one borderline row of a
   small subset does not flag) means the white-box attacks were misled.
2. Robust accuracy under the white-box attacks does not fall to ~0 at a large eps (half the bounds' range, in
   L-inf: any image can then be moved to mid-grey), where every row of a sound model can be broken: flagged when
   more than 1 % of the rows (and at least 3) survive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FRACTION = 0.01
MIN_ROWS = 3


def more_than_a_few(count: float, rows: float) -> bool:
    """Whether `count` of `rows` exceeds the flags' tolerance: more than 1 % of the rows and at least 3 rows."""
    return count >= MIN_ROWS and count > FRACTION * rows


def large_eps(lower: torch.Tensor, upper: torch.Tensor, like: torch.Tensor, norm: str) -> float:
    """The eps at which a sound model has no robust rows left: half the bounds' widest range per feature (L-inf),
    or the L2 norm of the half-ranges over one sample's features (L2)."""
    half = ((upper - lower) / 2).expand_as(like[:1])
    return float(half.max() if norm == "inf" else half.flatten().norm())


@dataclass(frozen=True)
class MaskingCheck:
    """Counts over the rows evaluated: those only the black-box attack broke (per eps, the largest), and those the
    white-box attacks left correct at `large_eps`."""

    rows: int
    black_box_rows: int | None
    large_eps: float | None
    large_eps_robust_rows: int | None

    @property
    def black_box(self) -> bool:
        """Square broke more than a few rows the white-box attacks had left robust."""
        return self.black_box_rows is not None and more_than_a_few(self.black_box_rows, self.rows)

    @property
    def large_eps_robust(self) -> bool:
        """More than a few rows resisted the white-box attacks at the large eps."""
        return self.large_eps_robust_rows is not None and more_than_a_few(self.large_eps_robust_rows, self.rows)

    @property
    def flagged(self) -> bool:
        return self.black_box or self.large_eps_robust

    def reasons(self) -> list[str]:
        """One line per flag raised, saying what was seen."""
        out = []
        if self.black_box:
            out.append(
                f"gradient masking suspected: black-box Square broke {self.black_box_rows} of {self.rows} rows the "
                "white-box attacks left robust"
            )
        if self.large_eps_robust:
            out.append(
                f"gradient masking suspected: {self.large_eps_robust_rows} of {self.rows} rows stay robust to the "
                f"white-box attacks at eps {self.large_eps:g} (half the bounds' range), where none should"
            )
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "flagged": self.flagged,
            "black_box": self.black_box,
            "large_eps_robust": self.large_eps_robust,
            "rows": self.rows,
            "black_box_rows": self.black_box_rows,
            "large_eps": self.large_eps,
            "large_eps_robust_rows": self.large_eps_robust_rows,
            "reasons": self.reasons(),
        }
