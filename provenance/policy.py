"""Trust policies: which keys may sign, how many of them must (k of n), and what their signatures vouch for.

Trust flows from keys. Each key set is granted the dataset names it may sign, the sources it may attribute shards
to and the roles it may give them (`train`, `trusted`, `holdout`); a manifest is accepted only when a key set that
meets its threshold is granted everything the manifest claims. A shard is never trusted or held out because of a
string it declares.

The policy file format (JSON or YAML: `signers`, each with `keys`, `threshold` and its grants) is described in
the README's "Keys and trust policies". A single PEM `.pub` file is a 1-of-1 key set granted the role `train` only.

A key set's name (unique in its policy; letters, digits, `.`, `_`, `-`) is where its anti-rollback records are
kept, so adding, rotating or removing its keys and changing its threshold keep them; an unnamed key set (a bare
`.pub`) is named after its first key (`key:<keyid>`). Names label, they never grant.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from trainguard.files import read_regular
from trainguard.provenance.dsse import Envelope, verify_envelope
from trainguard.provenance.errors import (
    AuthorizationError,
    KeyFileError,
    PolicyError,
    SignatureError,
    UnauthorizedDatasetError,
    UnauthorizedRoleError,
    UnauthorizedSourceError,
)
from trainguard.provenance.keys import VerifyingKey, load_verifying_key, verifying_key_from_pem
from trainguard.provenance.manifest import ROLES, Manifest
from trainguard.provenance.rollback import KEY_SET_NAME, RollbackScope, key_name, rollback_key

POLICY_LIMIT = 1024 * 1024
_SET_FIELDS = {"name", "keys", "threshold", "datasets", "sources", "roles"}


@dataclass(frozen=True)
class KeySet:
    """Keys of which `threshold` must sign, and the datasets, sources and roles their signatures vouch for."""

    keys: tuple[VerifyingKey, ...]
    threshold: int = 1
    name: str = ""
    datasets: tuple[str, ...] = ("*",)
    sources: tuple[str, ...] = ("*",)
    roles: tuple[str, ...] = ("train",)

    def __post_init__(self) -> None:
        if not self.keys:
            raise PolicyError(f"key set {self.label} lists no keys")
        if len({key.keyid for key in self.keys}) != len(self.keys):
            raise PolicyError(f"key set {self.label} lists the same key twice")
        if self.name and not KEY_SET_NAME.fullmatch(self.name):
            raise PolicyError(
                f"key set name {self.name!r} is not a safe name: up to 64 letters, digits, '.', '_' or '-', "
                "starting with a letter (its anti-rollback records are kept under it)"
            )
        if not 1 <= self.threshold <= len(self.keys):
            raise PolicyError(f"key set {self.label}: threshold {self.threshold} is out of range for {len(self.keys)}")
        unknown = sorted(set(self.roles) - set(ROLES))
        if unknown:
            raise PolicyError(f"key set {self.label}: unknown role {unknown[0]!r} (roles: {', '.join(ROLES)})")
        for field, patterns in (("datasets", self.datasets), ("sources", self.sources)):
            if not patterns or not all(isinstance(p, str) and p for p in patterns):
                raise PolicyError(f"key set {self.label}: {field} must be a non-empty list of names or patterns")

    @property
    def keyids(self) -> tuple[str, ...]:
        return tuple(key.keyid for key in self.keys)

    @property
    def label(self) -> str:
        """How messages name the set: its name, else its first keyid."""
        return self.name or (f"keys {self.keys[0].keyid[:16]}" if self.keys else "<no keys>")

    @property
    def namespace(self) -> str:
        """The set's stable name, where its anti-rollback records are kept and how shard identities and attributed
        sources name it: its policy name, else its first key's (`key:<keyid>`)."""
        return self.name or key_name(self.keys[0].keyid)

    def attributed_source(self, declared: str) -> str:
        """The source a shard this set signed counts as, for caps and evidence: the declared one when the policy
        grants it by name, else the set itself (`<namespace>/*`): a pattern grant lets the key mint names, which
        must buy it neither a larger cap nor fresh evidence."""
        if declared in self.sources and not any(c in declared for c in "*?["):
            return declared
        return f"{self.namespace}/*"

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the threshold and the sorted keyids: the namespace anti-rollback records were kept under
        before key sets had names, still consulted so records written then apply while the set is unchanged."""
        material = json.dumps([self.threshold, sorted(self.keyids)], separators=(",", ":"))
        return hashlib.sha256(b"trainguard-keyset-v1\n" + material.encode()).hexdigest()

    def unauthorized(self, manifest: Manifest) -> AuthorizationError | None:
        """The first claim of `manifest` this key set is not granted (dataset, then each shard's source and role)."""
        claims = ((f"shard {s.name} claims", s.name, s.source, s.role) for s in manifest.shards)
        return self.unauthorized_claims(manifest.dataset, claims)

    def unauthorized_claims(self, dataset: str, claims: Iterable[Claim]) -> AuthorizationError | None:
        """The first claim this key set is not granted: the dataset name, then each (who, shard, source, role)
        claim, a shard's or, for a binned manifest, the sources and roles its top level declares."""
        if not _matches(dataset, self.datasets):
            return UnauthorizedDatasetError(
                f"key set {self.label} may not sign dataset {dataset!r} (granted: {', '.join(self.datasets)})"
            )
        granted_sources: dict[str, bool] = {}  # a million shards name a handful of sources
        for who, shard, source, role in claims:
            if source is not None and source not in granted_sources:
                granted_sources[source] = _matches(source, self.sources)
            if source is not None and not granted_sources[source]:
                return UnauthorizedSourceError(
                    f"{who} source {source!r}, which key set {self.label} may not attribute "
                    f"(granted: {', '.join(self.sources)})",
                    shard=shard,
                )
            if role is not None and role not in self.roles:
                return UnauthorizedRoleError(
                    f"{who} role {role!r}, which key set {self.label} may not grant (granted: {', '.join(self.roles)})",
                    shard=shard,
                )
        return None


Claim = tuple[str, str | None, str | None, str | None]
"""(who claims, shard name or None, source or None, role or None), as authorisation messages name them."""


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatchcase(name, pattern) for pattern in patterns)


