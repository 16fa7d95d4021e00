"""The View: which peers this agent believes are in the cluster, from verified records.

Pure state, no I/O: the caller passes `now` (a monotonic clock) so tests need no sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pinfer.cluster.record import PeerRecord


@dataclass
class Entry:
    record: PeerRecord
    received_at: float


class Rejected(Exception):
    """A verified record that still must not change the view (stale seq)."""


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
        self._entries[record.peer_id] = Entry(record, now)
        return is_new

    def expire(self, now: float) -> list[str]:
        """Drop peers silent for longer than the TTL (never ourselves); return their ids."""
        gone = [
            pid for pid, e in self._entries.items() if pid != self.self_id and now - e.received_at > self.ttl
        ]
        for pid in gone:
            del self._entries[pid]
        return gone

    def high_seq(self, peer_id: str) -> int | None:
        return self._high_seq.get(peer_id)

    def get(self, peer_id: str) -> PeerRecord | None:
        e = self._entries.get(peer_id)
        return e.record if e else None

    def records(self) -> list[PeerRecord]:
        return [e.record for e in sorted(self._entries.values(), key=lambda e: e.record.peer_id)]

    def entries(self) -> list[Entry]:
        return sorted(self._entries.values(), key=lambda e: e.record.peer_id)

    def __contains__(self, peer_id: str) -> bool:
        return peer_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)
