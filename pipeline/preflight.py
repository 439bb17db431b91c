"""The checks a cycle runs before it begins (and `trainguard check` runs alone): every file, key, trust policy and
manifest the config names, and one forward pass of the model, with the loss the defenses use, on one verified
sample. Each failure is one line: a missing or unusable file is bad input (ConfigError, exit 2), a check that
fails is a PreflightError (exit 1). Nothing here trains or writes state, so a failure leaves the project as it was.

What cannot be known up front (the other shards' digests, a manifest swapped after this check, rollback against
the cycle's signed state) is checked again where the cycle reads it.

`foresee` (run by `trainguard check`, after these) applies the cycle's own refusals that need no training to the data
now in place: rollback against the cycle's signed state, the intake, validation and the per-source caps, and says what
the cycle would refuse; it warns where class coverage or the held-out set's size leave the gate blind.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainguard.pipeline.config import CycleConfig
from trainguard.pipeline.errors import ConfigError, CycleAbortedError, PreflightError
from trainguard.provenance.errors import ProvenanceError
from trainguard.provenance.keys import public_key_path
from trainguard.provenance.manifest_ref import ManifestRef


@dataclass(frozen=True)
class Passed:
    """One check and what it established: `ok`; `refuse`, a shard the cycle would refuse while going on; or `warn`,
    something that does not stop the cycle but weakens it."""

    check: str
    detail: str
    verdict: str = "ok"


def preflight(config: CycleConfig) -> tuple[Passed, ...]:
    """Runs every up-front check in order (files, keys, trust, manifests, model); raises on the first failure.

    Nothing is trained or written, so a failure leaves the project as it was; `run_cycle` runs it first.

    Args:
        config: The cycle config (`load_config`).

    Returns:
        What each check established, in order.

    Raises:
        ConfigError: A file or folder the config names does not exist.
        PreflightError: A check failed (`check` names it: files, keys, trust, manifests, model).

    Example::

        from trainguard import PipelineError, load_config, preflight

        try:
            passed = preflight(load_config("configs/digits.yaml"))
        except PipelineError as error:
            print("not ready:", error)
    """
    passed = [_files(config), *_keys(config)]
    verified = _manifests(config)
    passed.append(Passed("manifests", f"{len(verified)} signed manifests verify under their trust policies"))
    passed.append(_model(config, verified))
    return tuple(passed)


def _named_files(config: CycleConfig) -> Iterator[tuple[str, Path, bool]]:
    """(config key, path, is a folder) of everything the config names that must exist before a cycle."""
    yield "dataset.trust", config.dataset.trust, False
    for key, ref in _refs(config):
        yield f"{key}.manifest", ref.manifest, False
        if ref.data_dir is not None:
            yield f"{key}.data_dir", ref.data_dir, True
        if ref.trust is not None:
            yield f"{key}.trust", ref.trust, False
    yield "output.model_signing_key", config.output.model_signing_key, False
    yield "output.model_signing_key (its .pub)", public_key_path(config.output.model_signing_key), False
    if config.output.attestation_key is not None:
        yield "output.attestation_key", config.output.attestation_key, False


def _refs(config: CycleConfig) -> list[tuple[str, ManifestRef]]:
    training = [(f"dataset.training[{i}]", ref) for i, ref in enumerate(config.dataset.training)]
    return [*training, ("dataset.holdout", config.dataset.holdout)]


def _files(config: CycleConfig) -> Passed:
    named = list(_named_files(config))
    for key, path, folder in named:
        present = path.is_dir() if folder else path.is_file()
        kind = "folder" if folder else "file"
        if not present and path.exists():  # a FIFO or device planted where a file belongs: refused unread
            raise PreflightError(f"{key}: {path} is not a regular {kind}", check="files")
        if not present:
            raise ConfigError(f"{key}: {kind} {path} does not exist (relative paths start at {Path.cwd()})", key=key)
    return Passed("files", f"{len(named)} files and folders the config names exist")


def _keys(config: CycleConfig) -> list[Passed]:
    """The model-signing key must be ECDSA P-256 (OpenSSF model signing), its .pub its public half; the
    attestation key any key trainguard signs with."""
    from trainguard.provenance.keys import load_signing_key, load_verifying_key

    def load(key: str, path: Path) -> Any:
        try:
            return load_signing_key(path)
        except ProvenanceError as error:
            raise PreflightError(f"{key}: {error}", check="keys") from None

    model_key = load("output.model_signing_key", config.output.model_signing_key)
    if model_key.key_type != "ecdsa-p256":
        raise PreflightError(
            f"output.model_signing_key: {config.output.model_signing_key} is an {model_key.key_type} key; model "
            "signing needs ECDSA P-256 (make one with `trainguard keygen --type ecdsa-p256`)",
            check="keys",
        )
    public = public_key_path(config.output.model_signing_key)
    try:
        matches = load_verifying_key(public).keyid == model_key.keyid
    except ProvenanceError as error:
        raise PreflightError(f"output.model_signing_key: {error}", check="keys") from None
    if not matches:
        raise PreflightError(f"output.model_signing_key: {public} is not the public half of the key", check="keys")
    passed = [
        Passed("keys", f"model signing key {config.output.model_signing_key}: ecdsa-p256, keyid {model_key.keyid[:16]}")
    ]
    if config.output.attestation_key is not None:
        attestation = load("output.attestation_key", config.output.attestation_key)
        passed.append(Passed("keys", f"attestation key {config.output.attestation_key}: {attestation.key_type}"))
    return passed


def _manifests(config: CycleConfig) -> dict[str, Any]:
    """Each manifest opened as the cycle opens it (trust policy, signatures, granted claims, dataset, expiry);
    rollback is checked against the cycle's signed state when the cycle reads it."""
    from trainguard.provenance.policy import load_trust
    from trainguard.provenance.rollback import RollbackRecords
    from trainguard.provenance.verify import open_manifest

    verified: dict[str, Any] = {}
    for key, ref in _refs(config):
        trust_key = f"{key}.trust" if ref.trust is not None else "dataset.trust"
        try:
            policy = load_trust(ref.trust or config.dataset.trust)
        except ProvenanceError as error:
            raise PreflightError(f"{trust_key}: {error}", check="trust") from None
        try:
            verified[key] = open_manifest(
                ref.manifest, policy, dataset=ref.dataset, data_dir=ref.data_dir, state=RollbackRecords()
            )
        except ProvenanceError as error:
            raise PreflightError(f"{key}.manifest: {error.reason}: {error}", check="manifests") from None
    return verified


