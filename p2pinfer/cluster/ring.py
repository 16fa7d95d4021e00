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
   has the model's file (a peer that must fetch its range from peers first comes after), then lower
   load, then higher compute, then peer id -- keeping a peer whenever a valid k-ring containing
   it and the peers kept so far still exists: the lexicographically best valid set.
5. Order: warm members by the first layer they hold, then the rest by descending memory, then peer id
   (so a ring is stable across requests). If that puts the embedding or the head on a peer that cannot
   take it, the first (first, last) pair in that order that fits is moved to the ends.
6. Layers: largest-remainder (Hamilton) apportionment of ``n_layers`` in proportion to memory_free,
   given seat by seat so the bounds hold: everyone starts at 1 layer, nobody goes over its capacity,
   each next layer goes to the member furthest below its quota; ties to the earlier ring position.

Cost: two sorts of the N computing peers, then O(k) per peer considered: ~1 ms at N = 1,000
(benchmarks/election.py).
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
    fetch: bool = False  # has no file of the model: its range's weights come from peers first (slowest start)


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
    if len({c.peer_id for c in candidates}) != len(candidates):
        raise ValueError("duplicate peer id among candidates")  # which record wins would be order-dependent

    name = model.name
    if exclude:
        pool = [c for c in candidates if c.memory_free > 0 and c.peer_id not in exclude]
    else:
        pool = [c for c in candidates if c.memory_free > 0]
    warm_ids = {c.peer_id for c in pool if c.held and any(h[0] == name for h in c.held)}
    fit = _Fit(pool, model, warm_ids)
    k = next((k for k in range(1, min(model.n_layers, len(pool)) + 1) if fit.completable([], None, k)), 0)
    if not k:
        available = sum(c.memory_free for c in pool)
        detail = (
            "enough in total, but it does not split into whole layers"
            if available >= model.total_bytes
            else ""
        )
        raise ClusterTooSmall(model.name, model.total_bytes, available, detail)

    if warm_ids:
        warm = _warm_ring(sorted((c for c in pool if c.peer_id in warm_ids), key=fit.key_of), model, k)
        if warm:
            return warm

    # Members in preference order (a total order, peer id last: the result does not depend on the
    # order of `candidates`), keeping a peer whenever a valid k-ring with it and those kept exists.
    # A peer skipped can never join later: no valid ring held the prefix plus it. Peers too small
    # for any ring with the prefix (an upper bound that only rises as peers are kept) are skipped
    # without sorting them or checking exactly.
    if k == 1:
        whole = model.n_layers * model.per_layer_bytes + model.embed_bytes + model.head_bytes
        mem = fit.mem
        chosen = [_most_preferred(pool, [i for i in range(len(pool)) if mem[i] >= whole], warm_ids)]
    else:
        mids = fit.mid
        threshold = fit.threshold([], k)
        eligible = [i for i in range(len(pool)) if mids[i] >= threshold]
        eligible.sort(key=fit.key)
        chosen: list[int] = []
        for i in eligible:
            if mids[i] >= threshold and fit.completable([*chosen, i], i, k):
                chosen.append(i)
                if len(chosen) == k:
                    break
                threshold = fit.threshold(chosen, k)
    ring = _order([pool[j] for j in chosen], model)
    return _assign_layers(ring, model, _caps(ring, model))


def _most_preferred(pool: list[Candidate], idx: list[int], warm_ids: set[str]) -> int:
    """min(idx, key=preference) in a few cheap passes: warm, then least load, most compute, smallest id."""
    if warm_ids:
        idx = [i for i in idx if pool[i].peer_id in warm_ids] or idx
    idx = [i for i in idx if not pool[i].fetch] or idx
    low = min(pool[i].load for i in idx)
    idx = [i for i in idx if pool[i].load == low]
    high = max(pool[i].compute for i in idx)
    idx = [i for i in idx if pool[i].compute == high]
    return min(idx, key=lambda i: pool[i].peer_id)


def _preference(c: Candidate, model: ModelNeeds) -> tuple:
    warm = any(name == model.name for name, _s, _e in c.held)
    return (not warm, c.fetch and not warm, c.load, -c.compute, c.peer_id)


def _cap(c: Candidate, model: ModelNeeds, first: bool, last: bool) -> int:
    """Most layers `c` can hold at this ring position; < 1 means it cannot be there at all."""
    spare = c.memory_free - (model.embed_bytes if first else 0) - (model.head_bytes if last else 0)
    return spare // model.per_layer_bytes  # floors negatives too, so "can't even hold the overhead" < 0


def _caps(ring: list[Candidate], model: ModelNeeds) -> list[int]:
    return [_cap(c, model, i == 0, i == len(ring) - 1) for i, c in enumerate(ring)]


def _valid(caps: list[int], n_layers: int) -> bool:
    return min(caps) >= 1 and sum(caps) >= n_layers


