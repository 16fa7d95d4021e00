"""An in-process cluster for serve/: real EntryService and Members on in-memory links, with a small
arithmetic "model" in place of the engine, so ring, replay, cancel and timeout logic runs in
milliseconds. The real-process tests (test_ring_*.py, test_drain.py, ...) stay the end-to-end layer.

The toy model: the first shard turns each token into the running sum of the ids so far (its KV state),
every layer adds 1, and the last shard's logits pick (value mod VOCAB). A ring of any split therefore
gives exactly the lone peer's tokens, and a replay (prompt + tokens so far, prefilled on a fresh ring)
continues the same sequence: the properties the real ring guarantees.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import numpy as np
import trio

from p2pinfer.cluster.record import PeerRecord
from p2pinfer.engine import ModelEntry
from p2pinfer.serve.entry import EntryService
from p2pinfer.serve.links import LinkClosed, LocalLink
from p2pinfer.serve.member import Member

VOCAB, HIDDEN, LAYERS = 97, 4, 12
MODEL = ModelEntry(name="toy", path="", format="gguf", arch="llama", n_layers=LAYERS, hidden_size=HIDDEN,
                   vocab_size=VOCAB, context_length=4096, layer_bytes=10 << 20, embed_bytes=5 << 20,
                   head_bytes=5 << 20, kv_bytes_per_token_per_layer=16, eos_token_ids=(0,))  # fmt: skip


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    """What any ring must answer, greedy: each token is (sum of all ids so far + layers) mod VOCAB."""
    ids, out = list(prompt), []
    for _ in range(n):
        tok = (sum(ids) + LAYERS) % VOCAB
        out.append(tok)
        ids.append(tok)
    return out


class ToyShard:
    def __init__(self, start: int, end: int) -> None:
        self.entry, self.start, self.end = MODEL, start, end
        self.sessions: dict[str, float] = {}

    def open_session(self, sid: str, max_tokens: int) -> None:
        self.sessions[sid] = 0.0

    def close_session(self, sid: str) -> None:
        self.sessions.pop(sid, None)

    def forward(self, sid: str, x: np.ndarray) -> np.ndarray:
        if self.start == 0:
            sums = self.sessions[sid] + np.cumsum(x.astype(np.float64))
            self.sessions[sid] = float(sums[-1])
            h = np.zeros((x.size, HIDDEN), dtype=np.float32)
            h[:, 0] = sums
        else:
            h = np.array(x, dtype=np.float32, copy=True)
        h[:, 0] += self.end - self.start
        if self.end < LAYERS:
            return h
        logits = np.zeros(VOCAB, dtype=np.float32)
        logits[int(round(float(h[-1, 0]))) % VOCAB] = 1.0
        return logits


class ToyShardHost:
    """ShardHost's surface as Member uses it; `step_delay` makes each engine call take that long."""

    def __init__(self, step_delay: float = 0.0) -> None:
        self.step_delay = step_delay
        self.shards: dict[tuple[int, int], ToyShard] = {}
        self.stall = trio.Event()  # set: engine calls never return (a wedged peer)
        self.stall.set()
        self.calls = 0

    async def acquire(self, entry, start: int, end: int) -> ToyShard:
        return self.shards.setdefault((start, end), ToyShard(start, end))

    def release(self, shard) -> None:
        pass

    async def compute(self, fn, *args):
        self.calls += 1
        await trio.sleep(self.step_delay)
        if fn.__name__ == "forward":  # closing a session still works on a wedged peer
            await self.stall.wait()
        return fn(*args)

    async def forward(self, shard, rid: str, x):  # (no batching here: the toy's calls are cheap)
        return await self.compute(shard.forward, rid, x)

    def open_sessions(self) -> int:
        return sum(len(s.sessions) for s in self.shards.values())


class ToyCatalog:
    def get(self, name: str) -> ModelEntry:
        if name != MODEL.name:
            from p2pinfer.engine import UnknownModelError

            raise UnknownModelError(f"unknown model {name!r}")
        return MODEL


