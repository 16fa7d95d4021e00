"""Spares pre-load a range that a ring depends on, so a member's death costs a replay, not a load.

A computing peer that holds no layers (a spare: no ring needs it now) looks at the warm ranges other
peers gossip. Ranges held by exactly one peer are the ones whose loss means a cold load; the spares
share them out by peer id (spare i takes the i-th, largest first, among those that fit its memory) and
each loads one in the background. When its holder dies, cluster.ring.repair_ring prefers the spare
holding exactly that range, and the replay starts at once. The shard is idle, so any load that needs
the memory evicts it first: a pre-load never costs the peer what it offers.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import trio

from p2pinfer.cluster.record import PeerRecord
from p2pinfer.engine import EngineError, ModelCatalog, ModelEntry, UnknownModelError
from p2pinfer.serve.entry import model_needs
from p2pinfer.serve.shards import ShardHost

log = logging.getLogger("p2pinfer.spares")

INTERVAL = 5.0  # seconds between looks at the view


def choose_preload(self_id: str, records: list[PeerRecord], models: Callable[[str], ModelEntry | None],
                   offer: int, kv_tokens: int = 2048) -> tuple[ModelEntry, int, int] | None:  # fmt: skip
    """The (model, start, end) this spare should pre-load, or None. Pure: depends only on its inputs."""
    live = [r for r in records if not r.leave and not r.draining]
    for name in sorted({m for r in live for m, _s, _e in r.layers}):
        entry = models(name)
        if entry is None:
            continue
        held = Counter((s, e) for r in live if r.peer_id != self_id for m, s, e in r.layers if m == name)
        needs = model_needs(entry, kv_tokens)
        single = sorted(
            (rg for rg, n in held.items() if n == 1), key=lambda rg: (-needs.range_bytes(*rg), rg)
        )
        fitting = [rg for rg in single if needs.range_bytes(*rg) <= offer]
        spares = sorted(r.peer_id for r in live if r.can_compute and not r.layers and name in r.models)
        if self_id in spares and spares.index(self_id) < len(fitting):
            start, end = fitting[spares.index(self_id)]
            return entry, start, end
    return None


class SparePreloader:
    def __init__(self, self_id: str, catalog: ModelCatalog, shards: ShardHost,
                 records: Callable[[], list[PeerRecord]], offer: Callable[[], int]) -> None:  # fmt: skip
        self.self_id, self.catalog, self.shards = self_id, catalog, shards
        self.records, self.offer = records, offer

    def _model(self, name: str) -> ModelEntry | None:
        try:
            return self.catalog.get(name)
        except UnknownModelError:
            return None

    async def run(self) -> None:
        while True:
            await trio.sleep(INTERVAL)
            if self.shards.layers() or self.shards.loading():
                continue  # not a spare (or busy loading already)
            choice = choose_preload(self.self_id, self.records(), self._model, self.offer(),
                                    self.shards.capacity.kv_tokens)
            if choice is None:
                continue
            entry, start, end = choice
            log.info("spare: pre-loading %s layers [%d, %d), held by one peer only", entry.name, start, end)
            try:
                self.shards.release(await self.shards.acquire(entry, start, end))
            except EngineError as e:
                log.info("spare: pre-loading %s layers [%d, %d) failed: %s", entry.name, start, end, e)
