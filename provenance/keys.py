"""Signing keys: Ed25519 (default) and ECDSA P-256 in PEM files, each with two keyids.

`keyid` (hex SHA-256 of the DER SubjectPublicKeyInfo) is trainguard's name for a key: trust-policy pins, anti-rollback
namespaces and the signed cycle state hold it. `sslib_keyid` is the one securesystemslib (and so in-toto and TUF
tooling) computes for the same key; DSSE signatures are labelled with it, so `securesystemslib.dsse.Envelope.verify`
finds them. ECDSA signatures are DER-encoded over SHA-256, as Sigstore and OpenSSF model-signing make them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, get_args

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from typing_extensions import override

from trainguard.files import atomic_write, read_regular
from trainguard.provenance.errors import KeyFileError

KeyType = Literal["ed25519", "ecdsa-p256"]
"""The key types trainguard signs and verifies with: Ed25519 (the default) and ECDSA over P-256."""
KEY_TYPES: tuple[str, ...] = get_args(KeyType)
PASSPHRASE_ENV = "TRAINGUARD_KEY_PASSPHRASE"
KEY_FILE_LIMIT = 64 * 1024
"""The largest PEM key file read: real keys are a few hundred bytes."""


@dataclass(frozen=True)
class VerifyingKey:
    """A public key that checks signatures; equal keys have equal keyids.

    Made by `load_verifying_key` (a PEM file), or taken from a `SigningKey`'s `public`; it pickles as its PEM.

    Attributes:
        keyid: Hex SHA-256 of the key's DER SubjectPublicKeyInfo: what policies pin and anti-rollback records hold.
        key_type: `"ed25519"` or `"ecdsa-p256"`.
        _key: The `cryptography` public key object (private: not compared, not in the repr).
    """

    keyid: str
    key_type: KeyType
    _key: Any = field(repr=False, compare=False)

    @classmethod
    def from_public_key(cls, key: Any) -> VerifyingKey:
        return cls(keyid=_keyid(key), key_type=_key_type(key), _key=key)

    @cached_property
    def sslib_keyid(self) -> str:
        """securesystemslib's default keyid of the key (`SSlibKey.from_crypto(key).keyid`): the label of the
        signatures it makes in DSSE envelopes."""
        return _sslib_keyid(self._key, self.key_type)

    @property
    def keyids(self) -> tuple[str, str]:
        """Both names of the key, `keyid` first: a DSSE signature labelled with either is this key's to check."""
        return self.keyid, self.sslib_keyid

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when `signature` is this key's signature over `data`; False for any bad or malformed signature."""
        try:
            if self.key_type == "ed25519":
                self._key.verify(signature, data)
            else:
                self._key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True

    def to_pem(self) -> bytes:
        return bytes(
            self._key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )

    @override
    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        """Pickles as its PEM (the library's key objects do not pickle), so verified statements reach spawned
        DataLoader workers."""
        return verifying_key_from_pem, (self.to_pem(),)


@dataclass(frozen=True, repr=False)
class SigningKey:
    """A private key. Its repr and str show the keyid only, never key material, and pickling it raises TypeError.

    Made by `generate_signing_key` or `load_signing_key`.

    Attributes:
        public: Its public half; `keyid` and `key_type` are the public half's.
        _key: The `cryptography` private key object (private: not compared).
    """

    public: VerifyingKey
    _key: Any = field(compare=False)

    @property
    def keyid(self) -> str:
        return self.public.keyid

    @property
    def key_type(self) -> KeyType:
        return self.public.key_type

    def sign(self, data: bytes) -> bytes:
        if self.key_type == "ed25519":
            return bytes(self._key.sign(data))
        return bytes(self._key.sign(data, ec.ECDSA(hashes.SHA256())))

    @override
    def __repr__(self) -> str:
        return f"SigningKey(keyid={self.keyid!r}, key_type={self.key_type!r})"

    @override
    def __reduce__(self) -> Any:
        raise TypeError("a SigningKey is not picklable: it would copy private key material")


def generate_signing_key(key_type: KeyType = "ed25519") -> SigningKey:
    """A fresh private key of the given type, made in memory (`write_keypair` stores it).

    Args:
        key_type: `"ed25519"` (the default) or `"ecdsa-p256"`.

    Returns:
        The new key.

    Raises:
        KeyFileError: An unsupported key type.
    """
    if key_type == "ed25519":
        private: Any = ed25519.Ed25519PrivateKey.generate()
    elif key_type == "ecdsa-p256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise KeyFileError(f"unsupported key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    return SigningKey(public=VerifyingKey.from_public_key(private.public_key()), _key=private)


def public_key_path(private_key: Path) -> Path:
    """Where the public half of the private key file `NAME.key` lives: `NAME.pub` beside it."""
    return Path(private_key).with_suffix(".pub")


