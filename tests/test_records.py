"""Record verification and the View (pure: no network, no sleeping)."""

from __future__ import annotations

import secrets

import msgpack
import pytest

from p2pinfer.cluster.record import MAX_RECORD_BYTES, PeerRecord, RecordError, open_sealed, seal
from p2pinfer.cluster.view import Rejected, View
from p2pinfer.identity import Identity, IdentityError, JoinToken

SECRET = secrets.token_bytes(32)


def member(seed: int = 1) -> Identity:
    return Identity(bytes([seed]) * 32)


def record_of(ident: Identity, seq: int = 10, **kw) -> PeerRecord:
    return PeerRecord(peer_id=ident.peer_id.to_base58(), seq=seq, addrs=("/ip4/127.0.0.1/tcp/1",), **kw)


def test_sealed_record_round_trips():
    m = member()
    rec = record_of(m, layers=(("smollm2-135m", 0, 10),), memory_free=123)
    assert open_sealed(seal(rec, m.signing_key, SECRET), SECRET) == rec


def test_record_signed_by_non_member_is_rejected():
    outsider = member(7)
    data = seal(record_of(outsider), outsider.signing_key, secrets.token_bytes(32))
    with pytest.raises(RecordError, match="not signed by a cluster member"):
        open_sealed(data, SECRET)


def test_member_record_with_changed_field_is_rejected():
    m = member()
    env = msgpack.unpackb(seal(record_of(m, memory_free=1), m.signing_key, SECRET))
    body = msgpack.unpackb(env["r"])
    body["memory_free"] = 10**12
    env["r"] = msgpack.packb(body)
    # a non-member could not fix up the MAC; a member forging another's record fails the signature
    from p2pinfer.cluster.record import _mac

    with pytest.raises(RecordError, match="membership proof"):
        open_sealed(msgpack.packb(env), SECRET)
    env["m"] = _mac(SECRET, env["r"])
    with pytest.raises(RecordError, match="bad signature"):
        open_sealed(msgpack.packb(env), SECRET)


def test_member_cannot_speak_for_another_peer():
    a, b = member(1), member(2)
    forged = record_of(a)  # names a, signed by b
    with pytest.raises(RecordError, match="signed by"):
        open_sealed(seal(forged, b.signing_key, SECRET), SECRET)


def test_older_seq_is_rejected_even_after_expiry():
    m = member()
    view = View(self_id="me", ttl=6)
    assert view.apply(record_of(m, seq=5), now=0) is True
    with pytest.raises(Rejected):
        view.apply(record_of(m, seq=5), now=1)
    with pytest.raises(Rejected):
        view.apply(record_of(m, seq=4), now=1)
    assert view.expire(now=100) == [m.peer_id.to_base58()]
    with pytest.raises(Rejected):  # a replay of an old record cannot resurrect an expired peer
        view.apply(record_of(m, seq=5), now=101)
    assert view.apply(record_of(m, seq=6), now=101) is True


def test_leave_removes_at_once():
    m = member()
    view = View(self_id="me", ttl=6)
    view.apply(record_of(m, seq=1), now=0)
    assert view.apply(record_of(m, seq=2, leave=True), now=0) is True
    assert m.peer_id.to_base58() not in view


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 10,
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"r": 1, "k": 2, "s": 3, "m": 4}),
        b"\xff" * 100,
    ],
)
def test_junk_is_rejected_cleanly(data):
    with pytest.raises(RecordError):
        open_sealed(data, SECRET)


def test_oversized_record_is_rejected_before_decoding():
    with pytest.raises(RecordError, match="oversized"):
        open_sealed(b"\x00" * (MAX_RECORD_BYTES + 1), SECRET)
    m = member()
    with pytest.raises(RecordError, match="exceeds"):
        seal(record_of(m, models=tuple(f"model-{i}" * 20 for i in range(200))), m.signing_key, SECRET)


def test_join_token_round_trip_and_corruption():
    tok = JoinToken(SECRET, ("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooW",))
    assert JoinToken.decode(tok.encode()) == tok
    with pytest.raises(IdentityError):
        JoinToken.decode(tok.encode()[:-5])
    with pytest.raises(IdentityError):
        JoinToken.decode("garbage")
