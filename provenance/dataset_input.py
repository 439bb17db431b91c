"""A verified manifest as an MLflow dataset input: the one way trainguard records what data a run used.

The source is MLflow's own `local` type with an absolute `file://` URI, so `mlflow.data.get_source(input)` resolves
it anywhere; MLflow caps a dataset digest at 36 characters (its store column), so the input's digest is the first 36
hex digits of the manifest's SHA-256 and the full digest is in the profile and the input's tags.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainguard.provenance.verify import VerificationReport

MLFLOW_DIGEST_CHARS = 36
SOURCE_TYPE = "local"
"""MLflow's registered source type for local files (`LocalArtifactDatasetSource`): resolvable without plugins."""
TAG_LIMIT = 500


def verification_facts(report: VerificationReport) -> dict[str, Any]:
    """What the verification established about one manifest: its digests, version, size and signers."""
    return {
        "manifest_sha256": report.manifest_sha256,
        "statement_sha256": report.statement_sha256,
        "version": report.version,
        "shards": report.shards,
        "bytes": report.bytes_checked,
        "signers": ",".join(report.signers),
    }


def dataset_input(report: VerificationReport, context: str, tags: Mapping[str, str] | None = None) -> Any:
    """An `mlflow.entities.DatasetInput` for a verified manifest, used as `context` (training, holdout, ...)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source = json.dumps({"uri": Path(report.manifest_path).resolve().as_uri()})
    profile = json.dumps(verification_facts(report), sort_keys=True)
    name = str(report.dataset or Path(report.manifest_path).name)
    dataset = Dataset(name, report.manifest_sha256[:MLFLOW_DIGEST_CHARS], SOURCE_TYPE, source, None, profile)
    every = {"mlflow.data.context": context, "trainguard.sha256": report.manifest_sha256, **(tags or {})}
    return DatasetInput(dataset, [InputTag(k, str(v)[:TAG_LIMIT]) for k, v in every.items()])
