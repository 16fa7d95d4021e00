"""Links: bidirectional frame pipes between ring members, over libp2p streams or in-process.

A request's members may include this peer itself; a local link is a pair of memory channels, so the
request code is the same either way. A remote link keeps a task reading the stream at all times:
py-libp2p's yamux resets a stream whose reader has not read for 5 s, so the reader must never wait
for compute.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import numpy as np
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from p2pinfer.net.wire import Frame, FrameError, FrameReader, StreamClosed, encode_frame
from p2pinfer.tasks import open_nursery

log = logging.getLogger("p2pinfer.links")

RING_PROTOCOL = TProtocol("/p2pinfer/ring/1.0.0")
INBOX_FRAMES = 256


class LinkClosed(Exception):
    """The other end is gone (closed, reset, or sent a malformed frame); the message says which."""


class Link:
    peer: str

    async def send(self, header: dict, tensor: np.ndarray | None = None) -> None:
        raise NotImplementedError

    async def recv(self) -> Frame:
        raise NotImplementedError

    async def aclose(self) -> None:
        raise NotImplementedError


class RemoteLink(Link):
    def __init__(self, stream: INetStream, peer: str) -> None:
        self.peer = peer
        self.stream = stream
        self._send_lock = trio.Lock()
        self._tx, self._rx = trio.open_memory_channel[Frame](INBOX_FRAMES)
        self.closed_reason = "closed"

    async def pump(self) -> None:
        """Read frames as they arrive, whatever the consumer is doing."""
        reader = FrameReader(lambda: self.stream.read())
        try:
            while True:
                frame = await reader.read_frame()
                await self._tx.send(frame)
        except StreamClosed:
            self.closed_reason = "closed by peer"
        except FrameError as e:
            self.closed_reason = f"malformed frame: {e}"
            log.warning("dropping link to %s: %s", self.peer, e)
            await self._reset()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception as e:  # reset, EOF mid-read, connection gone: all mean "peer lost"
            self.closed_reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        finally:
            self._tx.close()

    async def _reset(self) -> None:
        with trio.move_on_after(1):
            try:
                await self.stream.reset()
            except Exception:
                pass

    async def send(self, header: dict, tensor: np.ndarray | None = None) -> None:
        data = encode_frame(header, tensor)
        async with self._send_lock:
            try:
                await self.stream.write(data)
            except Exception as e:
                raise LinkClosed(f"send to {self.peer} failed: {type(e).__name__}: {e}") from e

    async def recv(self) -> Frame:
        try:
            return await self._rx.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise LinkClosed(f"link to {self.peer} {self.closed_reason}") from None

    async def aclose(self) -> None:
        with trio.move_on_after(1):
            try:
                await self.stream.close()
            except Exception:
                pass


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

    def __init__(self, host: IHost, self_id: str, handler: Handler, ensure_connected=None) -> None:
        self.host = host
        self.ensure_connected = ensure_connected  # (ID) -> awaitable: dial first if the connection is gone
        self.self_id = self_id
        self.handler = handler
        host.set_stream_handler(RING_PROTOCOL, self._on_stream)

    async def _guarded(self, link: Link) -> None:
        try:
            await self.handler(link)
        except LinkClosed as e:
            log.debug("link from %s ended: %s", link.peer, e)
        except Exception:  # a peer's mistake or our bug must never take the agent down
            log.exception("ring handler failed for a link from %s", link.peer)

    async def _on_stream(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        link = RemoteLink(stream, peer)
        try:
            async with open_nursery() as nursery:
                nursery.start_soon(link.pump)
                await self._guarded(link)
                nursery.cancel_scope.cancel()
        finally:
            await link.aclose()

    async def _new_stream(self, peer: ID, timeout: float) -> INetStream:
        """A ring stream to `peer`; if the connection turns out dead, drop it, redial, try once more."""
        for attempt in (1, 2):
            try:
                with trio.fail_after(timeout):
                    if self.ensure_connected is not None:
                        await self.ensure_connected(peer)
                    return await self.host.new_stream(peer, [RING_PROTOCOL])
            except Exception as e:
                if attempt == 2:
                    raise LinkClosed(f"cannot open a ring stream to {peer}: {type(e).__name__}: {e}") from e
                # py-libp2p can keep a connection that looks open but no longer carries streams
                log.info("ring stream to %s failed (%s: %s); reconnecting", peer, type(e).__name__, e)
                with trio.move_on_after(2):
                    await self.host.get_network().close_peer(peer)
        raise AssertionError("unreachable")

    @asynccontextmanager
    async def open(self, peer: str, connect_timeout: float = 10.0) -> AsyncIterator[Link]:
        if peer == self.self_id:
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
            return
        # Open before entering the nursery, so a failure is a plain LinkClosed, not an exception group.
        stream = await self._new_stream(ID.from_base58(peer), connect_timeout)
        link = RemoteLink(stream, peer)
        async with open_nursery() as nursery:
            nursery.start_soon(link.pump)
            try:
                yield link
            finally:
                await link.aclose()
                nursery.cancel_scope.cancel()
