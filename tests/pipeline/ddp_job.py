"""A DDP training job for test_ddp.py: the digits classifier on 2 CPU processes (gloo) with every trainguard callback.

Run as `ddp_job.py OUT_DIR MANIFEST DATA_DIR TRUST STATE_FILE [--epochs N] [--rank1-data-dir DIR]
[--refuse-changed]`; Lightning
re-launches it for rank 1. Each rank writes `OUT_DIR/rank<N>.json` (metrics, gate verdict, verification reports,
read-log digest, parameter checksum, or the error that stopped it); rank 0 writes `model.safetensors` when the gate
accepts, then waits for rank 1 so the exit code covers both. A failed check exits with its `exit_code` after one
line on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("manifest", type=Path)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("trust", type=Path)
    parser.add_argument("state_file", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rank1-data-dir", type=Path, help="rank 1's own copy of the shards, as on another node")
    parser.add_argument("--refuse-changed", action="store_true", help="refuse a changed training shard by name")
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    launched_rank = int(os.environ.get("LOCAL_RANK", "0"))  # set by Lightning for the ranks it re-launches
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
    sys.exit(main())
