"""Routing policies: which peers a request's ring is built from, by the policy the request names.

Pure and deterministic like ring.py (no I/O, no clock): the result depends on the *set* of candidates,
the model, `exclude` and the measured inputs, never on the order of the candidates.

Every policy elects a ring of the same size as `elect_ring` would (the fewest peers that can hold the
model) and every ring it returns is valid under ring.py's cost model; the policies differ only in
*which* peers fill it, and (latency) in their order:

- ``memory`` (default): ring.py's election unchanged -- warm shards first, then lower load, then
  higher compute score, then peer id; layers in proportion to memory.
- ``least-loaded``: lowest load first (active ring sessions the peer reports in its heartbeats, plus
  the rings this entry has on it now: `RouteInputs.pending`), then higher compute score, then warm,
  then peer id. (The "queue" of a peer is not in its record; the entry's own rings stand in for it.)
- ``latency``: lowest measured round trip from the entry peer first (the entry itself counts 0 ms,
  a peer never measured counts UNKNOWN_RTT_MS), then lower load, warm, id. A ring of several peers is
  then ordered (up to MAX_PERMUTED members; beyond that the election's order stays) to minimise the
  cost of one token's trip: entry -> first, each hop member to member, last -> first (the sampled
  token goes back to the first member) and last -> entry, among the orders whose ends can take the
  embedding and the head.
- ``fastest``: highest expected decode speed first: the tokens/s observed on rings the peer was in
  where known, else its compute score scaled by the median tokens/s per compute unit of the observed
  peers (the compute score alone when nobody was observed); then lower load, warm, id.

For the three measured policies the peers' policy keys are turned into a dense rank given to the
election as the peer's load (warm shards no longer come first: layer ranges of a ring of several
peers may then differ from what the peers hold, which costs a reload; a one-peer ring always holds
the whole model, so its warm shard is reused whichever peer it is).

Inputs come from the peers' records (``extra["rtt"]``: {peer: ms} measured by that peer;
``extra["tps"]``: {peer: tokens/s} observed by that peer as an entry) merged with the entry's own
measurements (`inputs_from_records`).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from p2pinfer.cluster.ring import (
    Candidate,
    ClusterTooSmall,
    ModelNeeds,
    RingMember,
    _assign_layers,
    _caps,
    _valid,
    elect_ring,
)

POLICIES = ("memory", "least-loaded", "latency", "fastest")
DEFAULT_POLICY = "memory"
UNKNOWN_RTT_MS = 1000.0  # a peer never measured: after every measured one, but still usable
MAX_PERMUTED = 6  # 720 orders; beyond this a latency ring keeps the election's order
MAX_REPORTED = 32  # entries per map a record carries (records are capped at 16 KiB: ~2 kB each map)


class UnknownPolicy(ValueError):
    def __init__(self, policy: object) -> None:
        super().__init__(f"unknown routing policy {policy!r}; one of: {', '.join(POLICIES)}")


@dataclass(frozen=True)
class RouteInputs:
    """What the measured policies look at, besides the candidates themselves."""

    self_id: str = ""  # the entry peer
    rtt: Mapping[tuple[str, str], float] = field(
        default_factory=dict
    )  # (a, b) -> round trip ms, either order
    tps: Mapping[str, float] = field(default_factory=dict)  # peer -> observed decode tokens/s
    pending: Mapping[str, int] = field(default_factory=dict)  # peer -> rings this entry has on it now
    avoid: frozenset[str] = frozenset()  # peers to leave out when a ring fits without them (a retry)

    def load(self, c: Candidate) -> int:
        """The peer's reported load plus this entry's own rings on it (heartbeats lag a few hundred ms:
        without these, requests started together would all see the same least-loaded peer)."""
        return c.load + self.pending.get(c.peer_id, 0)

    def rtt_ms(self, a: str, b: str) -> float:
        if a == b:
            return 0.0
        v = self.rtt.get((a, b))
        if v is None:
            v = self.rtt.get((b, a))
        return UNKNOWN_RTT_MS if v is None else v

    def speeds(self, candidates: Iterable[Candidate]) -> dict[str, float]:
        """Expected tokens/s per candidate: observed, else compute score x median (tokens/s per compute)."""
        cands = list(candidates)
        ratios = [self.tps[c.peer_id] / c.compute for c in cands if c.peer_id in self.tps and c.compute > 0]
        scale = statistics.median(ratios) if ratios else 1.0
        return {c.peer_id: self.tps.get(c.peer_id, c.compute * scale) for c in cands}


def check_policy(policy: object) -> str:
    if policy not in POLICIES:
        raise UnknownPolicy(policy)
    return policy  # type: ignore[return-value]


def policy_keys(policy: str, candidates: Sequence[Candidate], model: ModelNeeds,
                inputs: RouteInputs) -> dict[str, tuple]:  # fmt: skip
    """Each candidate's sort key under `policy` (lower is preferred); ties end at the peer id."""
    check_policy(policy)

    def warm(c: Candidate) -> bool:
        return any(h[0] == model.name for h in c.held)

    if policy == "memory":
        return {c.peer_id: (not warm(c), c.load, -c.compute, c.peer_id) for c in candidates}
    if policy == "least-loaded":
        return {c.peer_id: (inputs.load(c), -c.compute, not warm(c), c.peer_id) for c in candidates}
    if policy == "latency":
        return {c.peer_id: (inputs.rtt_ms(inputs.self_id, c.peer_id), inputs.load(c), not warm(c), c.peer_id)
                for c in candidates}  # fmt: skip
    speeds = inputs.speeds(candidates)
    return {c.peer_id: (-speeds[c.peer_id], inputs.load(c), not warm(c), c.peer_id) for c in candidates}