def _model(config: CycleConfig, verified: dict[str, Any]) -> Passed:
    """One held-out sample, read and hash-checked, through the model and the defenses' loss, down to the input
    gradient the attacks follow."""
    import torch

    inputs, targets = _one_sample(config, verified["dataset.holdout"])
    shape = tuple(config.validation.input_shape or ())
    if shape and tuple(inputs.shape[1:]) != shape:
        raise PreflightError(
            f"validation.input_shape: the held-out data decodes to {tuple(inputs.shape[1:])}, not {shape}",
            check="data",
        )
    name = config.model.class_path
    try:
        model = config.model.instantiate()
    except Exception as error:  # the user's constructor: any failure is the config's
        raise PreflightError(
            f"model: {name}({_args(config.model.init_args)}) failed: {_line(error)}", "model"
        ) from None
    _has_validation_step(model, name)
    model.eval()
    task, forward = config.task.build(), config.forward_hook()
    x = torch.as_tensor(inputs, dtype=torch.float32).requires_grad_(True)
    y = _targets(config, task, targets)
    try:
        output = forward(model, {"x": x.detach(), "y": y}, x) if forward is not None else model(x)
    except Exception as error:  # a forward that does not take the data's shape
        via = f" through model_forward {config.model_forward}" if forward is not None else ""
        raise PreflightError(
            f"model: {name} cannot take a batch of inputs shaped {tuple(x.shape)}{via}: {_line(error)}", check="model"
        ) from None
    loss = _defense_loss(config, task, name, x, y, output)
    try:
        loss.backward()
    except Exception as error:
        raise PreflightError(f"model: the defenses' loss fails on {name}'s output: {_line(error)}", "model") from None
    if x.grad is None:
        raise PreflightError(
            f"model: no gradient reaches {name}'s input; the attacks need a forward that is differentiable in it",
            check="model",
        )
    head = (
        f"; detectors read features at {_detector_features(config, model, x.detach())!r}" if config.detectors_on else ""
    )
    return Passed(
        "model",
        f"{name} maps inputs {tuple(x.shape)} to {tuple(output.shape)}; {task.kind} loss and input gradient ok{head}",
    )


