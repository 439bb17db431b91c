"""`trainguard cycle`: one defended retraining cycle from a YAML config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from trainguard.pipeline.commands import OVERRIDABLE, OVERRIDES_HELP, PATH, config_overrides


@click.command(context_settings=OVERRIDABLE, epilog=OVERRIDES_HELP)
@click.option(
    "--config",
    "-c",
    type=PATH,
    required=True,
    help="Cycle config (YAML), e.g. configs/digits.yaml.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.option(
    "--reinit",
    is_flag=True,
    help="Start a new signed state where none exists beside released models (numbering continues after them).",
)
@click.option("--force", is_flag=True, help="Train even when nothing is new since the last accepted cycle.")
@click.option(
    "--print-config", is_flag=True, help="Print the config, overrides merged and every default filled in, and exit."
)
@config_overrides
def cycle(
    config: Path, as_json: bool, reinit: bool, force: bool, print_config: bool, overrides: tuple[str, ...]
) -> None:
    """Check the config (as `trainguard check`), then verify -> validate -> screen (RONI) -> train (adversarially)
    -> gate -> sign the model and its attestation; a cycle with nothing new since the last accepted one is skipped."""
    from trainguard.pipeline.config import load_config
    from trainguard.pipeline.errors import CycleAbortedError

    loaded = load_config(config, overrides=overrides)  # a bad config or override fails here, before any training
    if print_config:
        from trainguard.pipeline.commands.check import resolved_yaml

        click.echo(resolved_yaml(loaded), nl=False)
        return
    processes = _processes(loaded.trainer.arg("devices", "auto"), loaded.trainer.arg("strategy", "auto"))
    if processes > 1:
        _relaunch(processes)
    from trainguard.pipeline.cycle import run_cycle

    try:  # the outcome is printed first; MLflow's uploads finish after it, before the process exits
        outcome = run_cycle(
            _overridden(loaded, config) if overrides else config, reinit=reinit, force=force, wait_for_mlflow=False
        )
    except CycleAbortedError as error:
        if as_json:
            click.echo(json.dumps({"status": "failed", "check": error.check, "reason": str(error)}))
        _finish_uploads()
        raise
    try:
        _print(outcome, loaded.output.state_path, as_json)
    finally:
        _finish_uploads()
    if outcome.status not in ("accepted", "follower", "skipped"):
        raise SystemExit(1)


def _finish_uploads() -> None:
    """Waits for the cycle's MLflow uploads; says on stderr if MLflow was lost on the way (the decisions are in the
    local report and state regardless)."""
    from trainguard.pipeline.tracking import wait_for_uploads

    for reason in wait_for_uploads():
        click.echo(f"trainguard: MLflow incomplete ({reason}); decisions kept in the local report and state", err=True)


def _print(outcome: Any, state_path: Path, as_json: bool) -> None:
    if as_json:
        click.echo(
            json.dumps(
                {
                    "cycle": outcome.cycle,
                    "status": outcome.status,
                    "reason": outcome.reason,
                    "report": str(outcome.report),
                    "model_dir": str(outcome.model_dir) if outcome.model_dir else None,
                    "tracking": outcome.tracking,
                    "metrics": outcome.metrics,
                },
                indent=2,
            )
        )
    else:
        print_outcome(outcome, state_path)


def _overridden(loaded: object, config: Path) -> Path:
    """Writes the config as overridden to the work folder and returns its path. The cycle runs from that file, so
    its digest (what "nothing new" compares), its report and its attestation are of the config that ran; `project`
    is written as the folder it named, as it is relative to the config file."""
    import yaml

    from trainguard.files import atomic_write
    from trainguard.pipeline.config import CycleConfig, project_dir

    assert isinstance(loaded, CycleConfig)
    written = loaded.model_dump(mode="json", exclude_unset=True) | {"project": str(project_dir(loaded, config))}
    path = loaded.output.paths.overridden_config
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, yaml.safe_dump(written, sort_keys=False).encode())
    return path


def _processes(devices: object, strategy: object) -> int:
    """How many processes a DDP config asks for on this node when no launcher started this one (else 1)."""
    from trainguard.pipeline.distributed import launch_from_env

    ddp = isinstance(strategy, str) and strategy.startswith("ddp")
    if launch_from_env() is not None or not ddp or not isinstance(devices, int):
        return 1
    return devices


def _relaunch(processes: int) -> None:
    """Runs this same command as `processes` ranks under torch's launcher (one node), and exits with its outcome:
    rank 0 leads the cycle, the others train their share. A rank that fails says why in one line and the launcher
    stops the others; this process then names that rank and exits with its code, without the launcher's traceback."""
    import sys

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    command = ["--standalone", f"--nproc-per-node={processes}", "-m", "trainguard.pipeline.cli", *sys.argv[1:]]
    try:
        run(parse_args(command))  # type: ignore[no-untyped-call]  # torch's launcher is unannotated
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        click.echo(f"trainguard: rank {rank} stopped (exit code {failure.exitcode}); the other ranks with it", err=True)
        raise SystemExit(failure.exitcode if failure.exitcode > 0 else 1) from None
    raise SystemExit(0)


def print_outcome(outcome: object, state_path: Path | None = None) -> None:
    """A short human summary of a cycle: one line per source that lost shards or rows (each refused shard's
    statistics too with `--verbose`), then a table of the verdict and where things are."""
    from trainguard.pipeline.console import is_verbose, table
    from trainguard.pipeline.cycle import CycleOutcome

    assert isinstance(outcome, CycleOutcome)
    if outcome.status == "skipped":
        click.echo(f"cycle skipped: {outcome.reason}")
        return
    for line in outcome.sources:
        click.echo(f"  {line}")
    if is_verbose():
        for decision in outcome.shards:
            if not decision.accepted:
                click.echo(f"    refused {decision.shard} ({decision.source}) by {decision.check}: {decision.reason}")
    accepted = sum(d.accepted for d in outcome.shards)
    metrics = outcome.metrics
    rows = [
        ("decision", f"{outcome.status}: {outcome.reason}"),
        ("shards", f"{accepted} accepted, {len(outcome.shards) - accepted} refused"),
    ]
    if "val/acc" in metrics:
        rows.append(("held-out accuracy", f"{metrics['val/acc']:.4f}"))
    robust = robust_accuracy(metrics)
    if robust:
        rows.append(("robust accuracy", ", ".join(f"{v:.3f} at eps {k}" for k, v in robust.items())))
    if "val/gradient_masking" in metrics:
        seen = "suspected: see gradient_masking in the report" if metrics["val/gradient_masking"] else "none seen"
        rows.append(("gradient masking", seen))
    rows.append(("signed model", str(outcome.model_dir) if outcome.model_dir else "none (the last accepted stays)"))
    rows.append(("report", str(outcome.report)))
    if state_path is not None:
        rows.append(("state", str(state_path)))
    rows.append(("tracking", outcome.tracking))
    table(f"cycle {outcome.cycle} {outcome.status}", rows)


def robust_accuracy(metrics: dict[str, float]) -> dict[str, float]:
    """eps (as the metric names it) -> robust accuracy, from a cycle's metrics (`val/robust_acc_eps<eps>`; each
    attack's own accuracy, breaks and costs under it left out)."""
    from trainguard.pipeline.plots import ROBUST_PREFIX

    found = {
        name.removeprefix(ROBUST_PREFIX): value for name, value in metrics.items() if name.startswith(ROBUST_PREFIX)
    }
    return {eps: value for eps, value in found.items() if _is_number(eps)}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