def route(
    policy: str,
    candidates: Sequence[Candidate],
    model: ModelNeeds,
    *,
    exclude: frozenset[str] = frozenset(),
    inputs: RouteInputs | None = None,
) -> list[RingMember]:
    """The ring for one request under `policy`; raises ClusterTooSmall like elect_ring.

    With `inputs.avoid` (a retry of a request whose ring failed), a ring without those peers is
    elected when one fits -- possibly larger than the ring with them -- else one as if none were avoided.
    """
    check_policy(policy)
    if inputs is not None and inputs.avoid:
        plain = replace(inputs, avoid=frozenset())
        try:
            return route(policy, candidates, model, exclude=exclude | inputs.avoid, inputs=plain)
        except ClusterTooSmall:
            return route(policy, candidates, model, exclude=exclude, inputs=plain)
    if policy == "memory":
        return elect_ring(candidates, model, exclude=exclude)
    inputs = inputs or RouteInputs()
    if len({c.peer_id for c in candidates}) != len(candidates):
        raise ValueError("duplicate peer id among candidates")
    keys = policy_keys(policy, candidates, model, inputs)
    # dense rank of the key without the peer id: equal keys share a rank, the election breaks ties by id
    ranks = {k: i for i, k in enumerate(sorted({k[:-1] for k in keys.values()}))}
    ranked = [Candidate(c.peer_id, c.memory_free, ranks[keys[c.peer_id][:-1]], 0.0, ()) for c in candidates]
    ring = elect_ring(ranked, model, exclude=exclude)
    if policy != "latency" or not 2 <= len(ring) <= MAX_PERMUTED:
        return ring
    by_id = {c.peer_id: c for c in ranked}
    members = [by_id[m.peer_id] for m in ring]
    best, best_cost = members, _trip_ms(members, inputs)
    for order in itertools.permutations(members):
        order = list(order)
        cost = _trip_ms(order, inputs)
        if cost < best_cost - 1e-9 and _valid(_caps(order, model), model.n_layers):
            best, best_cost = order, cost
    if best is members:
        return ring
    return _assign_layers(best, model, _caps(best, model))


