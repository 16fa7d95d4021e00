"""Framed streams: serve a protocol, open one to a peer by id, send and receive frames (net/wire.py).

    streams = Streams(keeper)
    streams.serve("/p2pinfer/ring/1.0.0", handler)       # handler(stream) for every incoming one
    async with streams.open(peer_id, protocol, timeout) as stream:
        await stream.send(header, tensor); frame = await stream.recv()
    stream = await streams.connect(peer_id, protocol, timeout, nursery)  # outlives a block (a pool's)

Peer ids are base58 strings. Every failure the other side causes surfaces as LinkClosed, whose
message says which: "closed by peer", "connection lost", a malformed frame, an open that failed or
timed out.

A framed stream keeps a task reading at all times: py-libp2p 0.8.1's yamux writer fails a write that
waits 5 s for window credit (net/tuning.py makes that 60 s), and credit comes only from reading, so
the reader must never wait for the consumer. Each frame goes out in one write (one yamux frame);
writes are serialised by a lock.

How streams end, as py-libp2p reports it: a peer closing its stream and a connection going away
both surface as StreamEOF (at the end that closed the connection, every stream on it reads EOF).
They are told apart ("closed by peer", "connection lost"), and a stream never closes its connection
(tests/test_link_reconnect.py: closing one to recover from a failed open ended every other ring
stream on it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import numpy as np
import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.network.connection.exceptions import RawConnError
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.id import ID

from p2pinfer.net.host import end_stream
from p2pinfer.net.keeper import Keeper, connection_dying
from p2pinfer.net.wire import Frame, FrameError, FrameReader, StreamClosed, encode_frame
from p2pinfer.tasks import open_nursery

log = logging.getLogger("p2pinfer.links")

INBOX_FRAMES = 256
OPEN_TRIES = 3


# Bytes this process moved over framed streams (ring links), for /metrics; frames included, not yamux/Noise.
TRAFFIC = {"sent": 0, "received": 0}


class LinkClosed(Exception):
    """The other end is gone (closed, reset, or sent a malformed frame); the message says which."""


def _transport_broke(e: BaseException) -> bool:
    """True when an error from a stream was caused by its connection's socket failing."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, (ConnectionClosedError, RawConnError, OSError)):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _name(protocol: str) -> str:
    """The short name of a protocol id, for messages: /p2pinfer/ring/1.0.0 -> ring."""
    parts = protocol.strip("/").split("/")
    return parts[-2] if len(parts) >= 2 else protocol


class FramedStream:
    """One libp2p stream carrying frames; `pump` must run while it is in use (Streams sees to it)."""

    def __init__(self, stream: INetStream, peer: str) -> None:
        self.peer = peer
        self.stream = stream
        self._send_lock = trio.Lock()
        self._tx, self._rx = trio.open_memory_channel[Frame](INBOX_FRAMES)
        self.closed_reason = "closed"
        self.ended = False  # the pump has stopped: nothing more will be received
        self.reusable = False  # its user's last use ended cleanly (a pool may keep it: serve/links.py)
        self._pump_scope = trio.CancelScope()

    def _connection_lost(self) -> bool:
        swarm_conn = getattr(self.stream, "swarm_conn", None)
        return swarm_conn is not None and connection_dying(swarm_conn)

    async def _read(self) -> bytes:
        # py-libp2p ends a stream with StreamEOF, whether the peer closed it (FIN) or the connection
        # under it is gone (then the closing end's readers see EOF too, not a reset); only the first
        # is a clean end, so only it becomes b"" (FrameReader: "closed" between frames, an error inside).
        try:
            data = await self.stream.read()
            TRAFFIC["received"] += len(data)
            return data
        except StreamEOF:
            if self._connection_lost():
                raise
            return b""

    async def pump(self) -> None:
        """Read frames as they arrive, whatever the consumer is doing."""
        reader = FrameReader(self._read)
        try:
            with self._pump_scope:
                while True:
                    frame = await reader.read_frame()
                    frame.at = time.perf_counter()
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
            self.ended = True
            self._tx.close()

    async def _reset(self) -> None:
        await end_stream(self.stream, reset=True)

    async def send(self, header: dict, tensor: np.ndarray | None = None) -> None:
        data = encode_frame(header, tensor)  # header and tensor in one write: one yamux frame
        try:  # a free lock need not yield (the write does)
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            await self.stream.write(data)
            TRAFFIC["sent"] += len(data)
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
        self._pump_scope.cancel()
        await end_stream(self.stream)


