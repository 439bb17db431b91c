"""Loading a registered trainguard model against a real MLflow server: `trainguard.load_model` trusts the key the
caller pins and the registry's record of the version, never the artifact store; and what a served model returns."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient

import trainguard
from trainguard.pipeline.attestation import CycleFacts, build_statement, file_resource, read_log_resource
from trainguard.pipeline.config import Component
from trainguard.pipeline.cycle_report import accepted_tree, merkle_tree
from trainguard.pipeline.cycle_state import ShardDecision
from trainguard.pipeline.errors import ModelSignatureError, RegistryError
from trainguard.pipeline.mlflow_model import (
    SIGNED_PATH,
    ModelRef,
    parse_model_ref,
    predictions,
)
from trainguard.pipeline.model_code import find_model_code, model_imports
from trainguard.pipeline.model_sign import MODEL_FILE, write_signed_model
from trainguard.pipeline.tracking import CycleTracker, ModelRelease
from trainguard.provenance.keys import generate_signing_key, write_keypair

TRAINGUARD = str(Path(sys.executable).parent / "trainguard")
FEATURES = 4
X = np.random.default_rng(0).random((5, FEATURES), dtype=np.float32)


@dataclass(frozen=True)
class Signed:
    """Signed models of cycles 1 and 2 (each predicting its cycle number as the label) and the key pair."""

    private: Path
    public: Path
    models: dict[int, Path]


def _attested(directory: Path, cycle: int, private: Path, class_path: str = "torch.nn.Linear") -> None:
    """Signs a linear classifier (`class_path`: torch's or a subclass) that answers `cycle` for every row, with its
    code as a release finds it and an attestation of that cycle."""
    from trainguard.pipeline.attestation import sign_statement

    config = directory.parent / "cycle.yaml"
    config.write_text("name: test\n")
    module = Component(class_path=class_path, init_args={"in_features": FEATURES, "out_features": 3}).instantiate()
    with torch.no_grad():
        module.weight.zero_()
        module.bias.copy_(torch.nn.functional.one_hot(torch.tensor(cycle), 3).float() * 5)

    def attest(files: object) -> bytes:
        decisions = [ShardDecision(shard="a", sha256="01", source="s", accepted=True, check="roni")]
        facts = CycleFacts(
            model_digests=files.digests,  # type: ignore[attr-defined]
            manifests=[],
            config=file_resource(config, "config"),
            resolved_config={"name": "test"},
            shards=decisions,
            read_log=read_log_resource(directory.parent / "reads.jsonl", "00" * 32, 0),
            allowed=merkle_tree([]),
            accepted=accepted_tree(decisions),
            invocation_id=f"cycle-{cycle}",
            started="2026-01-01T00:00:00Z",
            finished="2026-01-01T00:00:01Z",
            state={"pipeline": "0f" * 16, "cycle": cycle, "seq": 3 * cycle, "link": "ab" * 32},
        )
        return sign_statement(build_statement(facts), private)

    write_signed_model(
        module,
        directory,
        private,
        class_path=class_path,
        init_args={"in_features": FEATURES, "out_features": 3},
        metadata={"task": "classification"},
        attest=attest,
        code=find_model_code(model_imports(class_path, None)).files,
    )


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Signed:
    root = tmp_path_factory.mktemp("signed")
    private, public = write_keypair(generate_signing_key("ecdsa-p256"), root / "model")
    models = {cycle: root / f"cycle-{cycle}" for cycle in (1, 2)}
    for cycle, directory in models.items():
        _attested(directory, cycle, private)
    return Signed(private, public, models)


def _digest(directory: Path) -> str:
    import hashlib

    return hashlib.sha256((directory / MODEL_FILE).read_bytes()).hexdigest()


def _register(name: str, signed: Signed, directory: Path, cycle: int) -> None:
    """Registers a signed model as a cycle does: a new version tagged with its cycle and weights' digest, which
    becomes the champion."""
    tracker = CycleTracker.connect(name, name)
    assert not tracker.offline, tracker.offline_reason
    tags = {"trainguard.cycle": str(cycle), "trainguard.model_sha256": _digest(directory)}
    release = ModelRelease(directory, signed.public, signed.public, X, f"cycle {cycle}", tags)
    with tracker.cycle(f"cycle-{cycle}") as parent:
        parent.register_model(release)
    assert parent.registered_version is not None, tracker.offline_reason


@pytest.fixture
def registered(mlflow_uri: str, signed: Signed) -> str:
    """A fresh registered model with versions 1 and 2 (cycles 1 and 2); the champion is version 2."""
    name = f"model-{uuid.uuid4().hex[:8]}"
    for cycle, directory in signed.models.items():
        _register(name, signed, directory, cycle)
    return name


def _on_disk(artifacts: Path, name: str, version: int) -> Path:
    """Where the server's --artifacts-destination (conftest's `mlflow_artifacts`) keeps a version's artifacts: what
    an attacker with write access to the artifact store edits."""
    location = MlflowClient().get_model_version_download_uri(name, str(version))
    found = artifacts / location.removeprefix("mlflow-artifacts:/").strip("/")
    assert found.is_dir(), found
    return found


def test_the_honest_champion_loads_verified_and_predicts(
    registered: str, signed: Signed, mlflow_artifacts: Path
) -> None:
    champion = trainguard.load_model(registered, key=signed.public)
    assert champion.registered is not None and (champion.registered.version, champion.registered.cycle) == (2, 2)
    assert champion.verification.model_sha256 == _digest(signed.models[2]) and champion.verification.cycle == 2
    predicted = champion.predict(X)
    assert list(predicted.columns) == ["label", "probability"] and predicted["label"].tolist() == [2] * len(X)
    served = mlflow.pyfunc.load_model(f"models:/{registered}@champion")  # the convenience path still works
    assert served.predict(X)["label"].tolist() == [2] * len(X)
    assert served.unwrap_python_model().verification.model_sha256 == champion.verification.model_sha256
    assert served.metadata.get_input_schema().inputs[0].shape == (-1, FEATURES)

    artifacts = _on_disk(mlflow_artifacts, registered, 2)  # what serving elsewhere installs and imports
    needed = (artifacts / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in needed and "mlflow==" in " ".join(needed)
    assert not [r for r in needed if "+" in r or r.startswith("trainguard")], needed  # none an index lacks
    flavor = yaml.safe_load((artifacts / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "trainguard_mlflow_loader"
    assert {p.name for p in (artifacts / flavor["code"]).iterdir()} == {"trainguard.zip", "trainguard_mlflow_loader.py"}


def test_an_attacker_rewriting_the_model_code_in_the_artifact_store_cannot_run_it(
    registered: str, signed: Signed, tmp_path: Path, mlflow_artifacts: Path
) -> None:
    marker = tmp_path / "attacker-code-ran"
    artifacts = _on_disk(mlflow_artifacts, registered, 2)
    (artifacts / "evil.py").write_text(
        textwrap.dedent(f"""
            from pathlib import Path

            import mlflow.pyfunc
            import pandas as pd
            from mlflow.models import set_model

            Path({str(marker)!r}).write_text("ran")


            class Seven(mlflow.pyfunc.PythonModel):
                def predict(self, context, model_input: pd.DataFrame, params=None):
                    return pd.DataFrame({{"label": [7] * len(model_input)}})


            set_model(Seven())
        """)
    )
    mlmodel = yaml.safe_load((artifacts / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    del flavor["data"]
    flavor.update(loader_module="mlflow.pyfunc.model", model_code_path="evil.py")  # models-from-code, theirs
    (artifacts / "MLmodel").write_text(yaml.safe_dump(mlmodel))

    champion = trainguard.load_model(registered, key=signed.public)
    assert not marker.exists()
    assert champion.predict(X)["label"].tolist() == [2] * len(X)
    attacked = mlflow.pyfunc.load_model(f"models:/{registered}@champion")  # MLflow runs what MLmodel names
    assert marker.exists() and attacked.predict(X)["label"].tolist() == [7] * len(X)


def test_an_attacker_re_signing_the_champion_with_their_own_key_is_refused(
    registered: str, signed: Signed, tmp_path: Path, mlflow_artifacts: Path
) -> None:
    artifacts = _on_disk(mlflow_artifacts, registered, 2)
    private, public = write_keypair(generate_signing_key("ecdsa-p256"), tmp_path / "attacker")
    _attested(tmp_path / "forged", 2, private)
    shutil.rmtree(artifacts / SIGNED_PATH)
    shutil.copytree(tmp_path / "forged", artifacts / SIGNED_PATH)
    for bundled in ("model-key.pub", "attestation-key.pub"):
        shutil.copyfile(public, artifacts / SIGNED_PATH.rpartition("/")[0] / bundled)
    with pytest.raises(ModelSignatureError, match="signature check failed"):
        trainguard.load_model(registered, key=signed.public)
    assert mlflow.pyfunc.load_model(f"models:/{registered}@champion")  # the bundled key proves nothing


def test_the_model_code_travels_signed_and_an_edit_to_it_in_the_artifact_store_is_refused_before_it_runs(
    mlflow_uri: str, signed: Signed, tmp_path: Path, mlflow_artifacts: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, module = f"model-{uuid.uuid4().hex[:8]}", f"usermodel_{uuid.uuid4().hex[:8]}"
    project = tmp_path / "project"  # the config's folder: the only place the user's module is found at release
    project.mkdir()
    (project / f"{module}.py").write_text("import torch\n\n\nclass Answer(torch.nn.Linear):\n    pass\n")
    monkeypatch.syspath_prepend(str(project))
    _attested(tmp_path / "model", 1, signed.private, class_path=f"{module}.Answer")
    _register(name, signed, tmp_path / "model", 1)
    sys.path.remove(str(project))
    sys.modules.pop(module, None)

    loaded = trainguard.load_model(name, key=signed.public)
    assert loaded.predict(X)["label"].tolist() == [1] * len(X) and type(loaded.module).__module__ == module
    assert not Path(sys.modules[module].__file__ or "").is_relative_to(project)  # the verified copy of code/

    marker = tmp_path / "edited-code-ran"
    code = _on_disk(mlflow_artifacts, name, 1) / SIGNED_PATH / "code" / f"{module}.py"
    code.write_text(f"from pathlib import Path\n\nPath({str(marker)!r}).write_text('ran')\n" + code.read_text())
    sys.modules.pop(module)
    with pytest.raises(ModelSignatureError, match="signature check failed"):
        trainguard.load_model(name, key=signed.public)
    with pytest.raises(ModelSignatureError, match="signature check failed"):  # MLflow's path: the bundled key
        mlflow.pyfunc.load_model(f"models:/{name}@champion")
    assert not marker.exists() and module not in sys.modules


def test_an_older_signed_model_copied_over_the_champion_is_refused_by_digest(
    registered: str, signed: Signed, mlflow_artifacts: Path
) -> None:
    signed_dir = _on_disk(mlflow_artifacts, registered, 2) / SIGNED_PATH
    shutil.rmtree(signed_dir)
    shutil.copytree(signed.models[1], signed_dir)
    with pytest.raises(RegistryError, match="digest-mismatch") as refused:
        trainguard.load_model(registered, key=signed.public)
    assert refused.value.reason == "digest-mismatch" and "version 2" in str(refused.value)


def test_the_champion_alias_moved_to_an_older_version_is_refused(registered: str, signed: Signed) -> None:
    """`trainguard load-model` as its own process here (the console script's start and one-line refusal); the other
    CLI test runs it in this process, by `cli`."""
    MlflowClient().set_registered_model_alias(registered, "champion", "1")
    with pytest.raises(RegistryError, match="champion-rollback") as refused:
        trainguard.load_model(registered, key=signed.public)
    assert "version 1 (cycle 1)" in str(refused.value) and "version 2 (cycle 2)" in str(refused.value)
    explicit = trainguard.load_model(f"models:/{registered}/1", key=signed.public)  # a rollback on purpose
    assert explicit.predict(X)["label"].tolist() == [1] * len(X)

    done = subprocess.run(
        [TRAINGUARD, "load-model", registered, "--key", str(signed.public)], capture_output=True, text=True
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "champion-rollback" in done.stderr


def test_a_version_whose_attested_cycle_is_not_its_recorded_cycle_is_refused(mlflow_uri: str, signed: Signed) -> None:
    name = f"model-{uuid.uuid4().hex[:8]}"
    _register(name, signed, signed.models[1], cycle=3)  # the registry says cycle 3, the attestation cycle 1
    with pytest.raises(RegistryError, match="cycle-mismatch"):
        trainguard.load_model(name, key=signed.public)


def test_a_version_trainguard_did_not_register_is_refused(registered: str, signed: Signed) -> None:
    client = MlflowClient()
    client.delete_model_version_tag(registered, "2", "trainguard.model_sha256")
    with pytest.raises(RegistryError, match="not-trainguard"):
        trainguard.load_model(f"models:/{registered}/2", key=signed.public)


def test_the_cli_loads_the_champion_and_refuses_what_is_not_registered(
    registered: str, signed: Signed, tmp_path: Path, cli: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    import pandas as pd

    table = tmp_path / "rows.csv"
    pd.DataFrame(X).to_csv(table, index=False)
    done = cli(tmp_path, "load-model", registered, "--key", signed.public, "--predict", table, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["version"] == 2 and result["predictions"]["label"] == [2] * len(X)
    local = cli(tmp_path, "load-model", tmp_path, "--key", signed.public)
    assert local.returncode == 2 and "model-ref" in local.stderr and "Traceback" not in local.stderr


@given(
    name=st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True),
    alias=st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,10}", fullmatch=True),
    number=st.integers(1, 10**6),
)
def test_model_references_name_a_registry_version_or_are_refused(name: str, alias: str, number: int) -> None:
    assert parse_model_ref(name) == ModelRef(name, alias="champion")
    assert parse_model_ref(f"models:/{name}@{alias}") == ModelRef(name, alias=alias)
    assert parse_model_ref(f"models:/{name}/{number}") == ModelRef(name, version=number)
    for ref in (ModelRef(name, alias=alias), ModelRef(name, version=number)):
        assert parse_model_ref(ref.uri) == ref
    for other in (f"runs:/{name}/model", f"/tmp/{name}", f"models:/{name}", f"models:/{name}/0", f"{name}@{alias}"):
        with pytest.raises(RegistryError) as refused:
            parse_model_ref(other)
        assert refused.value.exit_code == 2 and refused.value.reason == "model-ref"


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
