"""A DDP training job for test_ddp.py: the digits classifier on 2 CPU processes (gloo) with every trainguard callback.

Run as `ddp_job.py OUT_DIR MANIFEST DATA_DIR TRUST STATE_FILE [--epochs N] [--rank1-data-dir DIR]
[--refuse-changed]`; Lightning re-launches it for rank 1 (test_ddp.py starts both ranks with `--serve` instead).
Each rank writes `OUT_DIR/rank<N>.json` (metrics, gate verdict, verification reports, read-log digest, parameter
checksum, or the error that stopped it); rank 0 writes `model.safetensors` when the gate accepts, then waits for
rank 1 so the exit code covers both. A failed check exits with its `exit_code` after one line on stderr.

`ddp_job.py --serve [MODULE ...]` is a launcher for the tests that start DDP jobs, this one or `trainguard` (see
`serve`): it imports torch, Lightning, trainguard and the MODULEs once, then forks each job's ranks from itself, as
torchrun would start them but without a fresh interpreter per rank that imports them all again (~8 CPU s a rank,
most of a small job's cost).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import pytorch_lightning as pl
import torch
from digits_demo.digits import FEATURES, LABEL, NUM_CLASSES
from digits_demo.models import DigitsClassifier
from pytorch_lightning.loggers import CSVLogger
from safetensors.torch import save_file

from trainguard.defenses import AdversarialTraining, LabeledData, RobustAccuracy, heldout_metrics
from trainguard.defenses.errors import DefenseError
from trainguard.defenses.gate import ModelGate
from trainguard.provenance.callback import VerifyDatasetCallback
from trainguard.provenance.dataset import VerifiedDataModule, open_verified
from trainguard.provenance.errors import ProvenanceError
from trainguard.provenance.manifest_ref import ManifestRef
from trainguard.provenance.reader import ShardReader

MODEL_FILE = "model.safetensors"
HOLDOUT_SKIP = 15  # rows of the held-out set rank r leaves out: HOLDOUT_SKIP * r


def holdout_data(spec: ManifestRef, trust: Path, state: Path, skip: int) -> LabeledData:
    """The gate's held-out set: the manifest's role=holdout shards, verified on read, without the first `skip` rows.

    Each rank skips a different number of rows, so the ranks' own measurements differ: only the gate's broadcast of
    rank 0's measurements can make their verdicts agree.
    """
    (verified,) = open_verified([spec], trust, state)
    reader = ShardReader(verified)
    names = [s.name for s in verified.manifest.select(("holdout",), None)]
    frames = [frame for _, frame in reader.frames(names)]
    x = torch.cat([torch.as_tensor(f[list(FEATURES)].to_numpy("float32")) for f in frames])
    y = torch.cat([torch.as_tensor(f[LABEL].to_numpy("int64")) for f in frames])
    return LabeledData(x[skip:], y[skip:])


def parameters_sha256(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def write_json(path: Path, document: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(document, indent=2, sort_keys=True))
    os.replace(temporary, path)


def wait_for_other_ranks(trainer: pl.Trainer) -> int:
    """Rank 0 launched the other ranks: their worst exit code (0 when all succeeded)."""
    procs = getattr(trainer.strategy.launcher, "procs", []) if trainer.global_rank == 0 else []
    return max((abs(proc.wait()) for proc in procs), default=0)


def serve(modules: list[str]) -> NoReturn:
    """The launcher: imports `modules`, then runs one job per line on stdin, a JSON object: `target` ("job": this
    file's `main`; "trainguard": the CLI's), `argv`, `cwd`, `env`, and `ranks`, a list with each rank's `env` (its
    RANK, LOCAL_RANK, ... as its launcher sets them) and the files its `stdout` and `stderr` go to. The job is a
    process in a session of its own that forks its ranks and exits with their worst exit code. Answers a line each
    on stdout: the job's process id once it started, then its exit code. Ends when stdin closes."""
    for module in modules:
        importlib.import_module(module)
    for line in sys.stdin:
        job = _fork(partial(_job, json.loads(line)))
        _answer(job)
        _answer(_exit_code(job))
    os._exit(0)  # nothing left to write: skips the interpreter's teardown of torch and Lightning (seconds)


def _answer(value: int) -> None:
    sys.stdout.write(f"{value}\n")
    sys.stdout.flush()


