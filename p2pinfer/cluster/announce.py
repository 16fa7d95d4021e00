"""Announcer: what this peer gossips and when, and what it makes of what it hears.

Pure state, no I/O: the caller passes `now` (monotonic seconds) and publishes what `tick` returns,
so the same logic runs in the agent (p2pinfer/membership.py) and in the in-process simulation
(benchmarks/gossip_sim.py).

What goes out:
- A full signed PeerRecord when the record changed (anything but load and free memory), when some
  peer asks for it, when a new gossip neighbour appears, and every FULL_INTERVAL otherwise; never
  more often than MIN_FULL_GAP.
- A Heartbeat (peer, seq, seq of the full record, active requests, free memory) every
  `heartbeat_interval(ttl)` (a quarter of the TTL, 0.25-2 s, jittered), and early when the load
  changes (at most every HEARTBEAT_MIN_GAP).
- A Want naming peers we hear heartbeats from without holding their full record (new peers, peers
  expired here, a missed record), after a random WANT_DELAY: if some other peer asks first, or the
  record arrives meanwhile, we do not ask; one ask per peer per WANT_REPEAT.

What comes in (already verified by `check`, the gossipsub validator): full records go to the View
(highest seq wins, a signed leave removes at once), heartbeats refresh only peers whose full record
the View holds (one from an unknown peer adds nothing; it schedules a Want), Wants naming us make
us republish.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2pinfer.cluster.record import (
    Heartbeat,
    PeerRecord,
    RecordError,
    Want,
    open_message,
    seal,
    seal_heartbeat,
    seal_want,
)
from p2pinfer.cluster.view import Rejected, Unknown, View

FULL_INTERVAL = 30.0
MIN_FULL_GAP = 1.0
HEARTBEAT_MIN_GAP = 0.25
WANT_DELAY = (0.05, 0.4)
WANT_REPEAT = 2.0
VOLATILE = ("active_requests", "memory_free")  # carried by heartbeats; a change is no reason for a full record


def heartbeat_interval(ttl: float) -> float:
    """Four heartbeats per TTL: a peer expires only after missing all four."""
    return min(2.0, max(0.25, ttl / 4))


class StaleRecord(RecordError):
    def __init__(self, msg: PeerRecord | Heartbeat, last: int) -> None:
        self.behind_s = (last - msg.seq) / 1e6  # seq counts wall-clock microseconds
        what = "record" if isinstance(msg, PeerRecord) else "heartbeat"
        super().__init__(
            f"replayed or older {what} of {msg.peer_id} (seq {msg.seq} <= {last}, {self.behind_s:.1f} s behind)"
        )


@dataclass(frozen=True)
class Received:
    kind: str  # "joined", "updated", "left", "refreshed", "unknown" (heartbeat of a peer not held), "other"
    record: PeerRecord | None = None


def _wall_us() -> int:
    return time.time_ns() // 1000


class Announcer:
    def __init__(
        self,
        peer_id: str,
        signing_key: Ed25519PrivateKey,
        secret: bytes,
        describe: Callable[[], dict],
        ttl: float,
        *,
        rng: random.Random | None = None,
        wall_us: Callable[[], int] = _wall_us,
    ) -> None:
        self.peer_id = peer_id
        self._key = signing_key
        self._secret = secret
        self.describe = describe
        self.view = View(peer_id, ttl)
        self.interval = heartbeat_interval(ttl)
        self._rng = rng or random.Random()
        self._wall_us = wall_us
        # Wall-clock microseconds: seq keeps rising across restarts, so peers accept a restarted agent.
        self._seq = wall_us()
        self._record_seq = 0
        self._published_stable: dict | None = None
        self._sent_volatile: tuple | None = None
        self._last_full = -1e9
        self._last_sent = -1e9
        self._next_heartbeat = 0.0
        self._full_wanted = True
        self._dirty = False
        self._wants: dict[str, float] = {}  # peer -> when to ask for its full record
        self._asked: dict[str, float] = {}  # peer -> when someone (we or another peer) last asked
        self.leaving = False
        self.extra: dict = {}  # merged into the record's `extra` (orchestrate/measure.py: rtt, tps)

    # --- our side ---------------------------------------------------------------------------
    def poke(self) -> None:
        """Something we describe changed: look at it at the next tick rather than the next heartbeat."""
        self._dirty = True

    def new_neighbour(self) -> None:
        """A peer subscribed to the topic next to us: it needs our full record."""
        self._full_wanted = True

    def next_due(self) -> float:
        """When `tick` next has something to send (it may be in the past; never, once we have left)."""
        if self.leaving:
            return math.inf
        due = [self._next_heartbeat, self._last_full + FULL_INTERVAL]
        if self._full_wanted:
            due.append(self._last_full + MIN_FULL_GAP)
        if self._dirty:
            due.append(self._last_sent + HEARTBEAT_MIN_GAP)
        if self._wants:
            due.append(min(self._wants.values()))
        return min(due)

    def tick(self, now: float) -> list[bytes]:
        """The messages to publish now (possibly none)."""
        if self.leaving:
            return []
        out = []
        if self._dirty or self._full_wanted or now >= min(self._next_heartbeat, self._last_full + FULL_INTERVAL):
            out += self._ours(now)
        if self._wants and min(self._wants.values()) <= now:
            want = self._due_want(now)
            if want is not None:
                out.append(want)
        return out

    def _ours(self, now: float) -> list[bytes]:
        desc = self.describe()
        if self.extra:
            desc = {**desc, "extra": {**desc.get("extra", {}), **self.extra}}
        stable = {k: v for k, v in desc.items() if k not in VOLATILE}
        volatile = tuple(desc.get(k, 0) for k in VOLATILE)
        full = self._full_wanted or stable != self._published_stable or now >= self._last_full + FULL_INTERVAL
        if full and now >= self._last_full + MIN_FULL_GAP:
            self._full_wanted = False
            self._published_stable = stable
            return [self._seal_full(desc, now)]
        if full:
            self._full_wanted = True  # too soon after the last one: at MIN_FULL_GAP
        due = now >= self._next_heartbeat
        load_changed = self._dirty and volatile != self._sent_volatile
        if due or (load_changed and now >= self._last_sent + HEARTBEAT_MIN_GAP):
            self._dirty = False
            seq = self._next_seq()
            hb = Heartbeat(self.peer_id, seq, self._record_seq, *volatile)
            self._sent(now, volatile)
            self.view.heartbeat(hb, now)
            return [seal_heartbeat(hb, self._key, self._secret)]
        if not load_changed:
            self._dirty = False
        return []

    def _seal_full(self, desc: dict, now: float, leave: bool = False) -> bytes:
        record = PeerRecord(peer_id=self.peer_id, seq=self._next_seq(), leave=leave, **desc)
        self._record_seq = record.seq
        self._last_full = now
        self._sent(now, tuple(desc.get(k, 0) for k in VOLATILE))
        self._dirty = False
        self.view.apply(record, now)
        return seal(record, self._key, self._secret)

    def leave(self, now: float) -> bytes:
        """Our signed leave; nothing is sent after it."""
        self.leaving = True
        return self._seal_full(self.describe(), now, leave=True)

    def _sent(self, now: float, volatile: tuple) -> None:
        self._last_sent = now
        self._sent_volatile = volatile
        self._next_heartbeat = now + self.interval * self._rng.uniform(0.9, 1.0)

    def _next_seq(self) -> int:
        self._seq = max(self._seq + 1, self._wall_us())
        return self._seq

    def _due_want(self, now: float) -> bytes | None:
        due = [p for p, t in self._wants.items() if t <= now]
        ask = []
        for p in due:
            del self._wants[p]
            if now - self._asked.get(p, -1e9) >= WANT_REPEAT:
                self._asked[p] = now
                ask.append(p)
        # forget old asks, so departed peers do not pile up
        for p in [p for p, t in self._asked.items() if now - t > 4 * WANT_REPEAT]:
            del self._asked[p]
        if not ask:
            return None
        return seal_want(Want(self.peer_id, tuple(sorted(ask))), self._key, self._secret)

    def _missing(self, peer_id: str, now: float) -> None:
        if peer_id not in self._wants and now - self._asked.get(peer_id, -1e9) >= WANT_REPEAT:
            self._wants[peer_id] = now + self._rng.uniform(*WANT_DELAY)

    # --- their side -------------------------------------------------------------------------
    def check(self, data: bytes) -> PeerRecord | Heartbeat | Want:
        """Verify a message (signature, membership, seq): the gossipsub validator. Raises RecordError."""
        msg = open_message(data, self._secret)
        if isinstance(msg, (PeerRecord, Heartbeat)) and msg.peer_id != self.peer_id:
            last = self.view.high_seq(msg.peer_id)
            if last is not None and msg.seq <= last:
                raise StaleRecord(msg, last)
        return msg

    def receive(self, msg: PeerRecord | Heartbeat | Want, now: float) -> Received:
        """Take a verified message into the view. Raises Rejected when it lost a race with a newer one."""
        if isinstance(msg, Want):
            for p in msg.wanted:
                self._asked[p] = now  # someone asked: the answer reaches us too
                self._wants.pop(p, None)
            if self.peer_id in msg.wanted and not self.leaving:
                self._full_wanted = True
            return Received("other")
        if msg.peer_id == self.peer_id:
            # our own message relayed back, or one from before a restart: our next seq must be higher
            self._seq = max(self._seq, msg.seq)
            return Received("other")
        if isinstance(msg, PeerRecord):
            changed = self.view.apply(msg, now)
            self._wants.pop(msg.peer_id, None)
            if msg.leave:
                return Received("left" if changed else "other", msg)
            return Received("joined" if changed else "updated", msg)
        try:
            newer = self.view.heartbeat(msg, now)
        except Unknown:
            self._missing(msg.peer_id, now)
            return Received("unknown")
        if newer:
            self._missing(msg.peer_id, now)
        return Received("refreshed")


__all__ = ["Announcer", "Received", "Rejected", "StaleRecord", "heartbeat_interval"]
