"""The demo job: digits shards from simulated contributors, a Lightning classifier, metrics in MLflow."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger
from torch.utils.data import DataLoader, TensorDataset

from pipeline.digits import frame_to_arrays
from pipeline.models import DigitsClassifier
from pipeline.prepare import prepare_digits

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


def _loader(frames: list[pd.DataFrame], shuffle: bool) -> DataLoader:
    data = frame_to_arrays(pd.concat(frames, ignore_index=True))
    dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    return DataLoader(dataset, batch_size=64, shuffle=shuffle)


def run_demo(work_dir: Path, epochs: int) -> None:
    """Runs the demo end to end and prints what it did."""
    pl.seed_everything(0, workers=True, verbose=False)
    prepared = prepare_digits(work_dir / "data")
    train = [s for s in prepared.shards if s.role == "train"]
    holdout = [s for s in prepared.shards if s.role == "holdout"]
    sources = sorted({s.source for s in train})
    print(f"prepared {len(train)} training shards from {len(sources)} contributors ({', '.join(sources)})")
    print(f"and {sum(s.records for s in holdout)} trusted held-out rows in {prepared.root}")

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)
    logger = MLFlowLogger(experiment_name="trainguard-demo", tracking_uri=tracking_uri)
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    model = DigitsClassifier()
    read = [pd.read_parquet(prepared.root / s.name) for s in train]
    held = [pd.read_parquet(prepared.root / s.name) for s in holdout]
    trainer.fit(model, _loader(read, shuffle=True), _loader(held, shuffle=False))
    metrics = {k: float(np.asarray(v)) for k, v in trainer.callback_metrics.items()}
    print(f"trained {epochs} epochs: held-out accuracy {metrics['val/acc']:.3f}")
    print(f"MLflow run {logger.run_id} in {tracking_uri}")
    print(f"open the UI with: .venv/bin/mlflow ui --backend-store-uri {tracking_uri}")
