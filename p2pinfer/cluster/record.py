"""Gossip messages: what a peer says about itself, signed by its key and proven a cluster member.

Three kinds, every one signed (Ed25519, by the peer it names) and MAC'd (keyed by the cluster secret):

- PeerRecord, the full record (addresses, memory, models, layers, ...), sent when it changes, when
  asked, and every ~30 s. Wire (msgpack map): {"r": record bytes, "k": Ed25519 public key,
  "s": signature, "m": membership MAC}.
- Heartbeat (peer, seq, the seq of its current full record, load: active requests and free memory),
  sent in between, ~160 bytes. Wire (msgpack array): ["h", body, signature, 16-byte MAC], body =
  msgpack [peer id bytes, seq, record seq, active requests, memory free]. No key on the wire: an
  Ed25519 peer id embeds its public key.
- Want: "please republish your full record", naming peers whose heartbeat reached the sender before
  (or without) their full record. Wire: ["w", body, signature, 16-byte MAC], body = msgpack
  [sender peer id bytes, [wanted peer id bytes, ...]].

The signature proves the message comes from the peer id it names (the id is derived from the key);
the MAC proves the signer belongs to this cluster. Both cover the exact body bytes, so no field can
change in transit. Records and heartbeats share one seq counter per peer (wall-clock microseconds),
so the highest seq wins across both kinds.
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
MAX_WANTED = 128  # peer ids per Want
_SIGN_TAG = b"p2pinfer/record/v1\x00"
_MAC_TAG = b"p2pinfer/member/v1\x00"
_HB_SIGN_TAG = b"p2pinfer/heartbeat/v1\x00"
_WANT_SIGN_TAG = b"p2pinfer/want/v1\x00"
_SHORT_MAC_BYTES = 16


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
    # (model, start, end, bytes done, bytes total) of a range whose weights are being fetched from peers
    fetching: tuple[tuple[str, int, int, int, int], ...] = ()
    # models whose chunks this peer uploads: (name, file sha256, manifest root, size, part ranges [[a, b)...])
    weights: tuple[tuple[str, str, str, int, tuple[tuple[int, int], ...]], ...] = ()
    fetches: bool = False  # fetches a range's weights it lacks (serve/fetch.py): elected without the file
    active_requests: int = 0
    leave: bool = False
    draining: bool = False  # finishing its requests before leaving: elect no new ring with it
    extra: dict = field(default_factory=dict)  # room to grow without a wire break

    def to_wire(self) -> dict:
        d = asdict(self)
        for k in ("addrs", "models", "layers", "loading", "fetching"):
            d[k] = [list(x) if isinstance(x, tuple) else x for x in d[k]]
        d["weights"] = [[n, h, r, size, [list(p) for p in parts]] for n, h, r, size, parts in self.weights]
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
            kw["fetching"] = tuple(
                (str(m), int(a), int(b), int(d), int(t)) for m, a, b, d, t in kw.get("fetching", ())
            )
            kw["weights"] = tuple(
                (str(n), str(h), str(r), int(size), tuple((int(a), int(b)) for a, b in parts))
                for n, h, r, size, parts in kw.get("weights", ())
            )
            kw["fetches"] = bool(kw.get("fetches", False))
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


@dataclass(frozen=True)
class Heartbeat:
    """Between full records: "still here" plus the two fields that change all the time."""

    peer_id: str
    seq: int
    record_seq: int  # seq of the full record the peer last published: a receiver holding an older one asks
    active_requests: int = 0
    memory_free: int = 0


@dataclass(frozen=True)
class Want:
    """Ask the named peers to republish their full records."""

    peer_id: str  # who asks
    wanted: tuple[str, ...]


def _short_mac(secret: bytes, tag: bytes, body: bytes) -> bytes:
    return hmac.new(secret, _MAC_TAG + tag + body, hashlib.sha256).digest()[:_SHORT_MAC_BYTES]


def _seal_compact(kind: str, tag: bytes, body: bytes, private_key: Ed25519PrivateKey, secret: bytes) -> bytes:
    return msgpack.packb([kind, body, private_key.sign(tag + body), _short_mac(secret, tag, body)])


def seal_heartbeat(hb: Heartbeat, private_key: Ed25519PrivateKey, secret: bytes) -> bytes:
    body = msgpack.packb(
        [ID.from_base58(hb.peer_id).to_bytes(), hb.seq, hb.record_seq, hb.active_requests, hb.memory_free]
    )
    return _seal_compact("h", _HB_SIGN_TAG, body, private_key, secret)


def seal_want(want: Want, private_key: Ed25519PrivateKey, secret: bytes) -> bytes:
    wanted = [ID.from_base58(p).to_bytes() for p in want.wanted[:MAX_WANTED]]
    body = msgpack.packb([ID.from_base58(want.peer_id).to_bytes(), wanted])
    return _seal_compact("w", _WANT_SIGN_TAG, body, private_key, secret)


def _peer_of(raw: bytes) -> tuple[str, Ed25519PublicKey]:
    """The peer id in `raw` and the Ed25519 key it embeds; RecordError for anything else."""
    try:
        pid = ID(raw)
        key = pid.extract_public_key()
    except Exception as e:
        raise RecordError(f"undecodable peer id: {type(e).__name__}") from e
    if not isinstance(key, Libp2pEd25519PublicKey):
        raise RecordError("peer id does not embed an Ed25519 key")
    return pid.to_base58(), Ed25519PublicKey.from_public_bytes(key.to_bytes())


def _open_compact(env: list, secret: bytes) -> Heartbeat | Want:
    if len(env) != 4 or not all(isinstance(x, bytes) for x in env[1:]):
        raise RecordError("undecodable record envelope: bad compact envelope")
    kind, body, sig, mac = env
    tag = {"h": _HB_SIGN_TAG, "w": _WANT_SIGN_TAG}.get(kind)
    if tag is None:
        raise RecordError(f"undecodable record envelope: unknown kind {str(kind)[:8]!r}")
    if not hmac.compare_digest(mac, _short_mac(secret, tag, body)):
        raise RecordError("not signed by a cluster member (membership proof fails)")
    try:
        fields = msgpack.unpackb(body, raw=False, max_array_len=MAX_WANTED + 8)
        if not isinstance(fields, list) or not isinstance(fields[0], bytes):
            raise TypeError("body must be a list starting with a peer id")
    except Exception as e:
        raise RecordError(f"undecodable {kind!r} body: {type(e).__name__}") from e
    peer_id, key = _peer_of(fields[0])
    try:
        key.verify(sig, tag + body)
    except InvalidSignature as e:
        raise RecordError("bad signature") from e
    try:
        if kind == "h":
            _pid, seq, record_seq, active, free = fields
            if not all(type(x) is int and x >= 0 for x in (seq, record_seq, active, free)):
                raise TypeError("heartbeat fields must be non-negative integers")
            return Heartbeat(peer_id, seq, record_seq, active, free)
        _pid, wanted = fields
        if not isinstance(wanted, list) or not all(isinstance(w, bytes) for w in wanted):
            raise TypeError("wanted must be a list of peer ids")
        return Want(peer_id, tuple(ID(w).to_base58() for w in wanted[:MAX_WANTED]))
    except Exception as e:
        raise RecordError(f"malformed {kind!r} message: {e}") from e


def open_message(data: bytes, secret: bytes) -> PeerRecord | Heartbeat | Want:
    """Verify and decode any gossip message; raise RecordError naming what is wrong."""
    if len(data) > MAX_RECORD_BYTES:
        raise RecordError(f"oversized record ({len(data)} bytes > {MAX_RECORD_BYTES})")
    if data[:1] and 0x90 <= data[0] <= 0x9F:  # a msgpack fixarray: the compact kinds
        try:
            env = msgpack.unpackb(data, raw=False, max_bin_len=MAX_RECORD_BYTES, max_str_len=64)
        except Exception as e:
            raise RecordError(f"undecodable record envelope: {type(e).__name__}") from e
        return _open_compact(env, secret)
    return open_sealed(data, secret)
