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


# --- heartbeats and wants ---------------------------------------------------------------------

from p2pinfer.cluster.announce import FULL_INTERVAL, Announcer, StaleRecord  # noqa: E402
from p2pinfer.cluster.record import Heartbeat, Want, open_message, seal_heartbeat, seal_want  # noqa: E402
from p2pinfer.cluster.view import Unknown  # noqa: E402


def hb_of(ident: Identity, seq: int, record_seq: int = 1, active: int = 0, free: int = 0) -> Heartbeat:
    return Heartbeat(ident.peer_id.to_base58(), seq, record_seq, active, free)


def test_heartbeat_and_want_round_trip_and_stay_small():
    m = member()
    hb = hb_of(m, 2**52, 2**52 - 5, 3, 8 * 2**30)
    data = seal_heartbeat(hb, m.signing_key, SECRET)
    assert open_message(data, SECRET) == hb
    assert len(data) < 180
    want = Want(m.peer_id.to_base58(), (member(2).peer_id.to_base58(), member(3).peer_id.to_base58()))
    assert open_message(seal_want(want, m.signing_key, SECRET), SECRET) == want
    rec = record_of(m)
    assert open_message(seal(rec, m.signing_key, SECRET), SECRET) == rec


def test_heartbeat_forgeries_are_rejected():
    a, b = member(1), member(2)
    with pytest.raises(RecordError, match="not signed by a cluster member"):
        open_message(seal_heartbeat(hb_of(a, 5), a.signing_key, secrets.token_bytes(32)), SECRET)
    with pytest.raises(RecordError, match="bad signature"):  # b speaking for a
        open_message(seal_heartbeat(hb_of(a, 5), b.signing_key, SECRET), SECRET)
    env = msgpack.unpackb(seal_heartbeat(hb_of(a, 5, active=1), a.signing_key, SECRET))
    fields = msgpack.unpackb(env[1])
    fields[3] = 0  # claim no load
    env[1] = msgpack.packb(fields)
    with pytest.raises(RecordError):
        open_message(msgpack.packb(env), SECRET)
    for junk in (msgpack.packb(["h", b"", b"", b""]), msgpack.packb(["x", b"1", b"2", b"3"]), b"\x94\xc1"):
        with pytest.raises(RecordError):
            open_message(junk, SECRET)


def test_heartbeat_refreshes_only_known_peers_and_highest_seq_wins():
    m = member()
    pid = m.peer_id.to_base58()
    view = View(self_id="me", ttl=6)
    with pytest.raises(Unknown):  # a heartbeat cannot add a peer
        view.heartbeat(hb_of(m, 5), now=0)
    assert pid not in view
    view.apply(record_of(m, seq=10, memory_free=100), now=0)
    assert view.heartbeat(hb_of(m, 11, record_seq=10, active=2, free=50), now=5) is False
    rec = view.get(pid)
    assert (rec.active_requests, rec.memory_free, rec.seq) == (2, 50, 11)
    assert view.expire(now=10) == []  # refreshed at 5
    with pytest.raises(Rejected):
        view.heartbeat(hb_of(m, 11), now=6)
    with pytest.raises(Rejected):  # a full record older than a heartbeat seen
        view.apply(record_of(m, seq=11), now=6)
    assert view.heartbeat(hb_of(m, 12, record_seq=12), now=6) is True  # announces a newer record: ask


class Clock:
    def __init__(self):
        self.t = 1_000_000

    def __call__(self):
        return self.t


def announcer(seed: int, ttl: float = 6.0, **describe) -> Announcer:
    ident = member(seed)
    desc = {"addrs": ("/ip4/127.0.0.1/tcp/1",), "active_requests": 0, "memory_free": 0, **describe}
    return Announcer(ident.peer_id.to_base58(), ident.signing_key, SECRET, lambda: dict(desc), ttl)


def kinds(messages):
    return [type(open_message(m, SECRET)).__name__ for m in messages]


