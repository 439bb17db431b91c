"""The code of trainguard's MLflow models (models-from-code): MLflow runs this file to build the model at load time."""

from mlflow.models import set_model

from trainguard.pipeline.mlflow_model import VerifiedModel

set_model(VerifiedModel())
