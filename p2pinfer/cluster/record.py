"""PeerRecord: what a peer says about itself, signed by its key and proven a cluster member.

Wire form (msgpack): {"r": record bytes, "k": Ed25519 public key, "s": signature, "m": membership MAC}.
The signature proves the record comes from the peer id it names (the id is derived from the key);
the MAC, keyed by the cluster secret, proves the signer belongs to this cluster. Both cover the
exact record bytes, so no field can change in transit.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import asdict, dataclass, field

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.ed25519 import Ed25519PublicKey as Libp2pEd25519PublicKey
from libp2p.peer.id import ID

MAX_RECORD_BYTES = 16 * 1024
_SIGN_TAG = b"p2pinfer/record/v1\x00"
_MAC_TAG = b"p2pinfer/member/v1\x00"


class RecordError(Exception):
    """A record that must be dropped; the message says why."""


@dataclass(frozen=True)
class PeerRecord:
    peer_id: str
    seq: int
    addrs: tuple[str, ...] = ()
    http_port: int = 0
    version: str = ""
    memory_total: int = 0
    memory_free: int = 0  # what this peer offers for new layers now, after --memory-limit
    compute: float = 0.0  # GFLOP/s measured at start-up
    backend: str = ""
    can_compute: bool = True
    models: tuple[str, ...] = ()  # models present locally
    layers: tuple[tuple[str, int, int], ...] = ()  # (model, start, end) loaded now
    loading: tuple[tuple[str, int, int, float], ...] = ()  # (model, start, end, progress 0..1)
    active_requests: int = 0
    leave: bool = False
    extra: dict = field(default_factory=dict)  # room to grow without a wire break

    def to_wire(self) -> dict:
        d = asdict(self)
        for k in ("addrs", "models", "layers", "loading"):
            d[k] = [list(x) if isinstance(x, tuple) else x for x in d[k]]
        return d

    @classmethod
    def from_wire(cls, d: dict) -> PeerRecord:
        if not isinstance(d, dict):
            raise RecordError("record is not a map")
        known = {f for f in cls.__dataclass_fields__}
        try:
            kw = {k: v for k, v in d.items() if k in known}
            kw["addrs"] = tuple(str(a) for a in kw.get("addrs", ()))
            kw["models"] = tuple(str(m) for m in kw.get("models", ()))
            kw["layers"] = tuple((str(m), int(a), int(b)) for m, a, b in kw.get("layers", ()))
            kw["loading"] = tuple((str(m), int(a), int(b), float(p)) for m, a, b, p in kw.get("loading", ()))
            rec = cls(**kw)
        except (TypeError, ValueError) as e:
            raise RecordError(f"record has a malformed field: {e}") from e
        if not isinstance(rec.peer_id, str) or not isinstance(rec.seq, int):
            raise RecordError("record lacks peer_id or seq")
        return rec


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, _MAC_TAG + body, hashlib.sha256).digest()


def seal(record: PeerRecord, private_key: Ed25519PrivateKey, secret: bytes) -> bytes:
    body = msgpack.packb(record.to_wire(), use_bin_type=True)
    envelope = {
        "r": body,
        "k": private_key.public_key().public_bytes_raw(),
        "s": private_key.sign(_SIGN_TAG + body),
        "m": _mac(secret, body),
    }
    data = msgpack.packb(envelope, use_bin_type=True)
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
    return data


def open_sealed(data: bytes, secret: bytes) -> PeerRecord:
    """Verify and decode a sealed record; raise RecordError naming what is wrong."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"oversized record ({len(data)} bytes > {MAX_RECORD_BYTES})")
    try:
        env = msgpack.unpackb(data, raw=False, max_bin_len=MAX_RECORD_BYTES, max_str_len=MAX_RECORD_BYTES)
        body, key, sig, mac = env["r"], env["k"], env["s"], env["m"]
        if not all(isinstance(x, bytes) for x in (body, key, sig, mac)):
            raise TypeError("envelope fields must be bytes")
    except Exception as e:
        raise RecordError(f"undecodable record envelope: {type(e).__name__}") from e
    if not hmac.compare_digest(mac, _mac(secret, body)):
        raise RecordError("not signed by a cluster member (membership proof fails)")
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, _SIGN_TAG + body)
    except (InvalidSignature, ValueError) as e:
        raise RecordError("bad signature") from e
    try:
        record = PeerRecord.from_wire(msgpack.unpackb(body, raw=False))
    except RecordError:
        raise
    except Exception as e:
        raise RecordError(f"undecodable record body: {type(e).__name__}") from e
    signer = ID.from_pubkey(Libp2pEd25519PublicKey.from_bytes(key)).to_base58()
    if record.peer_id != signer:
        raise RecordError(f"record names {record.peer_id} but is signed by {signer}")
    return record
