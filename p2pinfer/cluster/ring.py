"""Ring election: which peers run one request's model, and which layers each of them holds.

Pure and deterministic: no I/O, no clock, no randomness. The result depends only on the *set* of
candidates (never their order), the model's needs and `exclude`.

Layer ranges are half-open, ``[start, end)``, in ring order: member 0 starts at layer 0 and holds
the embedding, the last member ends at ``n_layers`` and holds the final norm + LM head.

Cost model. A member holding layers ``[s, e)`` needs
``(e - s) * (layer_bytes + kv_bytes_per_token_per_layer * context_tokens)``
plus ``embed_bytes`` if ``s == 0`` plus ``head_bytes`` if ``e == n_layers``, and that must be
``<= memory_free``. The caller should count the bytes a peer's warm shard of *this* model occupies as
free (they are reused or replaced), or warm shards could never be re-elected.

Rules, in order:

1. Candidates: not in `exclude`, ``memory_free > 0`` (gateway peers compute nothing).
2. Size: k = the fewest members for which *some* valid ring exists (every member >= 1 layer, none
   over its memory under the cost model). This is exact, not a sum-of-memory estimate; when no k
   works, `ClusterTooSmall`. k == 1 is the "small models stay on one node" case.
3. Warm reuse: if the ranges of this model that candidates hold now chain into a valid k-member ring,
   return that ring unchanged (several: the best by preference key, in ring order).
4. Otherwise members are picked in preference order -- holds some layer of this model (warm), then
   lower load, then higher compute, then peer id -- keeping a peer whenever a valid k-ring containing
   it and the peers kept so far still exists: the lexicographically best valid set.
5. Order: warm members by the first layer they hold, then the rest by descending memory, then peer id
   (so a ring is stable across requests). If that puts the embedding or the head on a peer that cannot
   take it, the first (first, last) pair in that order that fits is moved to the ends.
6. Layers: largest-remainder (Hamilton) apportionment of ``n_layers`` in proportion to memory_free,
   given seat by seat so the bounds hold: everyone starts at 1 layer, nobody goes over its capacity,
   each next layer goes to the member furthest below its quota; ties to the earlier ring position.

Cost: O(N^3 * k) for N computing peers (about 20 ms at N = 30, 0.2 s at N = 60), fine for a LAN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    peer_id: str
    memory_free: int  # bytes this peer offers now (already capped by its --memory-limit)
    load: int  # active requests
    compute: float  # measured score, higher = faster
    held: tuple[tuple[str, int, int], ...] = ()  # (model, start, end) ranges loaded now (warm shards)


@dataclass(frozen=True)
class ModelNeeds:
    name: str
    n_layers: int
    layer_bytes: int  # one transformer layer's weights
    embed_bytes: int  # held by the first member
    head_bytes: int  # held by the last member
    kv_bytes_per_token_per_layer: int
    context_tokens: int  # KV headroom reserved per layer a member holds

    @property
    def per_layer_bytes(self) -> int:
        return self.layer_bytes + self.kv_bytes_per_token_per_layer * self.context_tokens

    @property
    def total_bytes(self) -> int:
        return self.n_layers * self.per_layer_bytes + self.embed_bytes + self.head_bytes

    def range_bytes(self, start: int, end: int) -> int:
        """What a member holding layers [start, end) needs."""
        extra = (self.embed_bytes if start == 0 else 0) + (self.head_bytes if end == self.n_layers else 0)
        return (end - start) * self.per_layer_bytes + extra


@dataclass(frozen=True)
class RingMember:
    peer_id: str
    start: int  # first layer, inclusive
    end: int  # last layer, exclusive


class ClusterTooSmall(Exception):
    def __init__(self, model: str, needed: int, available: int, detail: str = "") -> None:
        self.model, self.needed, self.available = model, needed, available
        msg = f"cluster too small for {model}: needs {human_bytes(needed)}, has {human_bytes(available)}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def elect_ring(
    candidates: Sequence[Candidate], model: ModelNeeds, *, exclude: frozenset[str] = frozenset()
) -> list[RingMember]:
    if model.n_layers < 1 or model.per_layer_bytes < 1:
        raise ValueError(f"model {model.name}: needs n_layers >= 1 and a positive per-layer size")
    ids = [c.peer_id for c in candidates]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate peer id among candidates")  # which record wins would be order-dependent

    # Sorting by a total order (peer id last) is what makes everything below order-independent.
    pool = sorted(
        (c for c in candidates if c.peer_id not in exclude and c.memory_free > 0),
        key=lambda c: _preference(c, model),
    )
    k = next((k for k in range(1, min(model.n_layers, len(pool)) + 1) if _completable([], pool, model, k)), 0)
    if not k:
        available = sum(c.memory_free for c in pool)
        detail = (
            "enough in total, but it does not split into whole layers"
            if available >= model.total_bytes
            else ""
        )
        raise ClusterTooSmall(model.name, model.total_bytes, available, detail)

    warm = _warm_ring(pool, model, k)
    if warm:
        return warm

    chosen: list[Candidate] = []
    for i, c in enumerate(pool):
        # A peer skipped here can never join later: no valid ring held the prefix plus it.
        if _completable([*chosen, c], pool[i + 1 :], model, k):
            chosen.append(c)
            if len(chosen) == k:
                break
    ring = _order(chosen, model)
    return _assign_layers(ring, model, _caps(ring, model))


def _preference(c: Candidate, model: ModelNeeds) -> tuple:
    warm = any(name == model.name for name, _s, _e in c.held)
    return (not warm, c.load, -c.compute, c.peer_id)


def _cap(c: Candidate, model: ModelNeeds, first: bool, last: bool) -> int:
    """Most layers `c` can hold at this ring position; < 1 means it cannot be there at all."""
    spare = c.memory_free - (model.embed_bytes if first else 0) - (model.head_bytes if last else 0)
    return spare // model.per_layer_bytes  # floors negatives too, so "can't even hold the overhead" < 0


def _caps(ring: list[Candidate], model: ModelNeeds) -> list[int]:
    return [_cap(c, model, i == 0, i == len(ring) - 1) for i, c in enumerate(ring)]


def _valid(caps: list[int], n_layers: int) -> bool:
    return min(caps) >= 1 and sum(caps) >= n_layers


def _completable(forced: list[Candidate], rest: list[Candidate], model: ModelNeeds, k: int) -> bool:
    """Does a valid k-member ring exist holding every peer of `forced`, the others taken from `rest`?

    Only who sits first (embedding) and last (head) matters, so try every such pair; the remaining
    middle seats are best filled by the largest memories (a middle's capacity grows with memory).
    """
    n = model.n_layers
    if len(forced) > k:
        return False
    if k == 1:
        return any(_cap(c, model, True, True) >= n for c in (forced or rest))
    everyone = [*forced, *rest]
    first_cap = {c.peer_id: _cap(c, model, True, False) for c in everyone}
    mid_cap = {c.peer_id: _cap(c, model, False, False) for c in everyone}
    last_cap = {c.peer_id: _cap(c, model, False, True) for c in everyone}
    # At most k - 2 middle seats, and the two ends can take at most two of these away.
    by_memory = sorted(rest, key=lambda c: -c.memory_free)[:k]
    for f in everyone:
        if first_cap[f.peer_id] < 1:
            continue
        for last in everyone:
            if last.peer_id == f.peer_id or last_cap[last.peer_id] < 1:
                continue
            ends = (f.peer_id, last.peer_id)
            mids = [c for c in forced if c.peer_id not in ends]
            seats = k - 2 - len(mids)
            fill = [c for c in by_memory if c.peer_id not in ends][: max(seats, 0)]
            if seats < 0 or len(fill) < seats:
                continue
            caps = [first_cap[f.peer_id], last_cap[last.peer_id], *(mid_cap[c.peer_id] for c in mids + fill)]
            if _valid(caps, n):
                return True
    return False


def _warm_ring(pool: list[Candidate], model: ModelNeeds, k: int) -> list[RingMember] | None:
    """The loaded ranges of this model, if some of them chain into a valid k-member ring."""
    n = model.n_layers
    pieces = [(s, e, c) for c in pool for name, s, e in c.held if name == model.name and 0 <= s < e <= n]
    best: tuple[tuple, list[RingMember]] | None = None

    def walk(pos: int, ring: list[tuple[int, int, Candidate]]) -> None:
        nonlocal best
        if pos == n:  # cannot be reached with fewer than k pieces: k is the minimum
            key = tuple(_preference(c, model) for _s, _e, c in ring)
            if best is None or key < best[0]:
                best = (key, [RingMember(c.peer_id, s, e) for s, e, c in ring])
            return
        if len(ring) == k:
            return
        used = {c.peer_id for _s, _e, c in ring}
        for s, e, c in pieces:
            if s == pos and c.peer_id not in used and model.range_bytes(s, e) <= c.memory_free:
                walk(e, [*ring, (s, e, c)])

    walk(0, [])
    return best[1] if best else None


def _order(members: list[Candidate], model: ModelNeeds) -> list[Candidate]:
    def key(c: Candidate) -> tuple:
        starts = [s for name, s, _e in c.held if name == model.name]
        return (min(starts, default=model.n_layers), -c.memory_free, c.peer_id)

    ordered = sorted(members, key=key)
    if len(ordered) == 1:
        return ordered
    for f in ordered:
        for last in reversed(ordered):
            if last is f:
                continue
            ring = [f, *(c for c in ordered if c is not f and c is not last), last]
            if _valid(_caps(ring, model), model.n_layers):
                return ring
    raise AssertionError("unreachable: members were chosen so that some order fits")


def _assign_layers(ring: list[Candidate], model: ModelNeeds, caps: list[int]) -> list[RingMember]:
    n, total = model.n_layers, sum(c.memory_free for c in ring)
    counts = [1] * len(ring)
    for _ in range(n - len(ring)):
        # Deficit against the quota n*m/total, scaled by total to stay in exact integers.
        open_ = [i for i in range(len(ring)) if counts[i] < caps[i]]
        i = max(open_, key=lambda i: (n * ring[i].memory_free - counts[i] * total, -i))
        counts[i] += 1
    out, start = [], 0
    for c, count in zip(ring, counts, strict=True):
        out.append(RingMember(c.peer_id, start, start + count))
        start += count
    return out
