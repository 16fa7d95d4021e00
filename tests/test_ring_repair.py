"""Ring repair after a member's loss: survivors keep their ranges, only the lost range moves."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pinfer.cluster.ring import Candidate, ModelNeeds, RingMember, repair_ring


def model(n=12, layer=10, embed=5, head=5) -> ModelNeeds:
    return ModelNeeds("m", n, layer, embed, head, 0, 0)


def peer(pid, mem, load=0, held=()) -> Candidate:
    return Candidate(pid, mem, load, 1.0, tuple(held))


RING = [RingMember("a", 0, 4), RingMember("b", 4, 8), RingMember("c", 8, 12)]
SURVIVORS = [peer("a", 45, held=[("m", 0, 4)]), peer("c", 45, held=[("m", 8, 12)])]


def spans(ring):
    return [(m.peer_id, m.start, m.end) for m in ring]


def test_lost_middle_goes_to_the_spare_and_survivors_keep_their_ranges():
    ring = repair_ring([*SURVIVORS, peer("d", 50), peer("e", 40)], model(), RING, frozenset({"b"}))
    assert spans(ring) == [("a", 0, 4), ("d", 4, 8), ("c", 8, 12)]
    ring = repair_ring([*SURVIVORS, peer("d", 50, load=1), peer("e", 40)], model(), RING, frozenset({"b"}))
    assert spans(ring) == [("a", 0, 4), ("e", 4, 8), ("c", 8, 12)]  # the less loaded spare


def test_a_spare_holding_exactly_the_lost_range_is_preferred():
    warm = peer("z", 40, load=3, held=[("m", 4, 8)])
    ring = repair_ring([*SURVIVORS, peer("d", 100), warm], model(), RING, frozenset({"b"}))
    assert spans(ring) == [("a", 0, 4), ("z", 4, 8), ("c", 8, 12)]


def test_lost_range_split_over_spares_when_none_holds_it_whole():
    ring = repair_ring([*SURVIVORS, peer("d", 20), peer("e", 25)], model(), RING, frozenset({"b"}))
    assert spans(ring) == [("a", 0, 4), ("e", 4, 6), ("d", 6, 8), ("c", 8, 12)]


def test_lost_first_member_needs_room_for_the_embedding():
    survivors = [peer("b", 40, held=[("m", 4, 8)]), peer("c", 45, held=[("m", 8, 12)])]
    assert repair_ring([*survivors, peer("d", 44)], model(), RING, frozenset({"a"})) is None
    ring = repair_ring([*survivors, peer("d", 45)], model(), RING, frozenset({"a"}))
    assert spans(ring) == [("d", 0, 4), ("b", 4, 8), ("c", 8, 12)]


def test_none_when_a_survivor_left_the_view_or_no_spare_fits():
    assert repair_ring([SURVIVORS[0], peer("d", 100)], model(), RING, frozenset({"b"})) is None
    assert repair_ring([*SURVIVORS, peer("d", 10)], model(), RING, frozenset({"b"})) is None
    assert (
        repair_ring([*SURVIVORS, peer("d", 100)], model(), RING, frozenset({"b"}), exclude=frozenset({"d"}))
        is None
    )


@st.composite
def scenarios(draw):
    n = draw(st.integers(2, 10))
    k = draw(st.integers(2, min(n, 4)))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1)))
    bounds = [0, *cuts, n]
    m = model(n=n, layer=10, embed=draw(st.integers(0, 15)), head=draw(st.integers(0, 15)))
    ring = [RingMember(f"r{i}", bounds[i], bounds[i + 1]) for i in range(k)]
    members = [peer(r.peer_id, m.range_bytes(r.start, r.end) + draw(st.integers(0, 20)), held=[("m", r.start, r.end)])
               for r in ring]  # fmt: skip
    spares = [
        peer(f"s{i}", draw(st.integers(0, 120)), load=draw(st.integers(0, 2)))
        for i in range(draw(st.integers(0, 4)))
    ]
    lost = draw(st.sampled_from(ring)).peer_id
    return m, ring, members, spares, lost


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_properties(scenario):
    m, ring, members, spares, lost = scenario
    cands = [c for c in members if c.peer_id != lost] + spares
    out = repair_ring(cands, m, ring, frozenset({lost}))
    if out is None:
        # only when no spare holds the lost range whole, and the spares' room falls short of it
        gone = next(r for r in ring if r.peer_id == lost)
        assert all(c.memory_free < m.range_bytes(gone.start, gone.end) for c in spares)
        assert sum(c.memory_free // m.per_layer_bytes for c in spares) < (gone.end - gone.start) + 2 * len(
            spares
        )
        return
    by_id = {c.peer_id: c for c in cands}
    assert out[0].start == 0 and out[-1].end == m.n_layers
    assert all(a.end == b.start for a, b in zip(out, out[1:], strict=False))
    assert len({r.peer_id for r in out}) == len(out) and lost not in {r.peer_id for r in out}
    assert all(r.start < r.end and m.range_bytes(r.start, r.end) <= by_id[r.peer_id].memory_free for r in out)
    kept = {(r.peer_id, r.start, r.end) for r in ring if r.peer_id != lost}
    assert kept <= {(r.peer_id, r.start, r.end) for r in out}  # survivors never move
