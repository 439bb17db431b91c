"""The screening, step by step (`screen_candidates`):

1. check the inputs: candidates non-empty and uniquely named, the same extra inputs everywhere, targets of the task;
2. add each source's union of shards as one more candidate and, stratified, cut every candidate to `pool_fraction` of
   the trusted rows of each class it holds (`candidates`);
3. choose what the copies fine-tune, the whole model or its head on frozen features, and read the deployed model on
   the held-out set (`finetune`);
4. calibrate: the learning rate on the trusted rows alone (`learning_rate`), then a standardisation per size and
   class set on separate clean draws (`calibration`);
5. fine-tune a copy per candidate and measure how far it pushed the held-out margin down;
6. test each candidate against clean draws of its label histogram, drawn in stages until its sequential p-value is
   decided (`sequential`);
7. judge each source whole, adjust the p-values and decide (`decision`), and report (`report`)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
from torch import nn

from trainguard.defenses.errors import ScreeningInputError
from trainguard.defenses.forward import ModuleForward
from trainguard.defenses.heldout import LabeledData
from trainguard.defenses.roni.calibration import Calibration, _calibrated, _key
from trainguard.defenses.roni.candidates import Candidate, _within_pool, group_by_source
from trainguard.defenses.roni.config import LR_PROBE_DRAWS, ScreeningConfig
from trainguard.defenses.roni.decision import _decide, _source_evidence
from trainguard.defenses.roni.finetune import ScreeningProgress, _Count, _heldout_scores, _Impacts, _scoped
from trainguard.defenses.roni.report import ScreeningReport
from trainguard.defenses.roni.sequential import _sequential
from trainguard.defenses.task import Task, as_task


def screen_candidates(
    model: nn.Module,
    base_data: LabeledData,
    holdout: LabeledData,
    candidates: Sequence[Candidate],
    config: ScreeningConfig | None = None,
    *,
    history: Mapping[str, Sequence[float]] | None = None,
    evidence: Mapping[str, Sequence[float]] | None = None,
    calibration: Calibration | None = None,
    task: Task | str | None = None,
    forward: ModuleForward | None = None,
    progress: ScreeningProgress | None = None,
) -> ScreeningReport:
    """Screens each candidate shard and each source against clean draws from `base_data` (trusted data).

    `base_data` should be data the current model has not been fitted on (e.g. a trusted calibration split) and
    representative of contributions: clean data the model already fits moves the held-out set less than new clean
    data, which makes the screening stricter. `history` maps a source to its shard p-values of earlier cycles (they
    join its combined p-value). `evidence` maps a source to p-values of other tests of its rows this cycle (the
    label-issue detector's, `pipeline.detection`); they join the combination too (Brown's method assumes them correlated
    with the shard tests as those are with each other). `calibration`, from an earlier report on the same
    model, trusted and held-out data, skips the draws it already holds. `task` (default classification) sets the
    fine-tuning loss and the held-out soft accuracy; `forward(module, batch, x)` reads the model's extra inputs from
    `LabeledData.batch` (every data set then carries the same extras). `progress(done, planned)` counts the
    fine-tuned copies (calibration draws and candidates) for a display.

    The model itself is not changed: copies of it (or of its head) are fine-tuned.

    Args:
        model: The current (deployed) model.
        base_data: Trusted rows the clean calibration draws come from.
        holdout: Held-out rows the impacts are measured on.
        candidates: The shards offered, uniquely named, none empty.
        config: Budget, scope and decision rule (None: `ScreeningConfig()`).
        history: Source -> its shard p-values of earlier cycles.
        evidence: Source -> p-values of other tests of its rows this cycle.
        calibration: An earlier report's calibration of the same model, trusted and held-out data.
        task: The task (a `Task` or a built-in's name; None: classification).
        forward: `forward(module, batch, x)` for a model with extra inputs (None: `model(x)`).
        progress: `progress(done, planned)`, called as copies are fine-tuned.

    Returns:
        Every candidate's and every source's decision, and the calibration used.

    Raises:
        ScreeningInputError: No candidates, an empty held-out set or candidate, names not unique, extra inputs
            that differ between data sets, or a head-scope model whose head cannot be found or checked.
        TaskMismatchError: Targets or outputs that do not fit the task, or an unknown task name.

    Example::

        from trainguard import ScreeningConfig, screen_candidates
        from trainguard.defenses import Candidate, LabeledData

        candidates = [Candidate(name, source, LabeledData.of(x, y)) for name, source, x, y in offered]
        report = screen_candidates(model, trusted, holdout, candidates, ScreeningConfig(level=0.01))
        for decision in report.rejected:
            print(decision.name, decision.reason)
    """
    config = config or ScreeningConfig()
    task = as_task(task)
    if not candidates:
        raise ScreeningInputError("no candidates to screen")
    if len(holdout) == 0:
        raise ScreeningInputError("the held-out set is empty")
    for candidate in candidates:
        if len(candidate.data) == 0:
            raise ScreeningInputError(f"candidate {candidate.name!r} from source {candidate.source!r} is empty")
    if len({c.name for c in candidates}) != len(candidates):
        raise ScreeningInputError("candidate names must be unique")
    for data in (base_data, *(c.data for c in candidates)):
        if sorted(data.extras) != sorted(holdout.extras):
            raise ScreeningInputError(
                f"the held-out set has extra inputs {sorted(holdout.extras)} but a screened data set has "
                f"{sorted(data.extras)}: give every data set the same extras"
            )
    for data in (holdout, base_data, *(c.data for c in candidates)):
        task.check_targets(data.y)
    started = time.perf_counter()
    by_class = task.kind == "classification"
    num_classes = (
        (config.num_classes or int(max(holdout.y.max(), base_data.y.max(), *(c.data.y.max() for c in candidates))) + 1)
        if by_class
        else 1
    )
    shards_of = Counter(c.source for c in candidates)
    unions = [u for u in group_by_source(candidates) if shards_of[u.source] > 1]
    tried = [*candidates, *unions]
    if by_class and config.stratify and config.pool_fraction is not None:
        pool = np.bincount(base_data.y.long().numpy(), minlength=num_classes)
        tried = [_within_pool(c, pool, config.pool_fraction, config.seed) for c in tried]
    count = _Count(progress)
    probing = calibration is None and config.lr == "auto"
    count.plan(probing * LR_PROBE_DRAWS + len(tried))  # clean draws are planned stage by stage, as they are drawn
    scoped = _scoped(model, base_data, holdout, tried, config, task, forward, count)
    base = _heldout_scores(scoped.net, scoped.holdout, task, scoped.forward).double()
    impacts = _Impacts(base, holdout.y, num_classes, config.per_class and by_class)
    keys = [_key(c.data, num_classes if by_class and config.stratify else None) for c in tried]
    calibration = _calibrated(scoped, keys, impacts, config, calibration)
    run = scoped.finetuned(scoped.candidates, calibration.lr, config, calibration.chunk_size)
    values = impacts.of(run.scores)
    calibration, tests = _sequential(scoped, keys, values, calibration, impacts, config)
    shard_tests = tests[: len(candidates)]
    union_tests = dict(zip([u.source for u in unions], tests[len(candidates) :], strict=True))
    tested = [len(c.data) for c in tried[: len(candidates)]]
    sources = _source_evidence(
        candidates, tested, len(base_data), shard_tests, union_tests, history or {}, evidence or {}, config
    )
    decisions, source_decisions = _decide(candidates, tested, shard_tests, sources, config)
    return ScreeningReport(
        decisions=decisions,
        sources=source_decisions,
        calibration=calibration,
        config=config,
        seconds=time.perf_counter() - started,
        base_soft_accuracy=float(base[:, 0].mean()),
        head=scoped.head,
    )
