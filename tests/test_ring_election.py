"""Ring election: example tests for each rule, then hypothesis properties against a brute-force oracle."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.cluster.ring import Candidate, ClusterTooSmall, ModelNeeds, RingMember, elect_ring, human_bytes

GiB = 1024**3


def model(n=8, layer=10, embed=0, head=0, kv=0, ctx=0, name="m") -> ModelNeeds:
    return ModelNeeds(name, n, layer, embed, head, kv, ctx)


def peer(pid, mem, load=0, compute=1.0, held=()) -> Candidate:
    return Candidate(pid, mem, load, compute, tuple(held))


def spans(ring):
    return [(m.peer_id, m.start, m.end) for m in ring]


# --- one peer ---------------------------------------------------------------------------------


def test_single_peer_when_one_fits_whole_model_with_kv_headroom():
    m = model(n=4, layer=10, embed=5, head=5, kv=1, ctx=2)  # 4*12 + 10 = 58 bytes
    ring = elect_ring([peer("a", 58), peer("b", 40), peer("c", 40)], m)
    assert spans(ring) == [("a", 0, 4)]


def test_kv_headroom_counts_toward_fitting():
    m = model(n=4, layer=10, kv=1, ctx=3)  # 4*13 = 52
    assert len(elect_ring([peer("a", 51), peer("b", 30)], m)) == 2


def test_single_peer_tie_break_load_then_compute_then_id():
    m = model(n=2)
    assert elect_ring([peer("a", 100, load=2), peer("b", 100, load=1)], m)[0].peer_id == "b"
    assert elect_ring([peer("a", 100, compute=1), peer("b", 100, compute=3)], m)[0].peer_id == "b"
    assert elect_ring([peer("b", 100), peer("a", 100)], m)[0].peer_id == "a"


def test_single_peer_prefers_warm_whole_model_over_less_loaded():
    m = model(n=4)
    warm = peer("z", 100, load=3, held=[("m", 0, 4)])
    assert spans(elect_ring([peer("a", 100), warm], m)) == [("z", 0, 4)]


def test_warm_model_ignored_when_it_no_longer_fits():
    m = model(n=4)
    shrunk = peer("z", 39, held=[("m", 0, 4)])
    ring = elect_ring([peer("a", 100), shrunk], m)
    assert spans(ring) == [("a", 0, 4)]


def test_warm_shard_of_another_model_does_not_count():
    m = model(n=4)
    assert elect_ring([peer("a", 100), peer("b", 100, held=[("other", 0, 4)])], m)[0].peer_id == "a"


# --- several peers ----------------------------------------------------------------------------


def test_layers_in_proportion_to_memory():
    m = model(n=8)
    ring = elect_ring([peer("a", 40), peer("b", 20), peer("c", 20)], m)  # 80 bytes needed, 80 offered
    assert spans(ring) == [("a", 0, 4), ("b", 4, 6), ("c", 6, 8)]


def test_largest_remainder_rounding():
    # No two peers hold 70 bytes. Quotas 7*{33,32,25}/90 = 2.57, 2.49, 1.94: floors 2, 2, 1, and the
    # two spare layers go to the largest remainders, c (.94) and a (.57), not b.
    m = model(n=7, layer=10)
    ring = elect_ring([peer("a", 33), peer("b", 32), peer("c", 25)], m)
    assert spans(ring) == [("a", 0, 3), ("b", 3, 5), ("c", 5, 7)]


def test_fewest_peers_not_all_peers():
    m = model(n=8)
    ring = elect_ring([peer("a", 50), peer("b", 50), peer("c", 50), peer("d", 10)], m)
    assert len(ring) == 2


def test_embed_and_head_overheads_repair_rounding():
    # Proportional split would give 3/3, but the first member also pays a 15-byte embedding.
    m = model(n=6, layer=10, embed=15)
    ring = elect_ring([peer("a", 40), peer("b", 40)], m)
    for r in ring:
        mem = {"a": 40, "b": 40}[r.peer_id]
        assert m.range_bytes(r.start, r.end) <= mem
    assert [r.end - r.start for r in ring] == [2, 4]


def test_embedding_goes_to_a_peer_that_can_take_it():
    # Ring order would put the bigger "a" first, but only "b" fits the embedding next to a layer.
    m = model(n=4, layer=10, embed=30, head=0)
    ring = elect_ring([peer("a", 39), peer("b", 40)], m)
    assert ring[0].peer_id == "b" and m.range_bytes(ring[0].start, ring[0].end) <= 40


def test_member_selection_prefers_low_load_then_compute_then_id():
    m = model(n=4)  # 40 bytes: any two of these 30-byte peers
    ps = [
        peer("a", 30, load=1),
        peer("b", 30, load=0),
        peer("c", 30, load=0, compute=2),
        peer("d", 30, load=0),
    ]
    assert {r.peer_id for r in elect_ring(ps, m)} == {"b", "c"}


def test_ring_order_descending_memory_then_id():
    m = model(n=14)
    ring = elect_ring([peer("b", 40), peer("a", 40), peer("c", 60)], m)
    assert [r.peer_id for r in ring] == ["c", "a", "b"]


def test_warm_shards_form_the_ring_again():
    # Proportional split of 60/40 would be 6/4, but 3/7 is what is loaded and still fits.
    m = model(n=10)
    ps = [peer("a", 60, held=[("m", 0, 3)]), peer("b", 80, held=[("m", 3, 10)]), peer("c", 90)]
    assert spans(elect_ring(ps, m)) == [("a", 0, 3), ("b", 3, 10)]


def test_warm_ring_not_used_when_it_needs_more_peers_than_necessary():
    m = model(n=10)
    ps = [
        peer("a", 60, held=[("m", 0, 3)]),
        peer("b", 60, held=[("m", 3, 6)]),
        peer("c", 60, held=[("m", 6, 10)]),
    ]
    assert len(elect_ring(ps, m)) == 2


def test_warm_members_preferred_and_ordered_by_held_start():
    m = model(n=10)
    # Held ranges no longer chain (a gap), but both warm peers are still chosen, in layer order.
    ps = [peer("x", 60), peer("a", 60, held=[("m", 5, 10)]), peer("b", 60, held=[("m", 0, 4)])]
    assert [r.peer_id for r in elect_ring(ps, m)] == ["b", "a"]


def test_exclude_routes_around_a_failed_member():
    m = model(n=8)
    ps = [peer("a", 50), peer("b", 50), peer("c", 50)]
    first = elect_ring(ps, m)
    failed = first[0].peer_id
    second = elect_ring(ps, m, exclude=frozenset({failed}))
    assert failed not in {r.peer_id for r in second} and len(second) == 2


def test_gateway_peers_hold_nothing():
    m = model(n=2)
    ring = elect_ring([peer("gw", 0, compute=9), peer("neg", -5), peer("a", 20)], m)
    assert spans(ring) == [("a", 0, 2)]


def test_duplicate_peer_ids_rejected():
    with pytest.raises(ValueError):
        elect_ring([peer("a", 10), peer("a", 20)], model())


# --- errors -----------------------------------------------------------------------------------


def test_error_message_text():
    m = ModelNeeds("smollm2", 30, 40 * 1024**2, 100 * 1024**2, 0, 0, 0)  # 1300 MiB
    with pytest.raises(ClusterTooSmall) as e:
        elect_ring([peer("a", 256 * 1024**2), peer("b", 256 * 1024**2), peer("gw", 0)], m)
    assert str(e.value) == "cluster too small for smollm2: needs 1.3 GiB, has 512.0 MiB"
    assert (e.value.needed, e.value.available) == (1300 * 1024**2, 512 * 1024**2)


def test_no_candidates_and_all_excluded():
    with pytest.raises(ClusterTooSmall, match="needs 80 B, has 0 B"):
        elect_ring([], model())
    with pytest.raises(ClusterTooSmall):
        elect_ring([peer("a", 100)], model(), exclude=frozenset({"a"}))


def test_enough_in_total_but_not_in_whole_layers():
    m = model(n=2, layer=10)  # two peers with 9 bytes... and one with 5: 23 >= 20, no layer fits
    with pytest.raises(ClusterTooSmall, match=r"needs 20 B, has 23 B \(enough in total"):
        elect_ring([peer("a", 9), peer("b", 9), peer("c", 5)], m)


def test_more_peers_than_layers_is_not_possible():
    m = model(n=1, layer=10, embed=5, head=5)  # one layer: a single peer must take embed+layer+head
    with pytest.raises(ClusterTooSmall):
        elect_ring([peer("a", 15), peer("b", 15)], m)


def test_human_bytes():
    assert [human_bytes(x) for x in (0, 1023, 1024, 1536 * 1024, int(1.25 * GiB), 3 * 1024**4)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 MiB",
        "1.2 GiB",
        "3.0 TiB",
    ]


# --- properties -------------------------------------------------------------------------------


def oracle_min_members(cands: list[Candidate], m: ModelNeeds) -> int | None:
    """Fewest members of any valid ring, by trying every ordered subset (small inputs only)."""
    usable = [c for c in cands if c.memory_free > 0]
    for k in range(1, min(m.n_layers, len(usable)) + 1):
        for ring in itertools.permutations(usable, k):
            caps = []
            for i, c in enumerate(ring):
                overhead = (m.embed_bytes if i == 0 else 0) + (m.head_bytes if i == k - 1 else 0)
                caps.append((c.memory_free - overhead) // m.per_layer_bytes)
            if min(caps) >= 1 and sum(caps) >= m.n_layers:
                return k
    return None


@st.composite
def scenarios(draw):
    n = draw(st.integers(1, 24))
    m = ModelNeeds(
        "m",
        n,
        draw(st.integers(1, 20)),
        draw(st.integers(0, 60)),
        draw(st.integers(0, 60)),
        draw(st.integers(0, 3)),
        draw(st.integers(0, 4)),
    )
    ids = draw(st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=5, unique=True))
    # Warm shards: often the pieces of an earlier ring (cut points over the layers), plus noise.
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), max_size=max(len(ids) - 1, 0))) if n > 1 else [])
    pieces = list(itertools.pairwise([0, *cuts, n]))
    cands = []
    for i, pid in enumerate(ids):
        held = [("m", *pieces[i])] if i < len(pieces) and draw(st.booleans()) else []
        held += draw(
            st.lists(
                st.tuples(st.sampled_from(["m", "other"]), st.integers(0, n), st.integers(0, n)).map(
                    lambda t: (t[0], min(t[1], t[2]), max(t[1], t[2]))
                ),
                max_size=1,
            )
        )
        # Memory: a gateway, a peer that just fits its warm piece, or a share of the whole model,
        # so that 1- to 5-peer rings and "too small" all occur.
        kind = draw(st.sampled_from(["gateway", "fits-piece", "share", "share", "share"]))
        if kind == "gateway":
            memory = draw(st.integers(-10, 0))
        elif kind == "fits-piece" and i < len(pieces):
            memory = m.range_bytes(*pieces[i]) + draw(st.integers(0, 10))
        else:
            share = draw(st.sampled_from([1, 2, 3, 4, 5]))
            memory = m.total_bytes * draw(st.integers(50, 200)) // (100 * share)
        cands.append(
            Candidate(
                pid, memory, draw(st.integers(0, 2)), draw(st.sampled_from([0.5, 1.0, 2.0])), tuple(held)
            )
        )
    exclude = frozenset(draw(st.lists(st.sampled_from("abcdefgh"), max_size=2)))
    return m, cands, exclude


@settings(max_examples=400, deadline=None)
@given(scenarios(), st.randoms(use_true_random=False))
def test_properties(scenario, rnd):
    m, cands, exclude = scenario
    usable = [c for c in cands if c.peer_id not in exclude]
    want_k = oracle_min_members(usable, m)
    try:
        ring = elect_ring(cands, m, exclude=exclude)
    except ClusterTooSmall as e:
        # Raised exactly when no valid ring exists at all.
        assert want_k is None
        assert e.available == sum(c.memory_free for c in usable if c.memory_free > 0)
        assert e.needed == m.total_bytes
        return
    assert want_k is not None
    by_id = {c.peer_id: c for c in usable}

    # Minimal member count, distinct computing peers, none excluded.
    assert len(ring) == want_k
    assert len({r.peer_id for r in ring}) == len(ring)
    assert all(r.peer_id in by_id and by_id[r.peer_id].memory_free > 0 for r in ring)

    # Every layer exactly once, contiguous in ring order, at least one layer each.
    assert ring[0].start == 0 and ring[-1].end == m.n_layers
    assert all(a.end == b.start for a, b in itertools.pairwise(ring))
    assert all(r.end - r.start >= 1 for r in ring)

    # Each member within its memory (embedding on the first, head on the last, KV per layer).
    assert all(m.range_bytes(r.start, r.end) <= by_id[r.peer_id].memory_free for r in ring)

    # Same set in any order gives the same ring.
    shuffled = list(cands)
    rnd.shuffle(shuffled)
    assert elect_ring(shuffled, m, exclude=exclude) == ring


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_cold_split_is_bounded_largest_remainder(scenario):
    """Without warm shards, a member strays a layer or more from its memory quota only when forced:
    above quota only if someone else is at its capacity (or it is at the 1-layer floor), below quota
    only if it is at its own capacity (or someone else is held up at the floor)."""
    m, cands, exclude = scenario
    cands = [Candidate(c.peer_id, c.memory_free, c.load, c.compute) for c in cands]
    try:
        ring = elect_ring(cands, m, exclude=exclude)
    except ClusterTooSmall:
        return
    by_id = {c.peer_id: c for c in cands}
    mem = [by_id[r.peer_id].memory_free for r in ring]
    total = sum(mem)
    counts = [r.end - r.start for r in ring]
    caps = []
    for i, x in enumerate(mem):
        overhead = (m.embed_bytes if i == 0 else 0) + (m.head_bytes if i == len(ring) - 1 else 0)
        caps.append((x - overhead) // m.per_layer_bytes)
    quota = [m.n_layers * x / total for x in mem]
    at_cap = any(c == cap and c < q for c, cap, q in zip(counts, caps, quota, strict=True))
    at_floor = any(c == 1 and c > q for c, q in zip(counts, quota, strict=True))
    for c, cap, q in zip(counts, caps, quota, strict=True):
        if c >= q + 1:
            assert at_cap or c == 1
        if c <= q - 1:
            assert c == cap or at_floor


def test_result_type():
    assert elect_ring([peer("a", 100)], model()) == [RingMember("a", 0, 8)]
