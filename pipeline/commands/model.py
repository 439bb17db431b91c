"""`trainguard verify-model` checks a released model's signature, its attestation, and that they agree;
`trainguard load-model` loads a registered model version verified against a pinned key and the registry's record,
and can predict with it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import click

from trainguard.pipeline.commands import PATH


@click.command("verify-model")
@click.argument("model_dir", type=PATH)
@click.option("--key", type=PATH, required=True, help="Public key (PEM) the model was signed with.")
@click.option("--attestation", type=PATH, help="The DSSE attestation; default MODEL_DIR/attestation.intoto.json.")
@click.option(
    "--attestation-key", type=PATH, multiple=True, help="Public key(s) trusted for the attestation; default --key."
)
@click.option("--threshold", type=click.IntRange(min=1), default=1, show_default=True, help="Signatures needed.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_model(
    model_dir: Path,
    key: Path,
    attestation: Path | None,
    attestation_key: tuple[Path, ...],
    threshold: int,
    as_json: bool,
) -> None:
    """Exit 0 when the model signature, the attestation signature and the attested digests all check out."""
    from trainguard.pipeline.errors import PipelineError
    from trainguard.pipeline.model_verification import verify_model as verify

    try:
        result = verify(model_dir, attestation, key, list(attestation_key) or None, threshold)
    except PipelineError as error:
        if not as_json:
            raise
        click.echo(json.dumps({"ok": False, "error": type(error).__name__, "message": str(error)}))
        raise SystemExit(error.exit_code) from None
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    click.echo(f"OK {result.model_dir}: model sha256 {result.model_sha256}")
    click.echo(f"   signed files: {', '.join(sorted(result.files))}; attestation {result.attestation}")
    click.echo(f"   attestation keyids: {', '.join(k[:16] for k in result.attestation_keyids)}")
    click.echo(f"   trained on {result.accepted_shards} accepted shards ({result.rejected_shards} rejected)")


@click.command("load-model")
@click.argument("model")
@click.option(
    "--key",
    type=PATH,
    required=True,
    envvar="TRAINGUARD_MODEL_KEY",
    help="Public key (PEM) the model must be signed with (never a key shipped with the model).",
)
@click.option("--attestation-key", type=PATH, help="Public key for the attestation; default --key.")
@click.option("--predict", "inputs", type=PATH, help="Predict on a table (.parquet/.csv; feature columns only).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def load_model(model: str, key: Path, attestation_key: Path | None, inputs: Path | None, as_json: bool) -> None:
    """Load MODEL (a registered name, for its `champion`, models:/NAME@ALIAS or models:/NAME/VERSION) verified
    against --key and the registry's record of the version; nothing from the artifact store runs."""
    from trainguard.pipeline.mlflow_model import load_model as load
    from trainguard.pipeline.mlflow_model import parse_model_ref

    loaded = load(model, key=key, attestation_key=attestation_key)
    verification, registered = loaded.verification, loaded.registered
    assert registered is not None  # load() always checks the model against its registry version
    shown = {k: v for k, v in verification.to_json().items() if k not in ("model_dir", "attestation")}
    result: dict[str, object] = {"model": parse_model_ref(model).uri, "version": registered.version, **shown}
    if inputs is not None:
        import pandas as pd

        table = pd.read_csv(inputs) if inputs.suffix == ".csv" else pd.read_parquet(inputs)
        result["predictions"] = loaded.predict(table.to_numpy(dtype="float32")).to_dict("list")
    if as_json:
        click.echo(json.dumps(result, indent=2, default=str))
        return
    click.echo(
        f"OK {result['model']}: version {registered.version} (cycle {registered.cycle}), model sha256 "
        f"{verification.model_sha256}, verified with {key}"
    )
    shards = f"{verification.accepted_shards} accepted shards ({verification.rejected_shards} rejected)"
    click.echo(f"   trained on {shards}")
    predictions = result.get("predictions")
    for column, values in (predictions if isinstance(predictions, Mapping) else {}).items():
        click.echo(f"   {column}: {values}")
