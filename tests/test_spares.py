"""Which range a spare pre-loads: one held by a single peer, shared out among spares by peer id."""

from __future__ import annotations

from p2pinfer.cluster.record import PeerRecord
from p2pinfer.engine.catalog import ModelEntry
from p2pinfer.serve.spares import choose_preload

ENTRY = ModelEntry("m", "/nowhere", "gguf", "llama", 30, 64, 100, 2048, 1000, 500, 500, 0, (2,))
GIB = 1 << 30


def rec(pid, layers=(), **kw) -> PeerRecord:
    return PeerRecord(peer_id=pid, seq=1, models=("m",), layers=tuple(("m", s, e) for s, e in layers), **kw)


def models(name):
    return ENTRY if name == "m" else None


RING = [rec("a", [(0, 8)]), rec("b", [(8, 20)]), rec("c", [(20, 30)])]


def test_spares_share_the_singly_held_ranges_largest_first():
    recs = [*RING, rec("d"), rec("e")]
    assert choose_preload("d", recs, models, GIB)[1:] == (8, 20)  # the largest
    assert choose_preload("e", recs, models, GIB)[1:] == (20, 30)
    assert choose_preload("a", recs, models, GIB) is None  # not a spare


def test_nothing_when_no_range_fits_or_all_are_held_twice():
    recs = [*RING, rec("d")]
    assert choose_preload("d", recs, models, 5_000) is None
    twice = [*RING, rec("x", [(0, 8)]), rec("y", [(8, 20)]), rec("z", [(20, 30)]), rec("d")]
    assert choose_preload("d", twice, models, GIB) is None


def test_leaving_or_draining_holders_do_not_count_and_unknown_models_are_skipped():
    recs = [rec("a", [(0, 8)]), rec("b", [(8, 20)], draining=True), rec("b2", [(8, 20)]), rec("d")]
    assert choose_preload("d", recs, models, GIB)[1:] == (8, 20)  # b2 is its only live holder
    assert choose_preload("d", recs, lambda name: None, GIB) is None