def _detector_features(config: CycleConfig, model: Any, x: Any) -> str:
    """The module whose input the detectors read as the model's features (`detectors.feature_layer`, else the last
    Linear layer): the head from there must give the model's own output, or screening would fail mid-cycle."""
    from trainguard.defenses.errors import ScreeningInputError
    from trainguard.defenses.features import head_features, split_head

    try:
        split = split_head(model, config.detectors.feature_layer)
        head_features(model, split, [x])
    except ScreeningInputError as error:
        raise PreflightError(
            f"detectors: {str(error).removeprefix('head-scope screening: ')} (or set detectors.enabled: false)",
            check="model",
        ) from None
    return split.entry


def _has_validation_step(model: Any, name: str) -> None:
    """Robust accuracy is measured in Lightning's validation loop, which runs only for a module with a
    validation_step: without one every robust accuracy is NaN and the gate rejects each model after training."""
    from pytorch_lightning.utilities.model_helpers import is_overridden

    if not is_overridden("validation_step", model):
        raise PreflightError(
            f"model: {name} has no validation_step; robust accuracy is measured in the validation loop (add one, "
            "e.g. logging val/loss)",
            check="model",
        )


def _targets(config: CycleConfig, task: Any, targets: Any) -> Any:
    """The held-out targets as the defenses take them, refused when they are not the task's (real values under a
    classification task would be cast to labels) or not the shape `validation.targets` declares."""
    import torch

    from trainguard.defenses.errors import TaskMismatchError

    declared = config.validation.targets
    if declared is not None and tuple(targets.shape[1:]) != declared.shape:
        raise PreflightError(
            f"validation.targets.shape: the held-out targets are {list(targets.shape[1:])} per sample, not "
            f"{list(declared.shape)}",
            check="data",
        )
    dtype = None if task.kind == "classification" else torch.float32
    y = torch.as_tensor(targets, dtype=dtype)
    try:
        task.check_targets(y)
    except TaskMismatchError as error:
        raise PreflightError(f"task: the held-out targets do not fit: {error}", check="data") from None
    return y


def _defense_loss(config: CycleConfig, task: Any, name: str, x: Any, y: Any, output: Any) -> Any:
    """The loss the attacks, robust accuracy and the gate compute (the task's summed per-sample loss) on the
    model's output, refused in one line when the output's shape is not what the task needs for these targets."""
    import torch

    from trainguard.defenses.errors import TaskMismatchError

    got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    if task.kind == "classification":
        expected = (x.shape[0], len(config.validation.labels))
        needs = f"{expected}, one logit per label of validation.labels"
    else:
        expected = None
        needs = f"outputs shaped like its targets {tuple(y.shape)} (validation.targets.shape per sample)"
    if isinstance(output, torch.Tensor) and expected in (None, got):
        try:
            return task.attack_loss(output, y)
        except TaskMismatchError:
            pass  # outputs that do not fit the targets: refused below, in the same words
    raise PreflightError(
        f"model: {name} returns {got} for inputs shaped {tuple(x.shape)}; the defenses' {task.kind} loss needs {needs}",
        check="model",
    )


def _one_sample(config: CycleConfig, holdout: Any) -> tuple[Any, Any]:
    """Two rows of the first held-out shard, read through the verified manifest (its digest checked on read)."""
    from trainguard.pipeline.intake import decode_shard
    from trainguard.provenance.formats import default_decoders
    from trainguard.provenance.reader import ShardReader

    shards = [s for s in holdout.manifest.shards if s.role == "holdout"]
    if not shards:
        raise PreflightError(f"dataset.holdout.manifest: {holdout.path} lists no role=holdout shard", check="data")
    decoders = _decoders(config)
    every = default_decoders(decoders, label=config.validation.label_column)
    try:
        samples, _ = decode_shard(ShardReader(holdout), shards[0].name, config.validation, decoders, every)
    except ProvenanceError as error:
        raise PreflightError(f"dataset.holdout: {error.reason}: {error}", check="data") from None
    except (KeyError, ValueError) as error:  # feature or label columns the config names are not in the table
        raise PreflightError(f"validation: held-out shard {shards[0].name}: {_line(error)}", check="data") from None
    return samples.inputs[:2], samples.targets[:2]


def _decoders(config: CycleConfig) -> dict[str, Any]:
    """The decoders `data.decoders` names, by suffix."""
    return {suffix: component.instantiate() for suffix, component in config.data.decoders.items()}