@dataclass(frozen=True)
class TrustPolicy:
    """The key sets a manifest may be signed by: it is accepted when one of them meets its threshold and is granted
    everything the manifest claims (dataset name, each shard's source and role).

    Attributes:
        key_sets: One or more `KeySet`s (keys, threshold, and the datasets, sources and roles granted), each under
            its own name (a set without one is named after its first key).

    Raises:
        PolicyError: No key sets, or two under the same name; with `of`, also an invalid key set (no keys, a
            threshold out of range, an unknown role).

    Example::

        from pathlib import Path
        from trainguard import TrustPolicy, load_trust
        from trainguard.provenance import load_verifying_key

        policy = load_trust(Path("configs/digits-trust.yaml"))  # the usual way: a policy file
        curator = load_verifying_key(Path("keys/curator.pub"))
        policy = TrustPolicy.of([curator], threshold=1, name="curator", roles=("trusted", "holdout"))
    """

    key_sets: tuple[KeySet, ...]

    def __post_init__(self) -> None:
        if not self.key_sets:
            raise PolicyError("the trust policy lists no key sets")
        namespaces = [key_set.namespace for key_set in self.key_sets]
        twice = next((n for n in namespaces if namespaces.count(n) > 1), None)
        if twice is not None:
            named = repr(twice) if not twice.startswith("key:") else f"after their first key {twice[4:20]}; name them"
            raise PolicyError(f"two key sets are named {named} (anti-rollback records are kept per key-set name)")

    @classmethod
    def of(cls, keys: Sequence[VerifyingKey], threshold: int = 1, **grants: Any) -> TrustPolicy:
        """A policy of one key set (`grants`: name, datasets, sources, roles)."""
        return cls((KeySet(tuple(keys), threshold, **grants),))

    @property
    def keyids(self) -> tuple[str, ...]:
        return tuple(keyid for key_set in self.key_sets for keyid in key_set.keyids)

    def signed_by(self, envelope: Envelope) -> tuple[Signed, ...]:
        """The key sets whose threshold the envelope meets, each with the keyids that signed for it; raises the
        first set's SignatureError when none is met."""
        signed: list[Signed] = []
        first_error: SignatureError | None = None
        for key_set in self.key_sets:
            try:
                signed.append(Signed(key_set, verify_envelope(envelope, key_set.keys, key_set.threshold)))
            except SignatureError as error:
                first_error = first_error or error
        if not signed:
            assert first_error is not None
            raise first_error
        return tuple(signed)

    def rollback_scope(self, envelope: Envelope, key_set: KeySet, dataset: str) -> RollbackScope:
        """Where a manifest of `dataset` that `key_set` accepted is checked for rollback: the namespaces of every
        key set holding a key that signed it (a key in two sets resets neither), recorded in `key_set`'s."""
        keys = {key.keyid: key for s in self.key_sets for key in s.keys}
        signers = frozenset(verify_envelope(envelope, tuple(keys.values()), 1))
        holding = [other for other in self.key_sets if not signers.isdisjoint(other.keyids)]
        return RollbackScope(
            dataset=dataset,
            key=rollback_key(key_set.namespace, dataset),
            keyids=frozenset(key_set.keyids),
            namespaces=frozenset(n for s in (key_set, *holding) for n in (s.namespace, s.fingerprint)),
            signers=signers,
            names=frozenset(s.namespace for s in self.key_sets),
        )


