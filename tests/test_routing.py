"""Routing policies (cluster/routing.py): examples per policy, then hypothesis properties: every policy
elects a valid ring of the election's size, independent of candidate order, and a one-peer ring is the
best peer under the policy's key among those that fit alone."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.cluster.record import PeerRecord
from p2pinfer.cluster.ring import Candidate, ClusterTooSmall, ModelNeeds, elect_ring
from p2pinfer.cluster.routing import (
    POLICIES,
    UNKNOWN_RTT_MS,
    RouteInputs,
    UnknownPolicy,
    inputs_from_records,
    policy_keys,
    route,
    trip_ms,
)


def model(n=8, layer=10, embed=0, head=0, name="m") -> ModelNeeds:
    return ModelNeeds(name, n, layer, embed, head, 0, 0)


def peer(pid, mem, load=0, compute=1.0, held=()) -> Candidate:
    return Candidate(pid, mem, load, compute, tuple(held))


def ids(ring):
    return [m.peer_id for m in ring]


def rtts(pairs: dict) -> dict:
    return {tuple(k.split("-")): v for k, v in pairs.items()}


def test_memory_is_the_election():
    cands = [peer("a", 100, load=3, held=[("m", 0, 8)]), peer("b", 100)]
    assert route("memory", cands, model()) == elect_ring(cands, model())
    assert ids(route("memory", cands, model())) == ["a"]  # warm wins under memory


def test_least_loaded_beats_warm():
    cands = [peer("a", 100, load=3, held=[("m", 0, 8)]), peer("b", 100, load=1), peer("c", 100, load=2)]
    assert ids(route("least-loaded", cands, model())) == ["b"]


def test_least_loaded_counts_the_entrys_own_rings():
    cands = [peer("a", 100, load=1), peer("b", 100, load=1)]
    assert ids(route("least-loaded", cands, model())) == ["a"]
    assert ids(route("least-loaded", cands, model(), inputs=RouteInputs("x", pending={"a": 1}))) == ["b"]


def test_latency_prefers_the_entry_then_nearest():
    cands = [peer("a", 100), peer("b", 100), peer("e", 100)]
    inp = RouteInputs("e", rtts({"e-a": 5.0, "e-b": 1.0}))
    assert ids(route("latency", cands, model(), inputs=inp)) == ["e"]
    assert ids(route("latency", cands, model(), exclude=frozenset({"e"}), inputs=inp)) == ["b"]
    # never measured counts as far
    assert ids(route("latency", [peer("a", 100), peer("z", 100)], model(), inputs=inp)) == ["a"]


def test_latency_orders_a_ring_for_the_cheapest_trip():
    # two peers needed; entry x is a gateway; a-x far, b-x near: b should sit at both ends' cheaper side
    cands = [peer("a", 50), peer("b", 50), peer("c", 50)]
    inp = RouteInputs("x", rtts({"x-a": 10.0, "x-b": 1.0, "x-c": 9.0, "a-b": 1.0, "b-c": 1.0, "a-c": 1.0}))
    ring = route("latency", cands, model(), inputs=inp)
    assert len(ring) == 2 and "b" in ids(ring)
    assert trip_ms(ids(ring), inp) <= trip_ms(list(reversed(ids(ring))), inp)


def test_fastest_uses_observed_tps_then_scaled_compute():
    cands = [peer("a", 100, compute=10), peer("b", 100, compute=50), peer("c", 100, compute=20)]
    assert ids(route("fastest", cands, model())) == ["b"]  # nothing observed: compute score
    inp = RouteInputs("x", {}, {"b": 5.0, "c": 40.0})  # observed: c is fast, b slow
    assert ids(route("fastest", cands, model(), inputs=inp)) == ["c"]
    # a unobserved: compute 10 x median(5/50, 40/20) = 10 x 1.05 = 10.5 tok/s: between b and c
    keys = policy_keys("fastest", cands, model(), inp)
    assert keys["c"] < keys["a"] < keys["b"]


def test_unknown_policy_and_too_small():
    with pytest.raises(UnknownPolicy, match="least-loaded"):
        route("cheapest", [peer("a", 100)], model())
    for p in POLICIES:
        with pytest.raises(ClusterTooSmall):
            route(p, [peer("a", 10)], model())


def test_inputs_from_records_merge_and_sanitise():
    recs = [
        PeerRecord("a", 1, extra={"rtt": {"b": 4.0, "c": "junk", "d": -1}, "tps": {"b": 10.0}}),
        PeerRecord("b", 1, extra={"rtt": {"a": 2.0}, "tps": {"b": 20.0, "a": float("nan")}}),
        PeerRecord("c", 1, extra="not a map"),
    ]
    inp = inputs_from_records(recs, "x", local_rtt={"a": 7.0}, local_tps={"a": 3.0})
    assert inp.rtt_ms("a", "b") == 2.0 == inp.rtt_ms("b", "a")  # the lower of both ends
    assert inp.rtt_ms("x", "a") == 7.0 and inp.rtt_ms("a", "c") == UNKNOWN_RTT_MS
    assert inp.tps == {"b": 15.0, "a": 3.0}


# --- properties ---------------------------------------------------------------------------------


@st.composite
def scenario(draw):
    n = draw(st.integers(1, 10))
    layer = 10
    m = ModelNeeds("m", n, layer, draw(st.integers(0, 15)), draw(st.integers(0, 15)), 0, 0)
    k = draw(st.integers(1, 7))
    names = [f"p{i}" for i in range(k)]
    cands = []
    for name in names:
        held = ()
        if draw(st.booleans()):
            s = draw(st.integers(0, n - 1))
            held = (("m", s, draw(st.integers(s + 1, n))),)
        cands.append(Candidate(name, draw(st.integers(0, 12 * n * layer)), draw(st.integers(0, 4)),
                               draw(st.sampled_from([0.5, 1.0, 2.0])), held))  # fmt: skip
    entry = draw(st.sampled_from([*names, "gw"]))
    rtt = {}
    for i, a in enumerate([*names, "gw"]):
        for b in [*names, "gw"][i + 1 :]:
            if draw(st.booleans()):
                rtt[(a, b)] = float(draw(st.integers(1, 50)))
    tps = {c: float(draw(st.integers(1, 30))) for c in names if draw(st.booleans())}
    pending = {c: draw(st.integers(0, 2)) for c in names if draw(st.booleans())}
    return cands, m, RouteInputs(entry, rtt, tps, pending)


@settings(max_examples=300, deadline=None)
@given(scenario(), st.sampled_from(POLICIES), st.randoms(use_true_random=False))
def test_properties(sc, policy, rnd: random.Random):
    cands, m, inp = sc
    try:
        want = elect_ring(cands, m)
    except ClusterTooSmall:
        with pytest.raises(ClusterTooSmall):
            route(policy, cands, m, inputs=inp)
        return
    ring = route(policy, cands, m, inputs=inp)
    # same size as the election; contiguous cover; every member within its memory
    assert len(ring) == len(want)
    assert ring[0].start == 0 and ring[-1].end == m.n_layers
    assert all(a.end == b.start for a, b in zip(ring, ring[1:], strict=False))
    mem = {c.peer_id: c.memory_free for c in cands}
    assert len(set(ids(ring))) == len(ring)
    for x in ring:
        assert x.start < x.end and m.range_bytes(x.start, x.end) <= mem[x.peer_id]
    # a retry avoids the peers of the failed ring whenever a ring fits without them
    avoid = frozenset(ids(ring)[:1])
    again = route(policy, cands, m, inputs=replace(inp, avoid=avoid))
    try:
        elect_ring(cands, m, exclude=avoid)
        assert not avoid & set(ids(again))
    except ClusterTooSmall:
        assert again == ring
    # the set decides, not the order
    shuffled = list(cands)
    rnd.shuffle(shuffled)
    assert route(policy, shuffled, m, inputs=inp) == ring
    # one peer: the best under the policy's key among those that hold the model alone
    if len(ring) == 1 and policy != "memory":
        keys = policy_keys(policy, cands, m, inp)
        fits = [c.peer_id for c in cands if m.range_bytes(0, m.n_layers) <= c.memory_free]
        assert ring[0].peer_id == min(fits, key=keys.__getitem__)
    # latency: no valid order of the same members makes a cheaper trip
    if policy == "latency" and 2 <= len(ring) <= 4:
        assert (
            trip_ms(ids(ring), inp)
            <= min(
                trip_ms(list(o), inp)
                for o in __import__("itertools").permutations(ids(ring))
                if _order_valid(list(o), mem, m)
            )
            + 1e-9
        )


def _order_valid(order, mem, m) -> bool:
    from p2pinfer.cluster.ring import _caps, _valid

    return _valid(_caps([Candidate(p, mem[p], 0, 0.0) for p in order], m), m.n_layers)
