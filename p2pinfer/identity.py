"""This peer's identity on disk: Ed25519 key (0600), cluster secret, join tokens."""

from __future__ import annotations

import base64
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

KEY_FILE = "identity.key"
SECRET_FILE = "cluster.secret"
TOKEN_PREFIX = "p2pinfer1:"
SECRET_BYTES = 32


class IdentityError(Exception):
    """A key, secret or token that cannot be used; the message says which and why."""


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` with mode 0600 from the start, so the secret is never world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


@dataclass(frozen=True)
class Identity:
    """One Ed25519 seed, seen as a libp2p key pair (for the host) and a signing key (for records)."""

    seed: bytes

    @property
    def key_pair(self) -> KeyPair:
        return create_new_key_pair(self.seed)

    @property
    def signing_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    @property
    def peer_id(self) -> ID:
        return ID.from_pubkey(self.key_pair.public_key)


def load_or_create_identity(data_dir: Path) -> Identity:
    """This peer's identity, created on first start and reused after."""
    path = data_dir / KEY_FILE
    if path.exists():
        try:
            seed = bytes.fromhex(path.read_text().strip())
        except (OSError, ValueError) as e:
            raise IdentityError(f"cannot read the identity key {path}: {e}") from e
        if len(seed) != 32:
            raise IdentityError(f"identity key {path} is not a 32-byte Ed25519 seed")
    else:
        seed = secrets.token_bytes(32)
        _write_private(path, seed.hex().encode() + b"\n")
    return Identity(seed)


def parse_secret(text: str, source: str) -> bytes:
    try:
        secret = bytes.fromhex(text.strip())
    except ValueError:
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise IdentityError(f"cluster secret in {source} must be {SECRET_BYTES * 2} hex characters")
    return secret


def read_secret_file(path: Path) -> bytes:
    try:
        text = path.read_text()
    except OSError as e:
        raise IdentityError(f"cannot read the cluster secret file {path}: {e.strerror or e}") from e
    return parse_secret(text, str(path))


def load_or_create_secret(data_dir: Path, secret_file: Path | None = None) -> bytes:
    """The cluster secret: from `secret_file` when given, else the data dir's, created on first start."""
    if secret_file is not None:
        return read_secret_file(secret_file)
    path = data_dir / SECRET_FILE
    if path.exists():
        return read_secret_file(path)
    secret = secrets.token_bytes(SECRET_BYTES)
    _write_private(path, secret.hex().encode() + b"\n")
    return secret


def store_secret(data_dir: Path, secret: bytes) -> None:
    """Keep a secret learned from a join token, so a restart stays in the cluster."""
    _write_private(data_dir / SECRET_FILE, secret.hex().encode() + b"\n")


@dataclass(frozen=True)
class JoinToken:
    secret: bytes
    addrs: tuple[str, ...]

    def encode(self) -> str:
        body = json.dumps({"s": self.secret.hex(), "a": list(self.addrs)}, separators=(",", ":"))
        return TOKEN_PREFIX + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> JoinToken:
        token = token.strip()
        if not token.startswith(TOKEN_PREFIX):
            raise IdentityError(f"join token must start with {TOKEN_PREFIX!r}")
        b64 = token[len(TOKEN_PREFIX) :]
        try:
            body = json.loads(base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)))
            secret = parse_secret(body["s"], "the join token")
            addrs = tuple(str(a) for a in body["a"])
        except IdentityError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise IdentityError("join token is corrupt (copy it again whole)") from e
        return cls(secret, addrs)