@dataclass(frozen=True)
class Signed:
    """A key set whose threshold an envelope met, and the keyids of its keys that signed."""

    key_set: KeySet
    signers: tuple[str, ...]


def granted(signed: Sequence[Signed], manifest: Manifest) -> Signed:
    """The first of the signing key sets granted everything the manifest claims; else the first refusal."""
    return _first_granted(signed, lambda key_set: key_set.unauthorized(manifest))


def granted_claims(signed: Sequence[Signed], dataset: str, sources: Iterable[str], roles: Iterable[str]) -> Signed:
    """`granted` for a binned manifest: the first signing key set granted its declared dataset, sources, roles."""
    claims: list[Claim] = [("the manifest declares", None, source, None) for source in sources]
    claims += [("the manifest declares", None, None, role) for role in roles]
    return _first_granted(signed, lambda key_set: key_set.unauthorized_claims(dataset, claims))


def _first_granted(signed: Sequence[Signed], refusal: Callable[[KeySet], AuthorizationError | None]) -> Signed:
    refusals = []
    for candidate in signed:
        problem = refusal(candidate.key_set)
        if problem is None:
            return candidate
        refusals.append(problem)
    raise refusals[0]


def load_trust(path: Path) -> TrustPolicy:
    """A trust policy from a policy file or a single PEM public key (1 of 1, role `train` only).

    Args:
        path: A policy in JSON (YAML for `.yaml`/`.yml`): a `signers` list of key sets, or one key set's fields
            (`keys`, `threshold`, `name`, `datasets`, `sources`, `roles`) at the top; key paths are relative to
            its folder. Or a PEM `.pub` file.

    Returns:
        The policy.

    Raises:
        PolicyError: The file cannot be read or parsed, or the policy is invalid (an unknown field, a bad
            threshold, a key that cannot be loaded or does not match the keyid pinned for it).
        KeyFileError: A PEM file that holds no usable public key.

    Example::

        from pathlib import Path
        from trainguard import load_trust, verify_dataset

        policy = load_trust(Path("configs/digits-trust.yaml"))
        report = verify_dataset(Path("data/train.manifest.json"), policy, dataset="digits-contributed")
    """
    path = Path(path)
    try:
        data = read_regular(path, limit=POLICY_LIMIT)
    except OSError as error:
        raise PolicyError(f"cannot read trust policy {path}: {error.strerror}", path=str(path)) from None
    if data.lstrip().startswith(b"-----BEGIN"):
        return TrustPolicy.of((verifying_key_from_pem(data, str(path)),), 1)
    document = _parse(data, path)
    if not isinstance(document, dict):
        raise PolicyError(f"{path}: a trust policy must be a mapping", path=str(path))
    try:
        if "signers" in document:
            if set(document) != {"signers"} or not isinstance(document["signers"], list):
                raise PolicyError("a policy with 'signers' holds only a list of key sets")
            return TrustPolicy(tuple(_key_set(entry, path, index) for index, entry in enumerate(document["signers"])))
        return TrustPolicy((_key_set(document, path, None),))
    except PolicyError as error:
        raise PolicyError(f"{path}: {error}", path=str(path), keyid=error.keyid) from None