def write_keypair(
    key: SigningKey, out_prefix: Path, passphrase: bytes | None = None, *, overwrite: bool = False
) -> tuple[Path, Path]:
    """Writes `NAME.key` (PKCS#8 PEM, mode 0600, encrypted when a passphrase is given) and `NAME.pub`.

    Both files are written atomically; the private one is created with mode 0600, never wider.

    Args:
        key: The key pair to write.
        out_prefix: `NAME`, the path both files are named after (`NAME.key`, `NAME.pub`).
        passphrase: Encrypts the private key file (the best encryption available) when given.
        overwrite: Whether existing files (or links) at those paths are replaced instead of refused.

    Returns:
        The paths of the private and the public key file.

    Raises:
        KeyFileError: A file exists at either path (without `overwrite`), or the pair cannot be written.
    """
    out_prefix = Path(out_prefix)
    private_path = out_prefix.with_name(out_prefix.name + ".key")
    public_path = out_prefix.with_name(out_prefix.name + ".pub")
    if not overwrite:
        for path in (private_path, public_path):
            if path.exists() or path.is_symlink():
                raise KeyFileError(f"{path} exists; refusing to overwrite a key", path=str(path))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = key._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    try:
        atomic_write(private_path, pem, mode=0o600)  # created 0600 by mkstemp: no window with wider permissions
        atomic_write(public_path, key.public.to_pem())
    except OSError as error:
        raise KeyFileError(f"cannot write key pair {out_prefix}: {error.strerror}", path=str(out_prefix)) from None
    return private_path, public_path


def load_signing_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    """Reads a PEM private key; the passphrase defaults to $TRAINGUARD_KEY_PASSPHRASE.

    Args:
        path: A PEM private key file (a regular file of at most 64 KiB).
        passphrase: The key's passphrase; None: $TRAINGUARD_KEY_PASSPHRASE where set (an unencrypted key then
            loads too).

    Returns:
        The key.

    Raises:
        KeyFileError: The file cannot be read or is no PEM private key, the passphrase is wrong or missing, one was
            passed for an unencrypted key, or the key type is not supported.
    """
    path = Path(path)
    from_env = passphrase is None
    if from_env and os.environ.get(PASSPHRASE_ENV):
        passphrase = os.environ[PASSPHRASE_ENV].encode()
    data = _read(path, "private key")
    try:
        private = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError as error:
        if "not encrypted" in str(error) and from_env:
            private = _load_unencrypted(data, path)
        elif "not encrypted" in str(error):
            raise KeyFileError(f"{path}: a passphrase was given but the key is not encrypted", path=str(path)) from None
        else:
            raise KeyFileError(f"{path}: key is encrypted: set {PASSPHRASE_ENV}", path=str(path)) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(
            f"{path}: not a PEM private key, or wrong passphrase (${PASSPHRASE_ENV})", path=str(path)
        ) from None
    _key_type(private.public_key(), path)
    return SigningKey(public=VerifyingKey.from_public_key(private.public_key()), _key=private)


def _load_unencrypted(data: bytes, path: Path) -> Any:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a PEM private key", path=str(path)) from None


def load_verifying_key(path: Path) -> VerifyingKey:
    """Reads a PEM public key (SubjectPublicKeyInfo), e.g. the `.pub` that `write_keypair` wrote.

    Args:
        path: The PEM public key file (a regular file of at most 64 KiB).

    Returns:
        The key.

    Raises:
        KeyFileError: The file cannot be read, is no PEM public key, or holds an unsupported key type.
    """
    path = Path(path)
    return verifying_key_from_pem(_read(path, "public key"), str(path))


def verifying_key_from_pem(data: bytes, where: str = "public key") -> VerifyingKey:
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyFileError(f"{where}: not a PEM public key", path=where) from None
    _key_type(public, where)
    return VerifyingKey.from_public_key(public)


def _read(path: Path, what: str) -> bytes:
    """A key file's bytes: a regular file of at most KEY_FILE_LIMIT bytes (a FIFO or device is refused unread)."""
    try:
        return read_regular(path, limit=KEY_FILE_LIMIT)
    except OSError as error:
        raise KeyFileError(f"cannot read {what} {path}: {error.strerror}", path=str(path)) from None


def _keyid(public: Any) -> str:
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _sslib_keyid(public: Any, key_type: KeyType) -> str:
    """securesystemslib's `compute_default_keyid`: SHA-256 of the canonical JSON of keytype, scheme and the public
    value (raw hex for Ed25519, PEM for ECDSA). Its canonical encoder is imported alone: the signer package that holds
    the function costs a quarter of a second to import, on every key load."""
    from securesystemslib.formats import encode_canonical

    if key_type == "ed25519":
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        document = {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": raw.hex()}}
    else:
        pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        document = {"keytype": "ecdsa", "scheme": "ecdsa-sha2-nistp256", "keyval": {"public": pem.decode()}}
    canonical = encode_canonical(document)
    assert isinstance(canonical, str)  # it returns None only when given an output function
    return hashlib.sha256(canonical.encode()).hexdigest()


def _key_type(public: Any, where: object = "key") -> KeyType:
    if isinstance(public, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        return "ecdsa-p256"
    raise KeyFileError(f"{where}: unsupported key type; use {' or '.join(KEY_TYPES)}", path=str(where))