def test_announcer_sends_full_record_then_heartbeats_then_full_on_change():
    desc = {"addrs": ("/ip4/127.0.0.1/tcp/1",), "active_requests": 0, "memory_free": 0, "models": ()}
    ident = member(1)
    a = Announcer(ident.peer_id.to_base58(), ident.signing_key, SECRET, lambda: dict(desc), 6.0)
    assert kinds(a.tick(0.0)) == ["PeerRecord"]
    assert a.tick(0.1) == []
    t = a.next_due()
    assert 1.0 < t <= a.interval
    assert kinds(a.tick(t)) == ["Heartbeat"]
    desc["active_requests"] = 1  # load: an early heartbeat, not a full record
    a.poke()
    assert kinds(a.tick(t + 0.3)) == ["Heartbeat"]
    desc["models"] = ("m",)  # the record changed: a full record
    a.poke()
    assert kinds(a.tick(t + 0.6)) == ["PeerRecord"]
    t = t + 0.6
    while t < FULL_INTERVAL + 5:
        t = max(t, a.next_due())
        sent = kinds(a.tick(t))
        t += 0.01
        if "PeerRecord" in sent:
            break
    assert FULL_INTERVAL - 2 < t < FULL_INTERVAL + 3  # refreshed every ~30 s


def test_announcer_after_leave_sends_nothing_and_is_never_due():
    # a loop that waits for next_due would spin without yielding if it stayed in the past
    a = announcer(1)
    a.tick(0.0)
    a.poke()
    a.leave(0.5)
    assert a.tick(100.0) == [] and a.next_due() == float("inf")

def test_unknown_heartbeat_leads_to_a_want_and_a_republished_record():
    a, b = announcer(1), announcer(2)
    a_full = a.tick(0.0)[0]
    b.tick(0.0)  # b's first full record is lost
    hb = b.tick(b.next_due())[0]
    assert b.receive(b.check(a_full), 0.1).kind == "joined"
    got = a.receive(a.check(hb), 1.6)
    assert got.kind == "unknown" and b.peer_id not in a.view
    out = [m for m in a.tick(2.0) if kinds([m]) == ["Want"]]  # (with a's own heartbeat)
    assert len(out) == 1 and open_message(out[0], SECRET).wanted == (b.peer_id,)
    assert b.receive(b.check(out[0]), 2.0).kind == "other"
    sent = b.tick(max(2.0, b.next_due()))
    assert kinds(sent) == ["PeerRecord"]
    assert a.receive(a.check(sent[0]), 2.1).kind == "joined"
    assert b.peer_id in a.view


def test_someone_elses_want_suppresses_ours():
    a, b, c = announcer(1), announcer(2), announcer(3)
    a.tick(0.0), b.tick(0.0), c.tick(0.0)
    hb = b.tick(b.next_due())[0]
    a.receive(a.check(hb), 1.6)
    c.receive(c.check(hb), 1.6)
    want = [m for m in c.tick(2.1) if kinds([m]) == ["Want"]]
    assert len(want) == 1
    a.receive(a.check(want[0]), 2.1)
    assert "Want" not in kinds(a.tick(3.0))


def test_stale_and_own_messages():
    a, b = announcer(1), announcer(2)
    first = b.tick(0.0)[0]
    hb = b.tick(b.next_due())[0]
    a.receive(a.check(first), 0)
    a.receive(a.check(hb), 2)
    with pytest.raises(StaleRecord):  # redelivered after a newer one (e.g. after a restart): dropped
        a.check(first)
    with pytest.raises(StaleRecord):
        a.check(hb)
    # our own record from before a restart comes round: our next seq goes above it
    restarted = announcer(2)
    restarted._seq = 0
    restarted.receive(restarted.check(hb), 0)
    assert open_message(restarted.tick(0.0)[0], SECRET).seq > open_message(hb, SECRET).seq


def test_expiry_waits_longer_when_nobody_at_all_is_heard():
    a, b = member(1), member(2)
    view = View(self_id="me", ttl=6)
    view.apply(record_of(a, seq=1), now=0)
    view.apply(record_of(b, seq=1), now=0)
    assert view.expire(now=7) == []  # silent 7 s, but so is everyone: maybe we are the stalled one
    view.heartbeat(hb_of(b, 2), now=4)
    assert view.expire(now=7) == [a.peer_id.to_base58()]  # b was heard 4 s after a went quiet
    assert view.expire(now=15) == []
    assert view.expire(now=16.5) == [b.peer_id.to_base58()]  # alone and silent for 2 TTLs