class Cluster:
    """Peers p0..pN-1, each a Member on its own ToyShardHost, reachable over in-memory links; every
    peer can also enter requests (`entry(peer)`). `kill(peer)` ends all its tasks and links at once."""

    def __init__(
        self, nursery: trio.Nursery, n: int, memory: int = 200 << 20, step_delay: float = 0.0
    ) -> None:
        self.nursery = nursery
        self.ids = [f"p{i}" for i in range(n)]
        self.hosts = {p: ToyShardHost(step_delay) for p in self.ids}
        self.memory = {p: memory for p in self.ids}
        self.dead: set[str] = set()
        self._scopes: dict[str, set[trio.CancelScope]] = {p: set() for p in self.ids}
        self.members = {p: Member(ToyCatalog(), self.hosts[p], linker=_Linker(self, p)) for p in self.ids}
        self.frames: list[tuple[str, str, str, str]] = []  # (link kind, from, to, frame type), every frame sent

    def records(self) -> list[PeerRecord]:
        return [PeerRecord(p, 1, memory_free=self.memory[p], compute=1.0, models=(MODEL.name,),
                           active_requests=self.members[p].active_requests)
                for p in self.ids if p not in self.dead]  # fmt: skip

    def entry(self, peer: str, max_requests: int = 8) -> EntryService:
        return EntryService(peer, _Linker(self, peer), self.records, max_requests)

    def kill(self, peer: str) -> None:
        self.dead.add(peer)
        for scope in self._scopes[peer]:
            scope.cancel()

    def open_sessions(self) -> int:
        return sum(h.open_sessions() for h in self.hosts.values())

    async def settled(self, timeout: float = 5.0) -> int:
        """Open sessions once members have seen their requests end (they free them as links close)."""
        with trio.move_on_after(timeout):
            while self.open_sessions():
                await trio.sleep(0.01)
        return self.open_sessions()

    async def _serve(self, peer: str, link: LocalLink) -> None:
        with trio.CancelScope() as scope:
            self._scopes[peer].add(scope)
            try:
                await self.members[peer].handle(link)
            except LinkClosed:
                pass
            finally:
                self._scopes[peer].discard(scope)
                await link.aclose()


class _Linker:
    def __init__(self, cluster: Cluster, me: str) -> None:
        self.cluster, self.me = cluster, me

    async def prepare(self, peers: list[str], connect_timeout: float = 10.0) -> dict:
        """In-memory links cost nothing to open: no pool to fill."""
        return {}

    @asynccontextmanager
    async def open(self, peer: str, connect_timeout: float = 10.0):
        if peer in self.cluster.dead or self.me in self.cluster.dead:
            raise LinkClosed(f"cannot open a ring stream to {peer}: it is gone")
        a_tx, b_rx = trio.open_memory_channel(256)
        b_tx, a_rx = trio.open_memory_channel(256)
        kind: list[str] = []  # "open": a control link, "data": a ring neighbour's, set by the first frame
        mine = _CountingLink(peer, a_tx, a_rx, self.cluster.frames, self.me, kind)
        theirs = _CountingLink(self.me, b_tx, b_rx, self.cluster.frames, peer, kind)
        self.cluster.nursery.start_soon(self.cluster._serve, peer, theirs)
        try:
            yield mine
        finally:
            await mine.aclose()


class _CountingLink(LocalLink):
    """A LocalLink that logs every frame it sends in Cluster.frames."""

    def __init__(self, peer, tx, rx, log: list, me: str, kind: list[str]) -> None:
        super().__init__(peer, tx, rx)
        self._log, self._me, self._kind = log, me, kind

    async def send(self, header: dict, tensor=None) -> None:
        if not self._kind:
            self._kind.append("control" if header.get("t") == "open" else "data")
        self._log.append((self._kind[0], self._me, self.peer, str(header.get("t"))))
        await super().send(header, tensor)
