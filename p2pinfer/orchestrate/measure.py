"""What the measured routing policies need, measured at this peer and published in its record.

- Link RTT: every PROBE_INTERVAL this peer pings connected peers in its view (PROBES_PER_ROUND of
  them, those measured longest ago first) over libp2p's ping protocol (net/keeper.py: one stream,
  PINGS round trips, timed with perf_counter) and keeps the lowest, smoothed (EWMA).
- Tokens/s: requests entered here that finished (the OpenAI routes' recent list) give the decode
  rate of their ring; every member of the ring is credited with it (a ring is as fast as its
  slowest member, so a fast peer seen only in slow rings is underrated until it serves alone).

Both go into this peer's record as ``extra.rtt`` / ``extra.tps`` ({peer id: value}, the nearest /
most recent MAX_REPORTED), rounded so a tiny change is no reason for a new full record, and are
given to the entry's routing policies together with what the other records say
(cluster/routing.py `inputs_from_records`).
"""

from __future__ import annotations

import logging
import time

import trio

from p2pinfer.cluster.routing import MAX_REPORTED, RouteInputs, inputs_from_records

log = logging.getLogger("p2pinfer.measure")

PROBE_INTERVAL = 5.0
PROBE_TIMEOUT = 2.0
PINGS = 3
PROBES_PER_ROUND = 8  # peers pinged per PROBE_INTERVAL, the longest unmeasured first (100 peers: each ~1/min)
EWMA = 0.3  # weight of a new sample
PUBLISH_INTERVAL = 15.0


def _smooth(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


def _quantise_ms(ms: float) -> float:
    """Two significant digits (0.1 ms at least): RTTs jitter, a record should not."""
    if ms < 1:
        return round(max(ms, 0.1), 1)
    return float(f"{ms:.2g}")


class Measurements:
    def __init__(self, self_id: str) -> None:
        self.self_id = self_id
        self.rtt: dict[str, float] = {}  # peer -> ms
        self.tps: dict[str, float] = {}  # peer -> tokens/s
        self._seen: set[str] = set()  # request ids already counted
        self.probed_at: dict[str, float] = {}  # peer -> when last pinged (monotonic)

    def observe_requests(self, tracked) -> None:
        """Credit each finished request's ring members with its decode rate (once per request)."""
        for t in tracked:
            if t.id in self._seen or t.state != "done":
                continue
            self._seen.add(t.id)
            d = t.to_dict()
            rate = d.get("tokens_per_second")
            if rate and t.ring:
                for peer, *_ in t.ring:
                    self.tps[peer] = _smooth(self.tps.get(peer), float(rate))
        if len(self._seen) > 4096:
            self._seen = {t.id for t in tracked}

    def observe_rtt(self, peer: str, ms: float) -> None:
        self.rtt[peer] = _smooth(self.rtt.get(peer), ms)

    def published(self) -> dict:
        """What goes into this peer's record (extra)."""
        rtt = dict(sorted(self.rtt.items(), key=lambda kv: kv[1])[:MAX_REPORTED])
        tps = dict(list(self.tps.items())[-MAX_REPORTED:])
        return {"rtt": {p: _quantise_ms(v) for p, v in rtt.items()},
                "tps": {p: round(v, 1) for p, v in tps.items()}}  # fmt: skip

    def inputs(self, records, pending: dict[str, int], avoid: frozenset[str] = frozenset()) -> RouteInputs:
        return inputs_from_records(records, self.self_id, self.rtt, self.tps, pending, avoid)


def _peers(extra: dict) -> tuple:
    return tuple(sorted(extra.get("rtt", {}))), tuple(sorted(extra.get("tps", {})))


async def run_probes(measure: Measurements, rtt_ms, peers, recent, publish) -> None:
    """Forever: ping `peers()` (connected peers in the view) with `rtt_ms(peer, rounds)` (the keeper's),
    fold `recent()` requests' rates in, and `publish(extra)` every PUBLISH_INTERVAL."""
    last_publish, last = -1e9, {}
    while True:
        targets = list(peers())
        for gone in set(measure.rtt) - set(targets):
            del measure.rtt[gone]
        for gone in set(measure.tps) - set(targets) - {measure.self_id}:
            del measure.tps[gone]
        for gone in set(measure.probed_at) - set(targets):
            del measure.probed_at[gone]
        due = sorted(targets, key=lambda p: (measure.probed_at.get(p, -1e9), p))[:PROBES_PER_ROUND]
        async with trio.open_nursery() as nursery:
            for peer in due:
                measure.probed_at[peer] = time.monotonic()

                async def probe(p=peer) -> None:
                    try:
                        with trio.fail_after(PROBE_TIMEOUT):
                            measure.observe_rtt(p, await rtt_ms(p, PINGS))
                    except Exception as e:  # a peer going away mid-ping is routine
                        log.debug("rtt probe of %s failed: %s: %s", p, type(e).__name__, e)

                nursery.start_soon(probe)
        measure.observe_requests(list(recent()))
        now = time.monotonic()
        extra = measure.published()
        if now - last_publish >= PUBLISH_INTERVAL or _peers(extra) != _peers(last):
            last_publish, last = now, extra  # a peer measured for the first time (or gone): at once
            publish(extra)
        await trio.sleep(PROBE_INTERVAL)