def _parse(data: bytes, path: Path) -> object:
    from trainguard import strictyaml
    from trainguard.strictjson import StrictJSONError, loads

    try:
        if path.suffix in (".yaml", ".yml"):
            return strictyaml.loads(data)
        return loads(data)
    except (StrictJSONError, ValueError) as error:
        raise PolicyError(f"{path}: not a trust policy (JSON/YAML) nor a PEM key: {error}", path=str(path)) from None


def _key_set(entry: object, policy: Path, index: int | None) -> KeySet:
    where = "key set" if index is None else f"signers[{index}]"
    if not isinstance(entry, dict):
        raise PolicyError(f"{where} must be a mapping")
    unknown = sorted(set(entry) - _SET_FIELDS)
    if unknown:
        raise PolicyError(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(sorted(_SET_FIELDS))})")
    if not isinstance(entry.get("keys"), list):
        raise PolicyError(f"{where} needs a 'keys' list")
    threshold = entry.get("threshold", 1)
    if isinstance(threshold, bool) or not isinstance(threshold, int):
        raise PolicyError(f"{where}: threshold must be an integer")
    name = entry.get("name", "")
    if not isinstance(name, str):
        raise PolicyError(f"{where}: name must be a string")
    grants = {field: _names(entry, field, where) for field in ("datasets", "sources", "roles") if field in entry}
    return KeySet(tuple(_key(key, policy) for key in entry["keys"]), threshold, name, **grants)


def _names(entry: Mapping[str, Any], field: str, where: str) -> tuple[str, ...]:
    value = entry[field]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise PolicyError(f"{where}: {field} must be a list of strings")
    return tuple(value)


def _key(entry: object, policy: Path) -> VerifyingKey:
    pin = None
    if isinstance(entry, dict):
        pin = entry.get("keyid")
        if isinstance(entry.get("pem"), str):
            key = verifying_key_from_pem(entry["pem"].encode(), f"{policy} (inline key)")
        elif isinstance(entry.get("path"), str):
            key = _load(policy.parent / entry["path"])
        else:
            raise PolicyError("a key entry needs 'path' or 'pem'")
    elif isinstance(entry, str):
        key = _load(policy.parent / entry)
    else:
        raise PolicyError("a key entry must be a path or a mapping")
    if pin is not None and pin not in key.keyids:  # trainguard's keyid, or securesystemslib's (the envelope's label)
        raise PolicyError(f"key has keyid {key.keyid}, the policy pins {pin}", keyid=key.keyid)
    return key


def _load(path: Path) -> VerifyingKey:
    try:
        return load_verifying_key(path)
    except KeyFileError as error:
        raise PolicyError(f"trust policy key: {error}", path=str(path)) from None
