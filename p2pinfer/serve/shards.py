"""The shards this peer holds: loaded on first use, kept warm, evicted when memory is needed.

All engine calls go through `compute`, one at a time, in a worker thread: tinygrad is not
thread-safe, and the trio tasks reading ring streams must never wait behind a forward pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from p2pinfer.config import DEFAULT_CAPACITY, Capacity
from p2pinfer.engine import EngineError, ModelEntry, Shard
from p2pinfer.progress import LoadProgress

log = logging.getLogger("p2pinfer.shards")

ShardKey = tuple[str, int, int]  # (model, start, end)
BUSY_WAIT = 10.0  # seconds a load waits for busy shards to be released before answering "no memory"


@dataclass
class _Held:
    shard: Shard
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


# serve/fetch.py's WeightService.prepare: make a range's weights readable here (fetched from peers) before
# it loads, reporting bytes (done, total)
Prepare = Callable[[ModelEntry, int, int, Callable[[int, int], None]], Awaitable[None]]


class ShardHost:
    def __init__(self, memory_limit: int | None, on_change: Callable[[], None],
                 capacity: Capacity = DEFAULT_CAPACITY, prepare: Prepare | None = None) -> None:  # fmt: skip
        self.memory_limit, self.capacity = memory_limit, capacity
        self.prepare = prepare
        self.on_change = on_change
        self.progress = LoadProgress()  # per range being loaded: gossiped as a fraction, drawn as bars
        self._held: dict[ShardKey, _Held] = {}
        self._loading: dict[ShardKey, trio.Event] = {}
        self._engine = trio.Semaphore(1)  # one engine call at a time (compute: who gives it back)
        self._released = trio.Event()  # set (and replaced) whenever a shard's last user releases it

    # --- what gossip says about us ---------------------------------------
    def layers(self) -> tuple[ShardKey, ...]:
        return tuple(sorted(self._held))

    def loading(self) -> tuple[tuple[str, int, int, float], ...]:
        return tuple((m, s, e, self.progress.fraction((m, s, e))) for (m, s, e) in sorted(self._loading))

    def fetching(self) -> tuple[tuple[str, int, int, int, int], ...]:
        """(model, start, end, bytes done, bytes total) of ranges whose weights are being fetched from peers;
        done moves in tenths of total, as the loading fraction does (each change publishes a full record)."""
        out = []
        for key, stages in sorted(self.progress.snapshot().items()):
            done, total = stages.get("fetch", (0, 0))
            if total and done < total:
                out.append((*key, int(done * 10 // total) * total // 10, total))
        return tuple(out)

    def engine_busy(self) -> bool:
        """An engine call is running (or waiting): e.g. a load whose cancelled caller did not wait for it."""
        return self._engine.value == 0

    def in_use(self) -> bool:
        """A request is running through a shard here."""
        return any(h.users for h in self._held.values())

    def offer(self, available: int) -> int:
        """Bytes of new layers this peer can take: what the device has free, within --memory-limit."""
        if self.memory_limit is None:
            return available
        return max(0, min(available, self.memory_limit - self.held_bytes()))

    def held_bytes(self, model: str | None = None) -> int:
        return sum(
            h.shard.entry.shard_bytes(s, e) for (m, s, e), h in self._held.items() if model in (None, m)
        )

    # --- engine calls ----------------------------------------------------
    async def compute(self, fn: Callable, *args):
        """Run fn(*args) in a worker thread, one call at a time. A cancelled caller returns at once (shutdown
        must not wait seconds for a shard load): the call runs on, and holds the engine until it ends."""
        await self._engine.acquire()
        token = trio.lowlevel.current_trio_token()
        claim = threading.Lock()
        state = {"ran": False, "done": False, "left": False}  # the thread started / ended fn; the caller left

        def call():
            with claim:
                if state["left"]:
                    return None  # abandoned before it started: the caller released the engine
                state["ran"] = True
            try:
                return fn(*args)
            finally:
                with claim:
                    state["done"] = True
                    ours = state["left"]
                if ours:  # the caller stopped waiting: the engine is the thread's to give back
                    try:
                        token.run_sync_soon(self._engine.release)
                    except trio.RunFinishedError:
                        pass  # the agent has stopped: nobody waits for the engine any more

        try:
            result = await trio.to_thread.run_sync(call, abandon_on_cancel=True)
        except BaseException:
            with claim:
                state["left"] = True
                ours = not state["ran"] or state["done"]
            if ours:
                self._engine.release()
            raise
        # The caller gives the engine back, not the thread: one wake-up of the event loop per call, not two
        # (each costs tens of us after a forward has swept the caches, and a ring pays it at every hop).
        self._engine.release()
        return result

    async def acquire(self, entry: ModelEntry, start: int, end: int) -> Shard:
        """The shard for this range, loading it (and evicting idle ones) if needed; caller must release()."""
        key = (entry.name, start, end)
        while key in self._loading:  # someone else is loading it: wait, then share
            await self._loading[key].wait()
        held = self._held.get(key)
        if held is None:
            done = self._loading[key] = trio.Event()
            self.on_change()
            try:
                report = self.progress.reporter(key)
                if self.prepare is not None:
                    await self.prepare(entry, start, end, lambda d, t: report("fetch", d, t))
                await self._make_room(entry.shard_bytes(start, end))
                log.info("loading %s layers [%d, %d)", entry.name, start, end)
                t0 = time.monotonic()
                cap = self.capacity
                shard = await self.compute(
                    lambda: Shard.load(entry, start, end, max_sessions=cap.sessions, threads=cap.threads,
                                       max_context=cap.context_for(entry.context_length), beam=cap.beam,
                                       warm_tokens=cap.kv_tokens, progress=report)  # fmt: skip
                )
                log.info("loaded %s layers [%d, %d) in %.1f s", entry.name, start, end, time.monotonic() - t0)
                held = self._held[key] = _Held(shard)
            finally:
                del self._loading[key]
                self.progress.forget(key)
                done.set()
                self.on_change()
        held.users += 1
        held.last_used = time.monotonic()
        return held.shard

    def release(self, shard: Shard) -> None:
        held = self._held.get((shard.entry.name, shard.start, shard.end))
        if held is not None:
            held.users = max(0, held.users - 1)
            held.last_used = time.monotonic()
            if held.users == 0:
                self._released.set()
                self._released = trio.Event()

    async def _make_room(self, need: int) -> None:
        """Evict idle shards for `need` bytes; when busy shards hold the room, wait a little for them
        to be released (a request that just ended on this peer frees its shard a moment later)."""
        with trio.move_on_after(BUSY_WAIT):
            while not self._evict_for(need):
                await self._released.wait()
            return
        if not self._evict_for(need):
            raise EngineError(
                f"no memory for {need} more bytes of layers: {self.held_bytes()} of {self.memory_limit} held by busy shards"
            )

    def _evict_for(self, need: int) -> bool:
        """Drop idle shards, least recently used first, until `need` more bytes fit under the limit."""
        if self.memory_limit is None:
            return True
        idle = sorted((h.last_used, k) for k, h in self._held.items() if h.users == 0)
        while self.held_bytes() + need > self.memory_limit and idle:
            _, key = idle.pop(0)
            log.info("evicting idle shard %s layers [%d, %d) to make room", *key)
            self._held.pop(key).shard.close()
        return self.held_bytes() + need <= self.memory_limit