class _Fit:
    """Does a valid k-member ring exist holding some forced peers, the others taken from the peers
    after a given one in preference order? Peers are indices into the (unsorted) pool.

    Every capacity grows with memory in every seat (first: embedding, last: head, middle), so
    swapping a member for an unused peer with at least as much memory never breaks a ring: the
    non-forced members may be taken as the k - |forced| largest memories available (which of equal
    memories does not matter: the answer is yes or no). What is left is which two members sit at
    the ends: the pair maximising first(f) - mid(f) + last(l) - mid(l) among those that can sit
    there. O(k) per check after one sort of the pool by memory.
    """

    def __init__(self, pool: list[Candidate], model: ModelNeeds, warm_ids: set[str]) -> None:
        self.pool, self.model, self.warm_ids = pool, model, warm_ids
        self.n = model.n_layers
        self.per = model.per_layer_bytes
        self.mem = mem = [c.memory_free for c in pool]
        per = self.per
        self.mid = [m // per for m in mem]
        self.by_memory = sorted(range(len(pool)), key=mem.__getitem__, reverse=True)
        self._keys: dict[int, tuple] = {}

    def key(self, i: int) -> tuple:
        k = self._keys.get(i)
        if k is None:
            c = self.pool[i]
            cold = c.peer_id not in self.warm_ids
            k = self._keys[i] = (cold, c.fetch and cold, c.load, -c.compute, c.peer_id)
        return k

    def key_of(self, c: Candidate) -> tuple:
        cold = c.peer_id not in self.warm_ids
        return (cold, c.fetch and cold, c.load, -c.compute, c.peer_id)

    def threshold(self, chosen: list[int], k: int) -> int:
        """A peer with fewer middle-seat layers than this cannot complete a ring with `chosen`:
        even the largest others (from anywhere, ends as roomy as middles) fall short."""
        need = k - len(chosen) - 1
        fill = 0
        if need > 0:
            skip = set(chosen)
            for i in self.by_memory:
                if i not in skip:
                    fill += self.mid[i]
                    need -= 1
                    if not need:
                        break
        return max(1, self.n - sum(self.mid[i] for i in chosen) - fill)

    def completable(self, forced: list[int], after: int | None, k: int) -> bool:
        n, mem, per, model = self.n, self.mem, self.per, self.model
        if len(forced) > k:
            return False
        if k == 1:
            i = forced[0] if forced else (self.by_memory[0] if self.by_memory else None)
            return i is not None and (mem[i] - model.embed_bytes - model.head_bytes) // per >= n
        members = list(forced)
        need = k - len(forced)
        if need:
            skip = set(forced)
            after_key = None if after is None else self.key(after)
            for i in self.by_memory:
                if i not in skip and (after_key is None or self.key(i) > after_key):
                    members.append(i)
                    need -= 1
                    if not need:
                        break
            if need:
                return False
        mid = self.mid
        if min(mid[i] for i in members) < 1:
            return False
        total = sum(mid[i] for i in members)
        if total < n:
            return False
        # the best ordered (first, last) pair of distinct members
        e, h = model.embed_bytes, model.head_bytes
        fs = sorted(((mem[i] - e) // per - mid[i], i) for i in members if mem[i] - e >= per)[-2:]
        ls = sorted(((mem[i] - h) // per - mid[i], i) for i in members if mem[i] - h >= per)[-2:]
        return any(fi != li and total + fa + la >= n for fa, fi in fs for la, li in ls)


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


def repair_ring(
    candidates: Sequence[Candidate],
    model: ModelNeeds,
    previous: Sequence[RingMember],
    failed: frozenset[str],
    *,
    exclude: frozenset[str] = frozenset(),
) -> list[RingMember] | None:
    """`previous` with the ranges of its `failed` members handed to spare peers; survivors keep theirs.

    A replay then costs at most the load of the missing range (nothing when a spare holds it warm),
    where a fresh election would move every boundary and make each survivor reload. A missing range
    goes whole to the most preferred spare that fits it (one holding exactly that range first), else
    is split over the roomiest spares. None when a survivor is gone or no spare set covers the gap:
    the caller elects a new ring.
    """
    pool = {c.peer_id: c for c in candidates if c.memory_free > 0 and c.peer_id not in exclude}
    ring_ids = {m.peer_id for m in previous}
    for m in previous:
        if m.peer_id not in failed and (
            m.peer_id not in pool or model.range_bytes(m.start, m.end) > pool[m.peer_id].memory_free
        ):
            return None
    spares = sorted(
        (c for c in pool.values() if c.peer_id not in ring_ids), key=lambda c: _preference(c, model)
    )
    out: list[RingMember] = []
    for m in previous:
        if m.peer_id not in failed:
            out.append(m)
            continue
        pieces = _cover(spares, model, m.start, m.end)
        if pieces is None:
            return None
        taken = {p.peer_id for p in pieces}
        spares = [c for c in spares if c.peer_id not in taken]
        out.extend(pieces)
    return out


def _cover(spares: list[Candidate], model: ModelNeeds, start: int, end: int) -> list[RingMember] | None:
    """Layers [start, end) on one spare if one fits (warm holders of exactly that range first), else
    split in ring order over the spares with the most room."""
    exact = (model.name, start, end)
    need = model.range_bytes(start, end)
    whole = [c for c in spares if c.memory_free >= need]
    if whole:
        best = min(whole, key=lambda c: (exact not in c.held, _preference(c, model)))
        return [RingMember(best.peer_id, start, end)]
    pieces, pos = [], start
    for c in sorted(spares, key=lambda c: (-c.memory_free, c.peer_id)):
        spare = c.memory_free - (model.embed_bytes if pos == 0 else 0)
        tail = model.head_bytes if end == model.n_layers else 0
        if (spare - tail) // model.per_layer_bytes >= end - pos:
            count = end - pos  # the rest, with the head if the range has it
        else:
            count = min(end - pos - 1, spare // model.per_layer_bytes)  # a piece short of the end
        if count < 1:
            continue
        pieces.append(RingMember(c.peer_id, pos, pos + count))
        pos += count
        if pos == end:
            return pieces
    return None