Handler = Callable[[FramedStream], Awaitable[None]]


class Streams:
    """Framed streams over the keeper's host; opens dial through the keeper first."""

    def __init__(self, keeper: Keeper) -> None:
        self.keeper = keeper
        self.host = keeper.host

    def serve(self, protocol: str, handler: Handler) -> None:
        """Call `handler` with every incoming stream of `protocol` (its pump running); the stream is
        closed when the handler returns. The handler must not raise: log and return instead."""

        async def on_stream(stream: INetStream) -> None:
            framed = FramedStream(stream, str(stream.muxed_conn.peer_id))
            try:
                async with open_nursery() as nursery:
                    nursery.start_soon(framed.pump)
                    await handler(framed)
                    nursery.cancel_scope.cancel()
            finally:
                await framed.aclose()

        self.host.set_stream_handler(TProtocol(protocol), on_stream)

    @asynccontextmanager
    async def open(self, peer: str, protocol: str, timeout: float = 10.0) -> AsyncIterator[FramedStream]:
        """A framed stream of `protocol` to `peer`, opened within `timeout` (else LinkClosed), closed on exit."""
        # Open before entering the nursery, so a failure is a plain LinkClosed, not an exception group.
        stream = await self._new_stream(ID.from_base58(peer), TProtocol(protocol), timeout)
        framed = FramedStream(stream, peer)
        async with open_nursery() as nursery:
            nursery.start_soon(framed.pump)
            try:
                yield framed
            finally:
                await framed.aclose()
                nursery.cancel_scope.cancel()

    async def connect(self, peer: str, protocol: str, timeout: float, nursery: trio.Nursery) -> FramedStream:
        """A framed stream of `protocol` to `peer` whose pump runs in `nursery`: it lives until its
        aclose() (or the peer ends it), not for one block. For a pool of streams (serve/links.py)."""
        stream = await self._new_stream(ID.from_base58(peer), TProtocol(protocol), timeout)
        framed = FramedStream(stream, peer)
        nursery.start_soon(framed.pump)
        return framed

    async def _new_stream(self, peer: ID, protocol: TProtocol, timeout: float) -> INetStream:
        """A stream to `peer` within `timeout`, tried up to OPEN_TRIES times. Between tries, connections
        to it that are closing (py-libp2p lists them a moment longer: `SwarmException: Failed to
        create stream`, "No valid connections", or the stream's protocol negotiation cut off) are
        dropped, so the next try dials afresh.

        A healthy connection is never closed here: it carries the other requests' ring streams, and
        closing it ended every one of them (StreamEOF at this end, reset at the other), whose members
        then reconnected too, closing theirs: one slow open under load became a cascade. A peer too
        slow to open a stream within `timeout` is reported as such; the entry replays without it."""
        name = _name(protocol)
        with trio.move_on_after(timeout):
            for attempt in range(1, OPEN_TRIES + 1):
                try:
                    await self.keeper.ensure_connected(peer)
                    return await self.host.new_stream(peer, [protocol])
                except Exception as e:
                    if attempt == OPEN_TRIES:
                        raise LinkClosed(
                            f"cannot open a {name} stream to {peer}: {type(e).__name__}: {e}"
                        ) from e
                    # a connection closed by the peer is marked closing only once its GO_AWAY is read
                    await trio.sleep(0.05 * attempt)
                    dropped = await self.keeper.drop_dying(peer)
                    log.info("%s stream to %s failed (%s: %s)%s", name, peer, type(e).__name__, e,
                             f"; dropped {dropped} closing connection(s)" if dropped else "")  # fmt: skip
        raise LinkClosed(f"no {name} stream to {peer} within {timeout:g} s")