def foresee(config: CycleConfig) -> tuple[Passed, ...]:
    """What the cycle would decide before training, from the cycle's own functions on the data now in place: the
    signed state's anti-rollback records (a manifest behind them stops the cycle), the intake (every shard read and
    hash-checked, as the cycle reads it), validation, the per-source caps and the operator's quarantines (shards the
    cycle would refuse), class
    coverage and whether the held-out set is large enough for the gate's thresholds (warnings). Raises
    PreflightError where the cycle would stop."""
    from trainguard.pipeline.intake import admit, quarantined_by_operator, verify_and_read

    state = _cycle_state(config)
    try:
        intake = verify_and_read(config, state.rollback_records, _decoders(config))
        kept, invalid, capped = admit(intake, config)
    except CycleAbortedError as error:
        raise PreflightError(f"the cycle would stop: {error}", check=error.check) from None
    records = state.rollback_records.accepted
    held = (
        f"{len(intake.manifests)} manifests at or past the {len(records)} anti-rollback records of"
        if records
        else "no anti-rollback record yet in"
    )
    found = [Passed("rollback", f"{held} the cycle state {config.output.state_path}")]
    operator = [d for d in (quarantined_by_operator(s, state.quarantined) for s in kept) if d is not None]
    for decision in [*intake.refused, *invalid, *capped, *operator]:
        found.append(
            Passed(decision.check, f"would refuse {decision.shard} ({decision.source}): {decision.reason}", "refuse")
        )
    refused = len(found) - 1
    passing = len(kept) - len(operator)
    found.append(
        Passed("admit", f"{passing} shards pass the intake, validation, source caps and quarantines; {refused} refused")
    )
    if config.task.kind == "classification":
        found += _coverage(config, [s for s in kept if s.role == "trusted"], intake.holdout)
    found += _holdout_size(config, intake.holdout)
    if config.roni.enabled and config.task.kind == "classification":
        found += _roni_pool(config, intake.holdout, [s for s in kept if s.role == "train"])
    return tuple(found)


def _cycle_state(config: CycleConfig) -> Any:
    """The cycle's signed state as the cycle loads it (checked, fresh against its receipts); a new one, unwritten,
    when no cycle has run."""
    from trainguard.pipeline.errors import PipelineError
    from trainguard.pipeline.receipts import check_fresh
    from trainguard.pipeline.state_log import StateStore
    from trainguard.provenance.keys import load_signing_key

    try:
        key = load_signing_key(config.output.attestation_key_path)
        store = StateStore(config.output.state_path, key, config.pipeline_identity)
        state = store.load()
        check_fresh(state, store.link, config.output.work_dir, key)
    except (PipelineError, ProvenanceError) as error:
        raise PreflightError(f"state: {error}", check="state") from None
    return state


def _coverage(config: CycleConfig, trusted: Sequence[Any], holdout: Sequence[Any]) -> list[Passed]:
    """Whether the trusted base and the held-out set each hold every class of `validation.labels`: a class the base
    lacks is never learnt from trusted data, one the held-out set lacks is never measured by the gate or RONI."""
    import numpy as np

    labels = set(config.validation.labels)
    found = []
    for what, shards in (("trusted base", trusted), ("held-out set", holdout)):
        held = {int(v) for s in shards for v in np.unique(np.asarray(s.samples.targets))}
        missing = sorted(labels - held)
        if missing:
            found.append(Passed("coverage", f"the {what} holds no row of class(es) {missing}", "warn"))
        else:
            found.append(Passed("coverage", f"the {what} holds every class of validation.labels"))
    return found


