"""Signed model directories: safetensors weights signed in the OpenSSF Model Signing format (`model-signing`).

A model directory holds `model.safetensors` (weights, never a pickle), `model.json` (how to rebuild the module),
`model.sig` (a Sigstore bundle made with an EC key; the library's own `model_signing verify key` accepts it),
`attestation.intoto.json` (the DSSE-signed SLSA provenance, bound to the weights by digest),
`attestation.intoto.sigstore.json` (the same attestation signature as a Sigstore bundle) and, in `code/`, the model's
own modules where they are not an installed package (`trainguard.pipeline.model_code`). The model signature covers
every file but itself and the attestation's two files (which carry their own signature), `.git*` files included, and
verification refuses any other file or link, hidden ones too, so a swapped, edited or added file fails.
The directory is built under its final name in a private folder beside its destination (so `model.sig` names the
released directory) and renamed into place: a crash never leaves half a model.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainguard import strictjson
from trainguard.files import read_regular
from trainguard.pipeline.errors import ModelIdentityError, ModelNotFoundError, ModelSignatureError
from trainguard.provenance.paths import printable, walk_entries
from trainguard.provenance.sigstore_bundle import bundle_path

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
SIGNATURE_FILE = "model.sig"
ATTESTATION_FILE = "attestation.intoto.json"
ATTESTATION_BUNDLE_FILE = bundle_path(Path(ATTESTATION_FILE)).name
CODE_DIR = "code"  # the model's own code (trainguard.pipeline.model_code), signed with the weights
UNSIGNED_FILES = (SIGNATURE_FILE, ATTESTATION_FILE, ATTESTATION_BUNDLE_FILE)
PASSPHRASE_ENV = "TRAINGUARD_KEY_PASSPHRASE"
_MODEL_SIGNING_CURVES = ("secp256r1", "secp384r1", "secp521r1")
BUNDLE_LIMIT = 16 * 1024 * 1024
"""The largest signature bundle read (one digest per file: kilobytes in practice)."""
KEY_LIMIT = 64 * 1024


@dataclass(frozen=True)
class ModelFiles:
    """A model directory and the sha256 (hex) of each signed file, by name relative to the directory."""

    directory: Path
    digests: Mapping[str, str]

    @property
    def model_file(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def signature(self) -> Path:
        return self.directory / SIGNATURE_FILE

    @property
    def attestation(self) -> Path:
        return self.directory / ATTESTATION_FILE


@dataclass(frozen=True)
class Attestation:
    """What an `attest` hook of `write_signed_model` returns: the DSSE envelope and its Sigstore bundle, as bytes."""

    envelope: bytes
    bundle: bytes


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, streamed in large reads."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_signed_model(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    directory: Path,
    signing_key: Path,
    *,
    class_path: str | None = None,
    init_args: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
    attest: Callable[[ModelFiles], bytes | Attestation] | None = None,
    code: Mapping[str, Path] | None = None,
) -> ModelFiles:
    """Saves `model` as safetensors, signs the directory and (with `attest`) writes its attestation, atomically.

    `attest` gets the signed files and returns the attestation to store beside them: an `Attestation` (envelope and
    Sigstore bundle), or the envelope's bytes alone. `code` (name under `code/` -> source file) is the model's own
    code, copied in and signed with the weights. An existing `directory` (a re-run of the same cycle) is replaced
    only once the new one is complete.
    """
    directory = Path(directory)
    _check_signing_key(Path(signing_key))
    directory.parent.mkdir(parents=True, exist_ok=True)
    private = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    staging = private / directory.name  # signed under the name it is released as: model.sig's subject is that name
    try:
        staging.mkdir()
        staging.chmod(0o755)
        _save_weights(model, staging / MODEL_FILE, metadata or {})
        description = {"format": "safetensors", "class_path": class_path, "init_args": dict(init_args or {})}
        description["metadata"] = dict(metadata or {})
        (staging / CONFIG_FILE).write_text(json.dumps(description, indent=2, sort_keys=True) + "\n")
        for name, source in (code or {}).items():
            (staging / CODE_DIR / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, staging / CODE_DIR / name)
        sign_model(staging, signing_key)
        signed = [CONFIG_FILE, MODEL_FILE, *(f"{CODE_DIR}/{name}" for name in code or {})]
        files = ModelFiles(directory, {name: file_sha256(staging / name) for name in signed})
        if attest is not None:
            _write_attestation(staging, attest(files))
        _fsync_tree(staging)
        _replace_directory(staging, directory)
    finally:
        shutil.rmtree(private, ignore_errors=True)  # empty once the model is in place; the partial model otherwise
    return files


def _write_attestation(directory: Path, attestation: bytes | Attestation) -> None:
    if isinstance(attestation, Attestation):
        (directory / ATTESTATION_FILE).write_bytes(attestation.envelope)
        (directory / ATTESTATION_BUNDLE_FILE).write_bytes(attestation.bundle)
    else:
        (directory / ATTESTATION_FILE).write_bytes(attestation)


def sign_model(directory: Path, signing_key: Path) -> Path:
    """Signs every file of `directory` but the signature and attestation files; returns the signature path.

    The signature's subject is the directory's name: sign a directory under the name it is released as."""
    import model_signing

    password = _check_signing_key(Path(signing_key))
    try:
        # model-signing annotates password as str but hands it to cryptography, which takes bytes
        config = model_signing.signing.Config().use_elliptic_key_signer(  # type: ignore[no-untyped-call]
            private_key=signing_key,
            password=password,  # type: ignore[arg-type]
        )
        config.set_hashing_config(_hashing_config())
        config.sign(directory, directory / SIGNATURE_FILE)
    except (OSError, ValueError, TypeError) as error:
        raise ModelSignatureError(
            f"cannot sign {directory} with {signing_key}: {_one_line(error)}", path=str(signing_key)
        ) from None
    return directory / SIGNATURE_FILE


def verify_model_signature(
    directory: Path, public_key: Path, *, unsigned: Collection[str] = UNSIGNED_FILES
) -> ModelFiles:
    """Checks `model.sig` against `public_key` and every file of `directory`; returns the signed digests.

    Every regular file (recursively, hidden and `.git*` ones included) but those in `unsigned` must be covered by
    the signature, and no symbolic link or special file may be present. The signature and key are read once into
    memory: the digests returned are those of the bundle that was verified.
    """
    import model_signing

    directory = Path(directory)
    signature = directory / SIGNATURE_FILE
    if not directory.is_dir():
        raise ModelNotFoundError(f"{directory}: no such model directory", path=str(directory))
    bundle = _read_control(signature, BUNDLE_LIMIT, f"the model is not signed (no {SIGNATURE_FILE})")
    pem = _read_control(Path(public_key), KEY_LIMIT, "no such public key file", missing=ModelNotFoundError)
    present = _present_files(directory)
    with tempfile.TemporaryDirectory() as scratch:
        pinned, pinned_key = Path(scratch) / SIGNATURE_FILE, Path(scratch) / "key.pub"
        pinned.write_bytes(bundle)
        pinned_key.write_bytes(pem)
        try:
            model_signing.verifying.Config().use_elliptic_key_verifier(  # type: ignore[no-untyped-call]
                public_key=pinned_key
            ).set_hashing_config(_hashing_config()).verify(directory, pinned)
        except Exception as error:  # the library raises ValueError, InvalidSignature, protobuf and JSON errors
            raise ModelSignatureError(
                f"{directory}: model signature check failed against {public_key}: {_one_line(error)}",
                path=str(directory),
            ) from None
    digests = _signed_digests(bundle, signature)
    extra = sorted(present - set(digests) - set(unsigned))
    if extra:
        raise ModelSignatureError(
            f"{directory}: {printable(extra[0])} is not covered by the model signature", path=str(directory / extra[0])
        )
    return ModelFiles(directory, digests)


def _hashing_config() -> Any:
    """What the model signature covers: every file but the signature and the attestation's envelope and bundle,
    `.git*` files included."""
    import model_signing

    return model_signing.hashing.Config().set_ignored_paths(  # type: ignore[no-untyped-call]
        paths=list(UNSIGNED_FILES), ignore_git_paths=False
    )


def _present_files(directory: Path) -> set[str]:
    """Names of the regular files under `directory`; a symbolic link or special file is a ModelSignatureError."""
    present = set()
    for name, kind in walk_entries(directory):
        if kind != "file":
            kind_text = "symbolic link" if kind == "symlink" else "special file"
            raise ModelSignatureError(
                f"{directory}: {printable(name)} is a {kind_text}, refused in a signed model",
                path=str(directory / name),
            )
        present.add(name)
    return present


def _read_control(
    path: Path, limit: int, absent: str, *, missing: type[ModelSignatureError] = ModelSignatureError
) -> bytes:
    """A small regular file's bytes (a FIFO or device is refused, never read); `absent` says what a missing one
    means."""
    try:
        return read_regular(path, limit=limit)
    except OSError as error:
        if error.errno == errno.ENOENT:
            raise missing(f"{path}: {absent}", path=str(path)) from None
        raise ModelNotFoundError(f"{path}: cannot read: {error.strerror}", path=str(path)) from None


def load_verified_state_dict(directory: Path, public_key: Path, expected_sha256: str) -> dict[str, torch.Tensor]:
    """The weights of a signed model that must be the one recorded (`expected_sha256`, e.g. in the signed cycle
    state): verifies the signature, refuses any other validly signed model, then parses the weights from bytes
    whose digest matches (read once, so nothing can swap the file between check and use)."""
    from safetensors.torch import load

    files = verify_model_signature(directory, public_key)
    signed = files.digests.get(MODEL_FILE)
    if signed != expected_sha256:
        raise ModelIdentityError(
            f"{directory}: holds a validly signed model with weights sha256 {str(signed)[:16]}…, not the recorded "
            f"{expected_sha256[:16]}… (another release copied over it); refusing it",
            path=str(directory),
        )
    data = files.model_file.read_bytes()
    if hashlib.sha256(data).hexdigest() != signed:
        raise ModelSignatureError(f"{files.model_file}: changed after its signature was checked", path=str(directory))
    return load(data)


def read_model_description(directory: Path) -> dict[str, Any]:
    """The contents of `model.json` (class_path, init_args, metadata) as strict JSON; check the signature first."""
    path = Path(directory) / CONFIG_FILE
    try:
        description = strictjson.loads(_read_control(path, BUNDLE_LIMIT, "no model description"))
    except strictjson.StrictJSONError as error:
        raise ModelSignatureError(f"{path}: malformed model description: {error}", path=str(path)) from None
    if not isinstance(description, dict):
        raise ModelSignatureError(f"{path}: the model description is not a JSON object", path=str(path))
    return description


def _save_weights(model: Any, path: Path, metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file, save_model
    from torch import nn

    if isinstance(model, nn.Module):
        save_model(model, str(path), metadata=dict(metadata))
    else:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in model.items()}
        save_file(tensors, str(path), metadata=dict(metadata))


def _signed_digests(bundle: bytes, where: Path) -> dict[str, str]:
    """Resource name -> sha256 from a model-signing bundle's in-toto payload (call only once it verified), parsed
    as strict JSON; anything else is a ModelSignatureError naming the bundle."""
    try:
        envelope = strictjson.loads(bundle)["dsseEnvelope"]
        statement = strictjson.loads(base64.b64decode(envelope["payload"], validate=True))
        digests = {item["name"]: item["digest"] for item in statement["predicate"]["resources"]}
    except (ValueError, KeyError, TypeError, binascii.Error) as error:
        raise ModelSignatureError(f"{where}: malformed signature bundle: {_one_line(error)}", path=str(where)) from None
    if not all(isinstance(name, str) and isinstance(digest, str) for name, digest in digests.items()):
        raise ModelSignatureError(f"{where}: malformed signature bundle: a resource is not a name and digest")
    return digests


def _check_signing_key(key: Path) -> bytes | None:
    """Refuses, by name, a key model-signing cannot use; returns its passphrase (TRAINGUARD_KEY_PASSPHRASE) if any."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        pem = read_regular(key, limit=KEY_LIMIT)
    except OSError as error:
        raise ModelNotFoundError(f"cannot read model signing key {key}: {error.strerror}", path=str(key)) from None
    password = None
    if b"ENCRYPTED" in pem:
        secret = os.environ.get(PASSPHRASE_ENV)
        if not secret:
            raise ModelSignatureError(f"{key} is encrypted: set {PASSPHRASE_ENV}", path=str(key))
        password = secret.encode()
    try:
        private = load_pem_private_key(pem, password)
    except (ValueError, TypeError) as error:
        raise ModelSignatureError(f"{key}: not a usable PEM private key: {_one_line(error)}", path=str(key)) from None
    if not isinstance(private, ec.EllipticCurvePrivateKey) or private.curve.name not in _MODEL_SIGNING_CURVES:
        raise ModelSignatureError(
            f"{key}: model signing needs an ECDSA P-256/P-384/P-521 key "
            "(make one with `trainguard keygen --type ecdsa-p256`)",
            path=str(key),
        )
    return password


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_dir():  # the model's `code/`
            _fsync_tree(path)
            continue
        with path.open("rb") as stream:
            os.fsync(stream.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_directory(staging: Path, directory: Path) -> None:
    """Renames `staging` to `directory`; an existing one is moved aside first and removed after."""
    aside = None
    if directory.exists():  # moved onto a fresh empty folder of unpredictable name: nothing planted is followed
        aside = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
        os.replace(directory, aside)
    os.replace(staging, directory)
    _fsync_dir(directory.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."