def _exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _fork(run: Callable[[], int]) -> int:
    """A forked process that exits with `run()`'s code (1, after its traceback, if it raised); its id, here."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        code = run()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # nothing of the launcher runs again in a job or a rank


def _job(request: dict[str, Any]) -> int:
    os.setsid()  # the job and its ranks: one process group, killed whole on a timeout
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    ranks = [_fork(partial(_rank, request, rank)) for rank in request["ranks"]]
    return max(abs(_exit_code(pid)) for pid in ranks)


def _rank(request: dict[str, Any], rank: dict[str, Any]) -> int:
    os.environ.update(rank["env"])
    for fd, path, flags in (
        (0, os.devnull, os.O_RDONLY),  # the launcher's requests are not the rank's to read
        (1, rank["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        (2, rank["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ):
        opened = os.open(path, flags, 0o600)
        os.dup2(opened, fd)
        os.close(opened)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 # the process's own standard streams, never closed
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    # What a fresh interpreter reads from its environment when it imports Lightning: which rank logs.
    from lightning_fabric.utilities.rank_zero import _get_rank, rank_zero_only

    rank_zero_only.rank = _get_rank() or 0
    if request["target"] == "trainguard":
        from trainguard.pipeline.cli import main as trainguard

        sys.argv = ["trainguard", *request["argv"]]
        return trainguard(request["argv"])
    sys.argv = [__file__, *request["argv"]]
    return main(request["argv"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("trust", type=Path)
    parser.add_argument("state_file", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank1-data-dir", type=Path, help="rank 1's own copy of the shards, as on another node")
    parser.add_argument("--refuse-changed", action="store_true", help="refuse a changed training shard by name")
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    launched_rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by the launcher: Lightning's, or `serve`
    data_dir = args.rank1_data_dir if launched_rank == 1 and args.rank1_data_dir else args.data_dir
    spec = ManifestRef(args.manifest, data_dir)
    holdout = holdout_data(spec, args.trust, args.state_file, skip=HOLDOUT_SKIP * launched_rank)
    data = VerifiedDataModule(
        [spec], args.trust, state_file=args.state_file, batch_size=16, refuse_changed=args.refuse_changed
    )
    verify = VerifyDatasetCallback([spec], args.trust, state_file=args.state_file)
    gate = ModelGate(
        holdout, NUM_CLASSES, max_drop=0.02, max_class_drop=1.0, raise_on_reject=False, baseline="incoming"
    )
    callbacks = [
        *([] if args.refuse_changed else [verify]),  # as the cycle trains: verify-on-read alone, after its intake
        AdversarialTraining("pgd", eps=0.05, steps=2, seed=0),
        RobustAccuracy(eps=(0.05,), steps=2, max_samples=32, seed=0),
        gate,
    ]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=CSVLogger(args.out_dir / "logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    model = DigitsClassifier(channels=8, lr=2e-2)
    try:
        trainer.fit(model, datamodule=data)
    except (ProvenanceError, DefenseError) as error:
        line = str(error).splitlines()[0]
        document = {"rank": trainer.global_rank, "error": line, "error_type": type(error).__name__}
        write_json(args.out_dir / f"rank{trainer.global_rank}.json", document | {"steps": trainer.global_step})
        os.write(sys.stderr.fileno(), f"trainguard (rank {trainer.global_rank}): {line}\n".encode())  # one write
        # Lightning SIGKILLs rank 0 once another rank has exited with an error: exit only when every rank reported.
        trainer.strategy.barrier("reported")
        return max(error.exit_code, wait_for_other_ranks(trainer))
    assert gate.verdict is not None
    document = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "steps": trainer.global_step,
        "callback_metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
        "verdict": gate.verdict.to_dict(),
        "holdout_rows": len(holdout),
        "local_holdout": heldout_metrics(model, holdout, NUM_CLASSES).to_dict(),
        "reports": [report.to_dict() for report in verify.reports],
        "read_log_sha256": data.read_log_digest(),
        "read_log": [record.name for record in data.read_log.records],
        "local_read_log": [record.name for record in data.local_read_log.records],
        "refused": [refused.to_json() for refused in data.refused],
        "parameters_sha256": parameters_sha256(model),
    }
    write_json(args.out_dir / f"rank{trainer.global_rank}.json", document)
    if trainer.global_rank == 0 and gate.verdict.accepted:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, args.out_dir / MODEL_FILE)
    return wait_for_other_ranks(trainer)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve"]:
        serve(sys.argv[2:])
    sys.exit(main())
