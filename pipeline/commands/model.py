"""`trainguard verify-model`: checks a released model's signature, its attestation, and that they agree."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def verify_model(
    model_dir: Annotated[Path, typer.Argument(help="The model directory (model.safetensors, model.json, model.sig).")],
    key: Annotated[Path, typer.Option("--key", help="Public key (PEM) the model was signed with.")],
    attestation: Annotated[
        Path | None, typer.Option(help="The DSSE attestation; default MODEL_DIR/attestation.intoto.json.")
    ] = None,
    attestation_key: Annotated[
        list[Path] | None, typer.Option(help="Public key(s) trusted for the attestation; default --key.")
    ] = None,
    threshold: Annotated[int, typer.Option(min=1, help="Signatures needed on the attestation.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Exit 0 when the model signature, the attestation signature and the attested digests all check out."""
    from pipeline.errors import PipelineError
    from pipeline.model_verification import verify_model as verify

    try:
        result = verify(model_dir, attestation, key, attestation_key or None, threshold)
    except PipelineError as error:
        if not as_json:
            raise
        typer.echo(json.dumps({"ok": False, "error": type(error).__name__, "message": str(error)}))
        raise typer.Exit(error.exit_code) from None
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    typer.echo(f"OK {result.model_dir}: model sha256 {result.model_sha256}")
    typer.echo(f"   signed files: {', '.join(sorted(result.files))}; attestation {result.attestation}")
    typer.echo(f"   attestation keyids: {', '.join(k[:16] for k in result.attestation_keyids)}")
    typer.echo(f"   trained on {result.accepted_shards} accepted shards ({result.rejected_shards} rejected)")


def register(app: typer.Typer) -> None:
    app.command("verify-model")(verify_model)
