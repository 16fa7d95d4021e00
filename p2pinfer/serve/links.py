"""Links: bidirectional frame pipes between ring members, to another peer or in-process.

A request's members may include this peer itself; a local link is a pair of memory channels, so the
request code is the same either way. A link to another peer is a framed stream from net/streams.py
(a reader that never waits for compute, one write per frame, "closed by peer" vs "connection
lost"); nothing here knows libp2p.

Streams to other peers are pooled (protocol.py says when a use ends cleanly): `open` takes an idle
stream to that peer before it opens one, and a link its user marked `reusable` goes back to the pool
once the serving side says `idle`. The pool's streams live in `run`'s nursery; without `run` every
link is a fresh stream closed after its block, as before.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import numpy as np
import trio

from p2pinfer.net.streams import INBOX_FRAMES, FramedStream, LinkClosed, Streams
from p2pinfer.net.wire import Frame
from p2pinfer.serve import protocol as P
from p2pinfer.tasks import open_nursery

__all__ = ["RING_PROTOCOL", "Handler", "Link", "LinkClosed", "Linker", "LocalLink"]

log = logging.getLogger("p2pinfer.links")

RING_PROTOCOL = "/p2pinfer/ring/1.0.0"

POOL_PER_PEER = 8  # idle streams kept to one peer (a few concurrent requests' worth)
POOL_IDLE_TTL = 60.0  # seconds an unused stream is kept
PROBE_AFTER = 2.0  # a stream idle longer, to a peer not heard from for as long, is pinged before reuse
PROBE_TIMEOUT = 2.0
IDLE_TIMEOUT = 30.0  # how long a released stream waits for the serving side's `idle` (its request ending there)


class Link(Protocol):
    """What the request code sees of a ring neighbour: a framed stream (net/streams.py) or a LocalLink.
    Every failure of the other end raises LinkClosed."""

    peer: str
    reusable: bool  # set by the user when its use of the link ended cleanly (protocol.py); pooled then

    async def send(self, header: dict, tensor: np.ndarray | None = None) -> None: ...

    async def recv(self) -> Frame: ...

    async def aclose(self) -> None: ...


class LocalLink(Link):
    def __init__(self, peer: str, tx: trio.MemorySendChannel, rx: trio.MemoryReceiveChannel) -> None:
        self.peer = peer
        self.reusable = False  # in-process: nothing to pool
        self._tx, self._rx = tx, rx

    @staticmethod
    def pair(peer: str) -> tuple[LocalLink, LocalLink]:
        a_tx, b_rx = trio.open_memory_channel[Frame](INBOX_FRAMES)
        b_tx, a_rx = trio.open_memory_channel[Frame](INBOX_FRAMES)
        return LocalLink(peer, a_tx, a_rx), LocalLink(peer, b_tx, b_rx)

    async def send(self, header: dict, tensor: np.ndarray | None = None) -> None:
        # copy: the engine may reuse its output buffer for the next step
        frame = Frame(dict(header), None if tensor is None else np.array(tensor, copy=True))
        try:
            await self._tx.send(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            raise LinkClosed(f"local link closed ({type(e).__name__})") from e

    async def recv(self) -> Frame:
        try:
            return await self._rx.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise LinkClosed("local link closed") from None

    async def aclose(self) -> None:
        await self._tx.aclose()


Handler = Callable[[Link], Awaitable[bool | None]]  # True: the use ended cleanly, the stream may be reused


class Linker:
    """Opens links by peer id (pooled streams, see above) and hands incoming ones to `handler`; links to
    ourselves stay in-process."""

    def __init__(self, streams: Streams, self_id: str, handler: Handler | None = None,
                 quiet_for: Callable[[str], float] = lambda peer: float("inf")) -> None:  # fmt: skip
        self.streams = streams
        self.self_id = self_id
        self.quiet_for = quiet_for  # seconds since the peer's last gossip (membership): heard lately, alive
        self.handler: Handler | None = None
        # peer -> [(idle since, stream, used before)], newest last; `prepare` adds unused ones
        self._idle: dict[str, list[tuple[float, FramedStream, bool]]] = {}
        self._pool: trio.Nursery | None = None
        self.opened = self.reused = 0  # streams opened, and taken again from the pool (/metrics)
        if handler is not None:
            self.serve(handler)

    def serve(self, handler: Handler) -> None:
        """Hand incoming ring links (and links to ourselves) to `handler` from now on. A separate step so
        the member that handles links can itself be built with this Linker."""
        self.handler = handler
        self.streams.serve(RING_PROTOCOL, self._guarded)

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep the stream pool: pooled streams' readers run here, unused ones are closed after a while."""
        try:
            async with open_nursery() as nursery:
                self._pool = nursery
                task_status.started()
                while True:
                    await trio.sleep(POOL_IDLE_TTL / 4)
                    await self._expire(trio.current_time() - POOL_IDLE_TTL)
        finally:
            self._pool = None
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self._expire(float("inf"))  # the pool's streams end with it
            self._idle.clear()

    async def _guarded(self, link: Link, reuse: bool = True) -> None:
        """Serve one incoming stream: every use the handler says ended cleanly is answered by `idle` and
        the stream waits for its next use (a `ping` is answered by `idle` too)."""
        try:
            while True:
                clean = await self.handler(link)
                if not (reuse and clean):
                    return
                await link.send({"t": P.IDLE})
        except LinkClosed as e:
            log.debug("link from %s ended: %s", link.peer, e)
        except Exception:  # a peer's mistake or our bug must never take the agent down
            log.exception("ring handler failed for a link from %s", link.peer)

    @asynccontextmanager
    async def open(self, peer: str, connect_timeout: float = 10.0) -> AsyncIterator[Link]:
        if peer == self.self_id:
            async with self._open_local(peer) as link:
                yield link
            return
        if self._pool is None:  # no pool running: a stream for this block alone
            async with self.streams.open(peer, RING_PROTOCOL, connect_timeout) as link:
                self.opened += 1
                yield link
            return
        link = await self._take(peer) or await self._connect(peer, connect_timeout)
        link.reusable = False
        try:
            yield link
        finally:
            if link.reusable and not link.ended and self._pool is not None:
                self._pool.start_soon(self._await_idle, link)
            else:
                with trio.CancelScope(shield=True):
                    await link.aclose()

    async def prepare(self, peers: list[str], connect_timeout: float = 10.0) -> dict[str, LinkClosed]:
        """Have an idle stream ready to each of `peers` (opened side by side), so that opening their links
        one after another costs no open each. Returns the peers no stream could be opened to, and why."""
        wanted: dict[str, int] = {}
        for p in peers:
            if p != self.self_id:
                wanted[p] = wanted.get(p, 0) + 1
        failed: dict[str, LinkClosed] = {}
        if self._pool is None or not wanted:
            return failed

        async def ready(peer: str, n: int) -> None:
            got = []  # taken (pinged if they idled a while: side by side here, not one by one in `open`)
            for _ in range(n):
                taken = await self._take(peer, count=False)  # counted when `open` takes it
                if taken is not None:
                    got.append((taken, True))
                    continue
                try:
                    got.append((await self._connect(peer, connect_timeout), False))
                except LinkClosed as e:
                    failed[peer] = e
                    break
            idle = self._idle.setdefault(peer, [])
            for link, used in got:
                idle.append((trio.current_time(), link, used))

        async with open_nursery() as nursery:
            for peer, n in wanted.items():
                nursery.start_soon(ready, peer, n)
        return failed

    @asynccontextmanager
    async def _open_local(self, peer: str) -> AsyncIterator[Link]:
        mine, theirs = LocalLink.pair(peer)

        async def run_local() -> None:
            try:
                await self._guarded(theirs, reuse=False)
            finally:
                await theirs.aclose()

        async with open_nursery() as nursery:
            nursery.start_soon(run_local)
            try:
                yield mine
            finally:
                await mine.aclose()

    async def _connect(self, peer: str, timeout: float) -> FramedStream:
        link = await self.streams.connect(peer, RING_PROTOCOL, timeout, self._pool)
        self.opened += 1
        return link

    async def _take(self, peer: str, count: bool = True) -> FramedStream | None:
        """The newest idle stream to `peer` that still works (probed if it idled a while), else None. An
        entry leaves the pool before any wait, so no two callers get the same stream."""
        while idle := self._idle.get(peer):
            since, link, used = idle.pop()
            used = used and count
            if link.ended:
                await self._close(link)
                continue
            if min(trio.current_time() - since, self.quiet_for(peer)) < PROBE_AFTER:
                self.reused += used
                return link
            with trio.move_on_after(PROBE_TIMEOUT):
                try:
                    await link.send({"t": P.PING})
                    if (await link.recv()).header.get("t") == P.IDLE:
                        self.reused += used
                        return link
                except LinkClosed:
                    pass
            await self._close(link)
        return None

    async def _await_idle(self, link: FramedStream) -> None:
        """A released stream goes back to the pool once the serving side says `idle`; anything before
        that (a late error of the finished request) is dropped with it."""
        with trio.move_on_after(IDLE_TIMEOUT):
            try:
                while (await link.recv()).header.get("t") != P.IDLE:
                    pass
                idle = self._idle.setdefault(link.peer, [])
                if len(idle) < POOL_PER_PEER:
                    idle.append((trio.current_time(), link, True))
                    return
            except LinkClosed:
                pass
        await self._close(link)

    async def _expire(self, before: float) -> None:
        expired = []
        for idle in self._idle.values():  # taken out of the pool first, closed after: no wait in between
            expired += [link for since, link, _ in idle if since < before or link.ended]
            idle[:] = [x for x in idle if x[0] >= before and not x[1].ended]
        for link in expired:
            await self._close(link)

    @staticmethod
    async def _close(link: FramedStream) -> None:
        with trio.CancelScope(shield=True):
            await link.aclose()
