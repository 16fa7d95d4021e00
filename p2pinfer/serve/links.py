"""Links: bidirectional frame pipes between ring members, over libp2p streams or in-process.

A request's members may include this peer itself; a local link is a pair of memory channels, so the
request code is the same either way. A remote link keeps a task reading the stream at all times:
py-libp2p 0.8.1's yamux writer fails a write that waits 5 s for window credit (net/tuning.py makes
that 60 s), and credit comes only from reading, so the reader must never wait for compute.

How links end, as py-libp2p reports it: a peer closing its stream and a connection going away both
surface as StreamEOF (at the end that closed the connection, every stream on it reads EOF). Links
tell them apart ("closed by peer", "connection lost") and never close a connection themselves
(tests/test_link_reconnect.py: closing one to recover from a failed open ended every other ring
stream on it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import numpy as np
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from p2pinfer.net.host import connection_dying, drop_dying_connections
from p2pinfer.net.wire import Frame, FrameError, FrameReader, StreamClosed, encode_frame
from p2pinfer.tasks import open_nursery

log = logging.getLogger("p2pinfer.links")

RING_PROTOCOL = TProtocol("/p2pinfer/ring/1.0.0")
INBOX_FRAMES = 256
OPEN_TRIES = 3


def _transport_broke(e: BaseException) -> bool:
    """True when an error from a stream was caused by its connection's socket failing."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, (ConnectionClosedError, RawConnError, OSError)):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


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

    def _connection_lost(self) -> bool:
        swarm_conn = getattr(self.stream, "swarm_conn", None)
        return swarm_conn is not None and connection_dying(swarm_conn)

    async def _read(self) -> bytes:
        # py-libp2p ends a stream with StreamEOF, whether the peer closed it (FIN) or the connection
        # under it is gone (then the closing end's readers see EOF too, not a reset); only the first
        # is a clean end, so only it becomes b"" (FrameReader: "closed" between frames, an error inside).
        try:
            return await self.stream.read()
        except StreamEOF:
            if self._connection_lost():
                raise
            return b""

    async def pump(self) -> None:
        """Read frames as they arrive, whatever the consumer is doing."""
        reader = FrameReader(self._read)
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
        except Exception as e:  # reset, connection gone: "peer lost", saying which
            what = "connection lost" if self._connection_lost() else type(e).__name__
            self.closed_reason = f"{what} ({type(e).__name__}: {e})" if str(e) else what
        finally:
            self._tx.close()

    async def _reset(self) -> None:
        with trio.move_on_after(1):
            try:
                await self.stream.reset()
            except Exception:
                pass

    async def send(self, header: dict, tensor: np.ndarray | None = None) -> None:
        data = encode_frame(header, tensor)  # header and tensor in one write: one yamux frame
        try:  # a free lock need not yield (the write does)
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            await self.stream.write(data)
        except Exception as e:
            what = "connection lost: " if self._connection_lost() or _transport_broke(e) else ""
            raise LinkClosed(f"send to {self.peer} failed: {what}{type(e).__name__}: {e}") from e
        finally:
            self._send_lock.release()

    async def recv(self) -> Frame:
        try:
            try:  # a frame already here is taken without a pass through the scheduler
                return self._rx.receive_nowait()
            except trio.WouldBlock:
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
        """A ring stream to `peer` within `timeout`, tried up to OPEN_TRIES times. Between tries,
        connections to it that are closing (py-libp2p lists them a moment longer: `SwarmException:
        Failed to create stream`, "No valid connections", or the stream's protocol negotiation cut
        off) are dropped, so the next try dials afresh.

        A healthy connection is never closed here: it carries the other requests' ring streams, and
        closing it ended every one of them (StreamEOF at this end, reset at the other), whose members
        then reconnected too, closing theirs: one slow open under load became a cascade. A peer too
        slow to open a stream within `timeout` is reported as such; the entry replays without it."""
        with trio.move_on_after(timeout):
            for attempt in range(1, OPEN_TRIES + 1):
                try:
                    if self.ensure_connected is not None:
                        await self.ensure_connected(peer)
                    return await self.host.new_stream(peer, [RING_PROTOCOL])
                except Exception as e:
                    if attempt == OPEN_TRIES:
                        raise LinkClosed(
                            f"cannot open a ring stream to {peer}: {type(e).__name__}: {e}"
                        ) from e
                    # a connection closed by the peer is marked closing only once its GO_AWAY is read
                    await trio.sleep(0.05 * attempt)
                    dropped = await drop_dying_connections(self.host, peer)
                    log.info("ring stream to %s failed (%s: %s)%s", peer, type(e).__name__, e,
                             f"; dropped {dropped} closing connection(s)" if dropped else "")  # fmt: skip
        raise LinkClosed(f"no ring stream to {peer} within {timeout:g} s")

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
