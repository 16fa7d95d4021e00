"""The shards this peer holds: loaded on first use, kept warm, evicted when memory is needed.

All engine calls go through `compute`, one at a time, in a worker thread: tinygrad is not
thread-safe, and the trio tasks reading ring streams must never wait behind a forward pass.
Decode positions go through `forward`: those of several sessions that wait for the engine at the same
time run as one step (Shard.forward_rows), each weight read once for all of them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np
import trio

from p2pinfer.config import DEFAULT_CAPACITY, Capacity
from p2pinfer.engine import EngineError, ModelEntry, Shard
from p2pinfer.engine.shard import MAX_ROWS
from p2pinfer.progress import LoadProgress

log = logging.getLogger("p2pinfer.shards")

ShardKey = tuple[str, int, int]  # (model, start, end)
BUSY_WAIT = 10.0  # seconds a load waits for busy shards to be released before answering "no memory"


@dataclass
class _Held:
    shard: Shard
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class _Row:
    """One session's next position, waiting for the engine in a step that may carry other sessions too."""

    rid: str
    x: np.ndarray
    done: trio.Event = field(default_factory=trio.Event)
    result: object = None  # its output, or the exception it alone raised


def _one_position(shard: Shard, x) -> bool:
    shape = np.shape(x)
    return shape == (1,) if shard.is_first else len(shape) == 2 and shape[0] == 1


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
        self._rows: dict[Shard, list[_Row]] = {}  # decode positions waiting for the engine, per shard
        self.step_rows: Counter[int] = Counter()  # decode steps run, by how many sessions each carried

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
    async def forward(self, shard: Shard, rid: str, x: np.ndarray) -> np.ndarray:
        """shard.forward(rid, x) on the engine. A decode position that finds the engine busy waits with the
        other sessions' positions of `shard`: whichever of them gets the engine first runs them all as one
        step (continuous batching), and each gets what it would have got alone, bit for bit."""
        if not _one_position(shard, x) or (self._engine.value and not self._rows.get(shard)):
            if _one_position(shard, x):
                self.step_rows[1] += 1
            return await self.compute(shard.forward, rid, x)
        row = _Row(rid, x)
        self._rows.setdefault(shard, []).append(row)
        try:
            if await self._engine_or_done(row):
                if row.done.is_set():  # another session's step carried ours meanwhile
                    self._engine.release()
                else:
                    await self._step(shard, self._take(shard, row))
        finally:  # cancelled before any step took it: nobody runs it now
            self._set_waiting(shard, [r for r in self._rows.get(shard, []) if r is not row])
        if not row.done.is_set():
            await row.done.wait()  # (only if our step's caller left: the delivery is already queued)
        if isinstance(row.result, BaseException):
            raise row.result
        return row.result

    async def _engine_or_done(self, row: _Row) -> bool:
        """Wait until we hold the engine (True) or another step has carried `row` (False)."""
        got = False
        try:
            async with trio.open_nursery() as nursery:

                async def take() -> None:
                    nonlocal got
                    await self._engine.acquire()
                    got = True
                    nursery.cancel_scope.cancel()

                async def carried() -> None:
                    await row.done.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(take)
                nursery.start_soon(carried)
        except BaseException:
            if got:
                self._engine.release()
            raise
        return got

    def _take(self, shard: Shard, ours: _Row) -> list[_Row]:
        """Ours and up to MAX_ROWS - 1 others waiting for `shard`, oldest first, out of the waiting list."""
        waiting = self._rows.get(shard, [])
        rows = [ours] + [r for r in waiting if r is not ours][: MAX_ROWS - 1]
        self._set_waiting(shard, [r for r in waiting if r not in rows])
        return rows

    def _set_waiting(self, shard: Shard, rows: list[_Row]) -> None:
        if rows:
            self._rows[shard] = rows
        else:
            self._rows.pop(shard, None)  # no reference left to a shard that may be evicted

    async def _step(self, shard: Shard, rows: list[_Row]) -> None:
        """One decode step for `rows` (the engine is held). Results reach every row from the worker thread,
        so the others get theirs even if this caller is cancelled meanwhile."""
        token = trio.lowlevel.current_trio_token()
        self.step_rows[len(rows)] += 1

        def deliver(results: list) -> None:
            for r, res in zip(rows, results, strict=True):
                r.result = res
                r.done.set()

        def step() -> None:
            try:
                results = shard.forward_rows([(r.rid, r.x) for r in rows])
            except Exception as e:  # our bug, not one session's: every row of the step fails with it
                log.exception("a decode step of %d sessions failed", len(rows))
                results = [EngineError(f"decode step failed: {e!r}") for _ in rows]
            try:
                token.run_sync_soon(deliver, results)
            except trio.RunFinishedError:
                pass

        def put_back() -> None:  # our caller left before the step started: the other rows wait on
            self._set_waiting(shard, [r for r in rows[1:] if not r.done.is_set()] + self._rows.get(shard, []))

        await self._call_holding_engine(step, on_abandoned=put_back)

    async def compute(self, fn: Callable, *args):
        """Run fn(*args) in a worker thread, one call at a time. A cancelled caller returns at once (shutdown
        must not wait seconds for a shard load): the call runs on, and holds the engine until it ends."""
        await self._engine.acquire()
        return await self._call_holding_engine(fn, *args)

    async def _call_holding_engine(self, fn: Callable, *args, on_abandoned: Callable[[], None] | None = None):
        """fn(*args) in a worker thread while we hold the engine, which this gives back. on_abandoned runs if
        the caller was cancelled before fn started (fn then never runs)."""
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
                never_ran = not state["ran"]
            if ours:
                self._engine.release()
            if never_ran and on_abandoned is not None:
                on_abandoned()
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
