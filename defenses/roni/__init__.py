"""Reject On Negative Impact (Nelson et al. 2009) per candidate shard and per source, with a stated error rate.

Each candidate fine-tunes a copy of the current model for a fixed budget; its impact is how far the mean held-out
margin (the true class's logit over the best other: `Task.margin`), overall and per class, is pushed down, read at
several checkpoints of the fine-tuning. The margin is linear in the outputs where the true-class probability
saturates on a confident model, so a few flipped labels register; the checkpoints matter because clean rows are fit
within a few steps while flipped ones keep pushing, and a concentrated push (a targeted flip, a backdoor) shows early
while later steps add the noise of the copy forgetting. For other tasks (`task=`) the copies fine-tune on the task's
loss and the margin is the task's; the per-class metrics are classification's, other tasks are screened on the
overall impact. All copies train together (`defenses.copies`).

The decision is a conformal test (`defenses.conformal`): a candidate is compared with clean calibration draws of
its own label histogram (stratified: per class, as many trusted rows of that class as the candidate holds). Size
matters (one fine-tune on 900 rows moves the model less than one on 50) and so does class composition: a clean shard
of 3 classes moves the other classes' held-out accuracy far more than an all-class draw does, and held to all-class
draws a clinic that sees a few conditions would be refused for what it is. Other tasks (`task=`), and
`stratify=False`, draw n rows from the whole pool instead, shared by sizes within `size_tolerance`. The overall and
per-class impacts at every checkpoint are reduced to one statistic (`conformal.Standardizer`: the largest, over
checkpoints, norm of the metrics pushed down), so per-class and per-checkpoint readings spend the same budget. Its
center and scale are fitted per candidate size and class set, on `SCALE_DRAWS` separate draws of that size from the
trusted rows of those classes (not per histogram: that would double the cost of every distinct histogram; the p-value
stays valid whatever fixed score is used, since the candidate and its histogram's draws are exchangeable under the
null).
The p-value is sequential (Besag & Clifford 1991): a histogram's draws are fine-tuned in stages, in batches, until
every candidate of that histogram has `sequential_hits` draws scoring at least its own or `calibration_draws` were
drawn, so a clearly clean candidate costs a few dozen draws. A class the trusted rows lack is drawn from all of
them (a fallback rather than a refusal, which would let one rare label stop the cycle; the draw keeps the
candidate's size, and that candidate's test is only approximate). Draws can only stand for fresh rows while they
need a small share of the trusted rows of a class: a draw of 50 rows of a class from 40 trusted ones repeats rows,
fine-tunes on fewer distinct examples and moves the model less than 50 fresh rows do, so a clean candidate's impact
looks large next to its draws (on digits with ~40 trusted rows per class, clean shards of 2-4 classes, tested whole,
were refused at 0.042 at level 0.01, their sources' unions at 8 times the level). A stratified candidate holding more
than `pool_fraction` of the trusted rows of a class is therefore tested on a seeded subsample with that many rows of
the class: the rate of any poison in it is kept, and its draws are as diverse as the candidate (clean 2-4 class
shards on digits, full scope: refused at 0.007, 2/288 over 6 seeds). The default share, 0.4, tests a targeted
shard whole where a quarter cut it (digits CNN, 30 trusted rows a class, 2 seeds: 3->8 flips caught at 0.85 with
0.25, 0.925 with 0.4); at the head scope's tuned rate on the MLP, clean 2-4 class shards are refused at 0.05-0.14
whatever the share (0.1 to whole): the rate, not the share, drives that mismatch.
With `trim` (off by default), each copy leaves out its shard's most contradicted rows (2%, at least one row: those of
lowest margin under the deployed model), and every calibration draw leaves out its own the same way, so the test
stays exchangeable. A few classes' clean rows hold, now and then, one the model flatly contradicts (on digits, an 8
it gives probability 0): fine-tuned on, that one row pushes the held-out margins like a flipped label, and the draws,
from ~40 trusted rows a class, rarely hold one (at seed 2 of the poisoning benchmark, 9 of 40 fresh clean shards of
8s and 9s were refused, each holding the same row). Trimmed at 2%, clean 2-4 class shards were refused at 0.017
instead of 0.057 (MLP, 20 seeds), but targeted 3->8 shards were caught at 0.875 instead of 0.975, and on the
pipeline's CNN at 0.50 instead of 0.92 (6 seeds): one trimmed row of ~5 is much of a targeted attack's signal.
Draws are a two-level bootstrap of the trusted data (per class when stratified): the pool is resampled,
then rows are drawn with replacement from the resample. A fresh contribution differs from the trusted pool by its
own sampling noise (variance ~ 1/n) plus the pool's (~ 1/N); drawing without replacement from the pool would have
neither the pool's noise nor, once n nears N, the shard's: calibration tighter than fresh shards, and clean
contributions rejected far more often than the level says.

No dilution: a source's shards are also judged together, by screening their union (histogram-matched) and by combining
the p-values of all its shard tests, earlier cycles' included (Brown's method: Fisher's for tests that share the
trusted sample, see `conformal`), and of any other test of the source's rows this cycle (`evidence`, e.g. the
label-issue detector's: flipped labels that each move the model a little are many rows the model confidently
disagrees with); a flagged source loses every shard. With
`error_control="per-candidate"` (the default) every clean shard is rejected with probability at most `level` (its
own test and its source's share the budget, Bonferroni); "bh" / "by" control the false discovery rate across the
cycle's shard and source tests instead.

The scope is by default the last layer(s) on features computed once per row (`defenses.features`), and the whole
network only where no Linear head gives the model's output, the model takes extra inputs or a forward hook, or when
asked (`scope="full"`). The learning
rate ("auto") is tuned on the trusted rows alone: of the rates on a grid at which clean probe copies stay finite and
keep their held-out soft accuracy, the one at which probe draws with a tenth of their labels flipped stand furthest
above clean ones. The rate decides most of the power: too large and the copies forget, which is noise in every
impact (digits CNN, head scope, stratified draws, 2 seeds: 10%-flipped shards caught at 0.17-0.40 at rate 0.05 and
0.87-0.92 at 0.02, targeted 3->8 flips at 0.07 against 0.98).

The package holds one part of the method a module: `config` (what a screening is asked to do), `candidates` (what is
screened, cut to what the trusted rows can stand for), `draws` (the clean calibration draws), `finetune` (what the
copies fine-tune and what it did to the held-out set), `learning_rate` (the "auto" rate), `calibration` (the rate,
scales and strata kept between screenings), `sequential` (the p-values), `decision` (sources judged whole, the
verdicts), `report` (`ScreeningReport`) and `screening` (`screen_candidates`, step by step).
"""

