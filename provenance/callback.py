"""A Lightning callback that verifies the signed manifests when the fit starts and stops it before any training
step if anything fails; it logs what it checked through the trainer's logger, whichever it is (a cycle records the
manifests as MLflow dataset inputs itself, see `pipeline.tracking`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path

import pytorch_lightning as pl
from typing_extensions import override

from trainguard.provenance.errors import MalformedError, ProvenanceError
from trainguard.provenance.manifest_ref import ManifestLike, ManifestRef, as_ref
from trainguard.provenance.rollback import RollbackState, default_state_path
from trainguard.provenance.verify import ShardFailure, VerificationReport, verify_dataset


class VerifyDatasetCallback(pl.Callback):
    """Verifies every manifest (signatures, expiry, rollback, all shards) in `setup("fit")`, on every rank.

    All ranks must pass (one boolean reduction), so a failure on any rank stops all of them before any training
    step. Each verified manifest's version is recorded in the rollback state; `reports` keeps what was checked,
    `tolerated` the shard failures `exclude` allowed. Logs `provenance/shards`, `provenance/bytes`,
    `provenance/seconds`, `provenance/excluded_failures` and each dataset's facts through the trainer's logger.

    Args:
        manifests: Manifest paths, `ManifestRef`s or mappings with `manifest` (and optional `dataset`,
            `data_dir`, `trust`).
        trust: The trust policy for manifests that name none of their own.
        state_file: The rollback state (None: the default state path).
        allow_extra: Whether files in a data folder that its manifest does not list are tolerated.
        exclude: Shards (`name` or `dataset:name`) the training will not read, e.g. ones a cycle already refused:
            their shard-level failures are tolerated; signature, expiry and rollback failures never are.
        dvc: Whether shards are also checked against the md5 digests DVC tracks for the data folder.
        workers: Parallel hashing workers (None: one per CPU).

    Raises:
        MalformedError: A manifest entry without `manifest` or with unknown keys; at setup, a manifest without a
            trust policy.
        ProvenanceError: At setup, any verification failure (its subclass says which), or a failure on another
            rank.

    Example::

        from pytorch_lightning import Trainer
        from trainguard.provenance.callback import VerifyDatasetCallback

        verify = VerifyDatasetCallback(["data/digits.manifest.json"], trust="trust/policy.json")
        Trainer(callbacks=[verify]).fit(model, datamodule)  # raises before the first step on a tampered shard
    """

    def __init__(
        self,
        manifests: Sequence[ManifestLike],
        trust: Path | str | None = None,
        *,
        state_file: Path | str | None = None,
        allow_extra: bool = False,
        exclude: Collection[str] = (),
        dvc: bool = False,
        workers: int | None = None,
    ) -> None:
        self.refs = tuple(as_ref(m) for m in manifests)
        self.trust = Path(trust) if trust is not None else None
        self.state = RollbackState(Path(state_file) if state_file is not None else default_state_path())
        self.allow_extra, self.dvc, self.workers = allow_extra, dvc, workers
        self.exclude = frozenset(exclude)
        self.reports: tuple[VerificationReport, ...] = ()
        self.tolerated: tuple[ShardFailure, ...] = ()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.reports:
            return
        full = [self._verify(ref) for ref in self.refs]
        reports = tuple(self._without_excluded(r) for r in full)
        failed = [r for r in reports if not r.ok]
        if not trainer.strategy.reduce_boolean_decision(not failed, all=True):
            if failed:
                failed[0].raise_for_failures()
            raise ProvenanceError("dataset verification failed on another rank; training stopped")
        for report in reports:
            self._record(report)
        self.reports = reports
        self.tolerated = tuple(f for r in full for f in r.failures if f not in self._without_excluded(r).failures)
        self._log(trainer, reports)

    def _verify(self, ref: ManifestRef) -> VerificationReport:
        trust = ref.trust or self.trust
        if trust is None:
            raise MalformedError(f"no trust policy for manifest {ref.manifest}")
        return verify_dataset(
            ref.manifest,
            trust,
            dataset=ref.dataset,
            data_dir=ref.data_dir,
            state=self.state,
            allow_extra=self.allow_extra,
            workers=self.workers,
            record=False,
            dvc=self.dvc,
        )

    def _without_excluded(self, report: VerificationReport) -> VerificationReport:
        kept = tuple(
            f
            for f in report.failures
            if f.shard is None or (f.shard not in self.exclude and f"{report.dataset}:{f.shard}" not in self.exclude)
        )
        return replace(report, failures=kept)

    def _record(self, report: VerificationReport) -> None:
        assert report.rollback_key is not None and report.version is not None and report.statement_sha256 is not None
        self.state.record(report.rollback_key, report.version, report.statement_sha256, report.rollback_keyids)

    def _log(self, trainer: pl.Trainer, reports: Sequence[VerificationReport]) -> None:
        if trainer.logger is None:
            return
        metrics = {
            "provenance/shards": float(sum(r.shards for r in reports)),
            "provenance/bytes": float(sum(r.bytes_checked for r in reports)),
            "provenance/seconds": float(sum(r.seconds for r in reports)),
            "provenance/excluded_failures": float(len(self.tolerated)),
        }
        trainer.logger.log_metrics(metrics, step=0)
        trainer.logger.log_hyperparams({"provenance": {r.dataset: r.facts() for r in reports}})
