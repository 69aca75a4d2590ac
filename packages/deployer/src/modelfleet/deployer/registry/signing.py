"""Ed25519 signing of model digests (contract section 4).

A signature is base64 of Ed25519 over the 32 raw bytes of the sha256 digest;
the key id is the first 16 hex characters of sha256(raw public key).
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modelfleet.deployer.errors import SigningError

PRIVATE_KEY_FILE = "signing-key.pem"
PUBLIC_KEY_FILE = "signing-key.pub.pem"


@dataclass(frozen=True)
class Signature:
    signature: str  # base64
    key_id: str


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(
            f"cannot read signing key {path}: {exc.strerror or exc}",
            hint="create one with `modelfleet keys generate --out DIR`",
        ) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SigningError(
            f"{path} is not an unencrypted PEM private key",
            hint="create one with `modelfleet keys generate --out DIR`",
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(
            f"{path} holds a {type(key).__name__.lstrip('_')}, not an Ed25519 private key",
            hint="create one with `modelfleet keys generate --out DIR`",
        )
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise SigningError(f"{path} is not a readable PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} is not an Ed25519 public key")
    return key


def sign_digest(key: Ed25519PrivateKey, sha256_hex: str) -> Signature:
    sig = key.sign(bytes.fromhex(sha256_hex))
    return Signature(base64.b64encode(sig).decode("ascii"), key_id(key.public_key()))


def verify_digest(public_key: Ed25519PublicKey, sha256_hex: str, signature_b64: str) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(base64.b64decode(signature_b64), bytes.fromhex(sha256_hex))
    except (InvalidSignature, ValueError):
        return False
    return True


def generate_key_pair(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write a new key pair to `out_dir`; returns (private, public, key id)."""
    private_path = out_dir / PRIVATE_KEY_FILE
    public_path = out_dir / PUBLIC_KEY_FILE
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise SigningError(
            f"{private_path} already exists; refusing to overwrite a signing key",
            hint="choose another --out folder, or pass --force",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path, key_id(key.public_key())
