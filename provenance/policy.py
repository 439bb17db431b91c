"""Trust policies: which public keys may sign a dataset and how many of them must (k of n).

A policy is a JSON or YAML file `{"threshold": k, "keys": ["alice.pub", {"path": "bob.pub", "keyid": "..."}]}`
(paths relative to the policy file); a single PEM `.pub` file is a 1-of-1 policy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trainguard.provenance.errors import KeyFileError, PolicyError
from trainguard.provenance.keys import VerifyingKey, load_verifying_key, verifying_key_from_pem


@dataclass(frozen=True)
class TrustPolicy:
    keys: tuple[VerifyingKey, ...]
    threshold: int = 1

    def __post_init__(self) -> None:
        distinct = {key.keyid for key in self.keys}
        if len(distinct) != len(self.keys):
            raise PolicyError("the trust policy lists the same key twice")
        if not self.keys:
            raise PolicyError("the trust policy lists no keys")
        if not 1 <= self.threshold <= len(self.keys):
            raise PolicyError(f"threshold {self.threshold} is out of range for {len(self.keys)} trusted key(s)")

    @property
    def keyids(self) -> tuple[str, ...]:
        return tuple(key.keyid for key in self.keys)


def load_trust(path: Path) -> TrustPolicy:
    """A policy file or a single PEM public key (1 of 1)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PolicyError(f"cannot read trust policy {path}: {error.strerror}", path=str(path)) from None
    if data.lstrip().startswith(b"-----BEGIN"):
        return TrustPolicy((verifying_key_from_pem(data, str(path)),), 1)
    document = _parse(data, path)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise PolicyError(f"{path}: a trust policy needs a 'keys' list", path=str(path))
    threshold = document.get("threshold", 1)
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise PolicyError(f"{path}: threshold must be an integer", path=str(path))
    keys = tuple(_key(entry, path) for entry in document["keys"])
    try:
        return TrustPolicy(keys, threshold)
    except PolicyError as error:
        raise PolicyError(f"{path}: {error}", path=str(path)) from None


def _parse(data: bytes, path: Path) -> object:
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(data)
        return json.loads(data)
    except Exception as error:  # yaml and json raise several unrelated types for bad input
        raise PolicyError(f"{path}: not a trust policy (JSON/YAML) nor a PEM key: {error}", path=str(path)) from None


def _key(entry: object, policy: Path) -> VerifyingKey:
    pin = None
    if isinstance(entry, dict):
        pin = entry.get("keyid")
        if isinstance(entry.get("pem"), str):
            key = verifying_key_from_pem(entry["pem"].encode(), f"{policy} (inline key)")
        elif isinstance(entry.get("path"), str):
            key = _load(policy.parent / entry["path"])
        else:
            raise PolicyError(f"{policy}: a key entry needs 'path' or 'pem'", path=str(policy))
    elif isinstance(entry, str):
        key = _load(policy.parent / entry)
    else:
        raise PolicyError(f"{policy}: a key entry must be a path or an object", path=str(policy))
    if pin is not None and pin != key.keyid:
        raise PolicyError(f"{policy}: key has keyid {key.keyid}, the policy pins {pin}", keyid=key.keyid)
    return key


def _load(path: Path) -> VerifyingKey:
    try:
        return load_verifying_key(path)
    except KeyFileError as error:
        raise PolicyError(f"trust policy key: {error}", path=str(path)) from None