from __future__ import annotations

from trainguard.defenses.roni.calibration import Calibration, ScaleCalibration, Stratum
from trainguard.defenses.roni.candidates import Candidate, class_cap, group_by_source, supported_level
from trainguard.defenses.roni.config import (
    DRAW_STREAM,
    LR_GRID,
    LR_PROBE_DRAWS,
    MIN_POOL_ROWS,
    PROBE_FLIPS,
    PROBE_PATIENCE,
    PROBE_STREAM,
    SCALE_DRAWS,
    SCALE_STREAM,
    ScreeningConfig,
)
from trainguard.defenses.roni.decision import CandidateDecision, SourceDecision
from trainguard.defenses.roni.draws import bootstrap_draws, stratified_draws
from trainguard.defenses.roni.finetune import ScreeningProgress
from trainguard.defenses.roni.report import ScreeningReport
from trainguard.defenses.roni.screening import screen_candidates

__all__ = [
    "DRAW_STREAM",
    "LR_GRID",
    "LR_PROBE_DRAWS",
    "MIN_POOL_ROWS",
    "PROBE_FLIPS",
    "PROBE_PATIENCE",
    "PROBE_STREAM",
    "SCALE_DRAWS",
    "SCALE_STREAM",
    "Calibration",
    "Candidate",
    "CandidateDecision",
    "ScaleCalibration",
    "ScreeningConfig",
    "ScreeningProgress",
    "ScreeningReport",
    "SourceDecision",
    "Stratum",
    "bootstrap_draws",
    "class_cap",
    "group_by_source",
    "screen_candidates",
    "stratified_draws",
    "supported_level",
]