def _trip_ms(ring: Sequence[Candidate], inputs: RouteInputs) -> float:
    """One decode step's network cost: entry -> first, the hops, last -> first, last -> entry."""
    ids = [c.peer_id for c in ring]
    hops = sum(inputs.rtt_ms(a, b) for a, b in itertools.pairwise(ids))
    return (inputs.rtt_ms(inputs.self_id, ids[0]) + hops + inputs.rtt_ms(ids[-1], ids[0])
            + inputs.rtt_ms(ids[-1], inputs.self_id))  # fmt: skip


def trip_ms(ring: Sequence[str], inputs: RouteInputs) -> float:
    """`_trip_ms` for a ring given as peer ids (for /v1/cluster and tests)."""
    return _trip_ms([Candidate(p, 0, 0, 0.0) for p in ring], inputs)


def _number_map(value: object) -> dict[str, float]:
    """{peer: finite non-negative number} from an untrusted record field; anything else is dropped."""
    out: dict[str, float] = {}
    if isinstance(value, Mapping):
        for k, v in list(value.items())[:MAX_REPORTED]:
            if isinstance(k, str) and isinstance(v, int | float) and not isinstance(v, bool):
                if math.isfinite(v) and v >= 0:
                    out[k] = float(v)
    return out


def inputs_from_records(
    records: Iterable,
    self_id: str,
    local_rtt: Mapping[str, float] = {},  # noqa: B006 (read only)
    local_tps: Mapping[str, float] = {},  # noqa: B006
    pending: Mapping[str, int] = {},  # noqa: B006
    avoid: frozenset[str] = frozenset(),
) -> RouteInputs:
    """Merge what every record reports (extra.rtt, extra.tps) with the entry's own measurements.

    RTT: a pair measured from both ends takes the lower of the two (a ping that waited on a busy
    event loop over-reports; it never under-reports); the entry's own measurement of its links wins.
    Tokens/s: the mean of every report of a peer, the entry's own observation counted like one.
    """
    rtt: dict[tuple[str, str], float] = {}
    reports: dict[str, list[float]] = {}
    for r in records:
        extra = getattr(r, "extra", None) or {}
        if not isinstance(extra, Mapping):
            continue
        for peer, ms in _number_map(extra.get("rtt")).items():
            pair = (min(r.peer_id, peer), max(r.peer_id, peer))
            rtt[pair] = min(ms, rtt.get(pair, math.inf))
        if r.peer_id != self_id:
            for peer, v in _number_map(extra.get("tps")).items():
                reports.setdefault(peer, []).append(v)
    for peer, ms in _number_map(dict(local_rtt)).items():
        rtt[(min(self_id, peer), max(self_id, peer))] = ms
    for peer, v in _number_map(dict(local_tps)).items():
        reports.setdefault(peer, []).append(v)
    tps = {p: sum(v) / len(v) for p, v in reports.items() if v}
    return RouteInputs(self_id, rtt, tps, dict(pending), frozenset(avoid))


def known_rtt(inputs: RouteInputs, peer: str) -> float | None:
    """The entry's RTT to `peer` in ms, None when never measured."""
    rtt = inputs.rtt_ms(inputs.self_id, peer)
    return None if rtt == UNKNOWN_RTT_MS else round(rtt, 3)


def describe_inputs(candidates: Sequence[Candidate], model: ModelNeeds, inputs: RouteInputs) -> list[dict]:
    """Per peer, what each policy sees (for the routing endpoint and /v1/cluster)."""
    speeds = inputs.speeds(candidates)
    return [
        {
            "peer_id": c.peer_id,
            "memory_free": c.memory_free,
            "load": c.load,
            "pending": inputs.pending.get(c.peer_id, 0),
            "compute": c.compute,
            "warm": any(h[0] == model.name for h in c.held),
            "rtt_ms": known_rtt(inputs, c.peer_id),
            "observed_tps": inputs.tps.get(c.peer_id),
            "expected_tps": round(speeds[c.peer_id], 3),
        }
        for c in sorted(candidates, key=lambda c: c.peer_id)
    ]  # fmt: skip