def _holdout_size(config: CycleConfig, holdout: Sequence[Any]) -> list[Passed]:
    """Whether the held-out set can resolve the gate's thresholds: the 95% half-width of the difference of two
    accuracies near `gate.min_clean_accuracy` (at least 0.5) measured on its rows, overall and in its smallest class
    (95% over every class, as the gate tests them), against `max_accuracy_drop` and `max_class_drop`. A threshold
    below it is in effect raised to it."""
    import numpy as np

    from trainguard.defenses.gate import Z95, family_z, resolvable_drop, rows_to_resolve

    gate = config.gate
    p = max(gate.min_clean_accuracy, 0.5)
    rows = sum(len(s.samples) for s in holdout)
    groups = [("overall", rows, gate.max_accuracy_drop, "max_accuracy_drop", Z95)]
    if config.task.kind == "classification":
        targets = np.concatenate([np.asarray(s.samples.targets).reshape(-1) for s in holdout])
        counts = {label: int((targets == label).sum()) for label in config.validation.labels}
        smallest = min(counts, key=lambda label: counts[label])
        z = family_z(len(counts))
        groups.append((f"class {smallest}, the smallest", counts[smallest], gate.max_class_drop, "max_class_drop", z))
    found = []
    for what, n, threshold, key, z in groups:
        resolvable = resolvable_drop(p, n, z)
        if resolvable <= threshold:
            detail = f"{n} held-out rows ({what}) resolve drops of {resolvable:.3f} at 95%, within gate.{key}"
            found.append(Passed("gate", f"{detail} {threshold}"))
            continue
        needed = rows_to_resolve(threshold, p, z)
        found.append(
            Passed(
                "gate",
                f"the held-out set is too small for gate.{key} {threshold}: {n} rows ({what}) resolve only drops of "
                f"{resolvable:.3f} at 95% near accuracy {p:.2f}, so the gate refuses only drops past them (about "
                f"{needed} rows resolve {threshold})",
                "warn",
            )
        )
    return found


def _roni_pool(config: CycleConfig, holdout: Sequence[Any], offered: Sequence[Any]) -> list[Passed]:
    """Whether RONI's trusted calibration rows (`roni.calibration_fraction` of the held-out set) can stand for the
    shards offered: a class with fewer than `MIN_POOL_ROWS` of them is drawn from a pool too small to stand for fresh
    rows, so clean shards may be refused more often than `roni.level`; a shard holding more rows of a class than
    `pool_fraction` of them is tested on a subsample (less power against its poison)."""
    import numpy as np

    from trainguard.defenses.roni import MIN_POOL_ROWS, ScreeningConfig, class_cap, supported_level

    screening = ScreeningConfig(**config.roni.screening_options())
    if not screening.stratify:
        return []
    targets = np.concatenate([np.asarray(s.samples.targets).reshape(-1) for s in holdout])
    pool = {
        label: round(config.roni.calibration_fraction * int((targets == label).sum()))
        for label in config.validation.labels
    }
    found = []
    thin = sorted(label for label, rows in pool.items() if rows < MIN_POOL_ROWS)
    if thin:
        rows = ", ".join(f"class {label}: {pool[label]}" for label in thin)
        fewest = min(pool[label] for label in thin)
        found.append(
            Passed(
                "roni",
                f"RONI draws clean calibration shards from about {sum(pool.values())} trusted rows ({rows}): under "
                f"{MIN_POOL_ROWS} rows of a class, draws stand for fresh rows only roughly and clean shards may be "
                f"refused more often than roni.level {config.roni.level:g}; {fewest} rows support a level of about "
                f"{supported_level(fewest):.2g} at best; add held-out rows of those classes",
                "warn",
            )
        )
    if screening.pool_fraction is None:
        return found
    cut = []
    for shard in offered:
        labels, counts = np.unique(np.asarray(shard.samples.targets).reshape(-1), return_counts=True)
        over = [
            (int(c), int(k))
            for c, k in zip(labels, counts, strict=True)
            if k > class_cap(pool.get(int(c), 0), screening.pool_fraction)
        ]
        if over:
            cut.append((shard.key, over))
    if cut:
        label, most = max(((c, k) for _, over in cut for c, k in over), key=lambda ck: ck[1])
        needed = math.ceil(most / screening.pool_fraction / config.roni.calibration_fraction)
        found.append(
            Passed(
                "roni",
                f"{len(cut)} shard(s) hold more rows of a class than RONI's trusted rows can test whole (e.g. "
                f"{cut[0][0]}, class {cut[0][1][0][0]}): they are tested on a seeded subsample, with less power "
                f"against poison; about {needed} held-out rows of class {label} would test the largest whole",
                "warn",
            )
        )
    else:
        found.append(Passed("roni", f"RONI's trusted rows test every offered shard whole ({len(offered)} shards)"))
    return found


def _args(init_args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in init_args.items())


def _line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:500]}"


def lines(passed: Sequence[Passed]) -> list[str]:
    """The checks, one line each, for `trainguard check`: `ok`, `refuse` (the cycle would refuse a shard and go on)
    or `warn`."""
    return [f"{p.verdict}  {p.check:<10} {p.detail}" for p in passed]
