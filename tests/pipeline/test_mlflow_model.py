"""What a served trainguard model returns for each task (the pure part of `VerifiedModel.predict`)."""

from __future__ import annotations

import numpy as np
import torch

from trainguard.pipeline.mlflow_model import predictions


def test_a_served_model_predicts_what_its_task_means() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, 1.0, 0.0]])
    labels = predictions("classification", logits)
    assert list(labels.columns) == ["label", "probability"] and labels["label"].tolist() == [0, 1]
    assert np.allclose(labels["probability"], torch.softmax(logits, 1).max(1).values.numpy())
    assert predictions("multilabel", logits).to_dict("list") == {
        "label_0": [1, 0],
        "label_1": [0, 1],
        "label_2": [1, 0],
    }
    assert predictions("regression", torch.tensor([1.5, -2.0])).to_dict("list") == {"output": [1.5, -2.0]}
    outputs = predictions("regression", logits[:, :2])
    assert list(outputs.columns) == ["output_0", "output_1"] and outputs["output_1"].tolist() == [-1.0, 1.0]
