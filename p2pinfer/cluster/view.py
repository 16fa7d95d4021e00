"""The View: which peers this agent believes are in the cluster, from verified records.

Pure state, no I/O: the caller passes `now` (a monotonic clock) so tests need no sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from p2pinfer.cluster.record import Heartbeat, PeerRecord


@dataclass
class Entry:
    record: PeerRecord  # the full record, its seq and load fields refreshed by later heartbeats
    received_at: float  # last full record or heartbeat
    record_seq: int  # seq of the full record itself


ISOLATED_TTLS = 2


class Rejected(Exception):
    """A verified record that still must not change the view (stale seq)."""


class Unknown(Exception):
    """A heartbeat from a peer whose full record this view does not hold: it cannot add a peer."""


class View:
    def __init__(self, self_id: str, ttl: float) -> None:
        self.self_id = self_id
        self.ttl = ttl
        self._entries: dict[str, Entry] = {}
        # Highest seq ever seen per peer, kept after a peer expires or leaves so that a replay of
        # one of its old records cannot bring it back.
        self._high_seq: dict[str, int] = {}

    def apply(self, record: PeerRecord, now: float) -> bool:
        """Take a verified record. Returns True when the set of live peers changed.

        Raises Rejected for a record no newer than one already seen."""
        last = self._high_seq.get(record.peer_id)
        if last is not None and record.seq <= last:
            raise Rejected(f"stale record from {record.peer_id}: seq {record.seq} <= {last}")
        self._high_seq[record.peer_id] = record.seq
        if record.leave:
            return self._entries.pop(record.peer_id, None) is not None
        is_new = record.peer_id not in self._entries
        self._entries[record.peer_id] = Entry(record, now, record.seq)
        return is_new

    def heartbeat(self, hb: Heartbeat, now: float) -> bool:
        """Refresh a peer's liveness and load. Returns True when the heartbeat announces a newer full
        record than the one held (the caller should ask for it).

        Raises Rejected for a seq no newer than one already seen, Unknown for a peer not in the view
        (never added from a heartbeat: only a full record, which carries what elections need, can)."""
        last = self._high_seq.get(hb.peer_id)
        if last is not None and hb.seq <= last:
            raise Rejected(f"stale heartbeat from {hb.peer_id}: seq {hb.seq} <= {last}")
        e = self._entries.get(hb.peer_id)
        if e is None:
            raise Unknown(f"heartbeat from {hb.peer_id}, whose full record is not in the view")
        self._high_seq[hb.peer_id] = hb.seq
        e.received_at = now
        e.record = replace(
            e.record, seq=hb.seq, active_requests=hb.active_requests, memory_free=hb.memory_free
        )
        return hb.record_seq > e.record_seq

    def expire(self, now: float) -> list[str]:
        """Drop peers silent for longer than the TTL (never ourselves); return their ids.

        Silence is believed when others were heard well after the peer went quiet (more than half a
        TTL later): then our own reception works and this peer alone is silent. When nobody at all
        has been heard since (our process or link stalled, or the peer is the only other one), only
        after ISOLATED_TTLS times the TTL: a stalled agent must not empty its view at once."""
        heard = [e.received_at for pid, e in self._entries.items() if pid != self.self_id]
        last_heard = max(heard, default=now)
        gone = [
            pid
            for pid, e in self._entries.items()
            if pid != self.self_id
            and now - e.received_at > self.ttl
            and (last_heard - e.received_at > self.ttl / 2 or now - e.received_at > ISOLATED_TTLS * self.ttl)
        ]
        for pid in gone:
            del self._entries[pid]
        return gone

    def high_seq(self, peer_id: str) -> int | None:
        return self._high_seq.get(peer_id)

    def get(self, peer_id: str) -> PeerRecord | None:
        e = self._entries.get(peer_id)
        return e.record if e else None

    def quiet_for(self, peer_id: str, now: float) -> float:
        """Seconds since `peer_id` was last heard from (infinite if never)."""
        e = self._entries.get(peer_id)
        return float("inf") if e is None else now - e.received_at

    def records(self) -> list[PeerRecord]:
        return [e.record for e in sorted(self._entries.values(), key=lambda e: e.record.peer_id)]

    def entries(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: e.record.peer_id)

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)
