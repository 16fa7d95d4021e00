"""Links: bidirectional frame pipes between ring members, to another peer or in-process.

A request's members may include this peer itself; a local link is a pair of memory channels, so the
request code is the same either way. A link to another peer is a framed stream from net/streams.py
(a reader that never waits for compute, one write per frame, "closed by peer" vs "connection
lost"); nothing here knows libp2p.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Protocol

import numpy as np
import trio

from p2pinfer.net.streams import INBOX_FRAMES, LinkClosed, Streams
from p2pinfer.net.wire import Frame
from p2pinfer.tasks import open_nursery

__all__ = ["RING_PROTOCOL", "Handler", "Link", "LinkClosed", "Linker", "LocalLink"]

log = logging.getLogger("p2pinfer.links")

RING_PROTOCOL = "/p2pinfer/ring/1.0.0"


class Link(Protocol):
    """What the request code sees of a ring neighbour: a framed stream (net/streams.py) or a LocalLink.
    Every failure of the other end raises LinkClosed."""

    peer: str

    async def send(self, header: dict, tensor: np.ndarray | None = None) -> None: ...

    async def recv(self) -> Frame: ...

    async def aclose(self) -> None: ...


class LocalLink(Link):
    def __init__(self, peer: str, tx: trio.MemorySendChannel, rx: trio.MemoryReceiveChannel) -> None:
        self.peer = peer
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


Handler = Callable[[Link], Awaitable[None]]


class Linker:
    """Opens links by peer id and hands incoming ones to `handler`; links to ourselves stay in-process."""

    def __init__(self, streams: Streams, self_id: str, handler: Handler | None = None) -> None:
        self.streams = streams
        self.self_id = self_id
        self.handler: Handler | None = None
        if handler is not None:
            self.serve(handler)

    def serve(self, handler: Handler) -> None:
        """Hand incoming ring links (and links to ourselves) to `handler` from now on. A separate step so
        the member that handles links can itself be built with this Linker."""
        self.handler = handler
        self.streams.serve(RING_PROTOCOL, self._guarded)

    async def _guarded(self, link: Link) -> None:
        try:
            await self.handler(link)
        except LinkClosed as e:
            log.debug("link from %s ended: %s", link.peer, e)
        except Exception:  # a peer's mistake or our bug must never take the agent down
            log.exception("ring handler failed for a link from %s", link.peer)

    @asynccontextmanager
    async def open(self, peer: str, connect_timeout: float = 10.0) -> AsyncIterator[Link]:
        if peer != self.self_id:
            async with self.streams.open(peer, RING_PROTOCOL, connect_timeout) as link:
                yield link
            return
        mine, theirs = LocalLink.pair(peer)

        async def run_local() -> None:
            try:
                await self._guarded(theirs)
            finally:
                await theirs.aclose()

        async with open_nursery() as nursery:
            nursery.start_soon(run_local)
            try:
                yield mine
            finally:
                await mine.aclose()
