"""Bulk bytes on request: a small request/response protocol over libp2p streams (knows no models).

One stream carries any number of exchanges, one at a time:

    request:   u32 len | msgpack map                       (len <= MAX_REQUEST)
    response:  u32 len | msgpack map header | header["n"] raw bytes

The requester says the most body bytes it accepts and checks `n` against that before reading, the
server checks a request's length before reading it; a stream that breaks either rule is reset. The
server's handler maps a request to (header, body); whatever it raises becomes {"err": message}, so a
peer's malformed request never takes the server down. Responses are paced by a shared RateLimit
(--upload-limit): tokens flow on the same connections and must not queue behind bulk bytes.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Awaitable, Callable

import msgpack
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from p2pinfer.net.host import end_stream

log = logging.getLogger("p2pinfer.blobs")

MAX_REQUEST = 4096
MAX_HEADER = 4096
_LEN = struct.Struct(">I")

Handler = Callable[[str, dict], Awaitable[tuple[dict, bytes]]]


class BlobError(Exception):
    """The exchange failed: stream broken, limits exceeded, or the server answered with an error."""


class RateLimit:
    """A token bucket in bytes per second, shared by every upload of this peer. `rate` caps it always;
    without one, `busy_rate` caps it while `busy()` says this peer has other work (None: unlimited)."""

    def __init__(self, rate: int | None, burst: int = 1 << 20, busy_rate: int | None = None,
                 busy: Callable[[], bool] | None = None) -> None:  # fmt: skip
        self.rate, self.burst, self.busy_rate, self.busy = rate, burst, busy_rate, busy
        self._tokens, self._at = float(burst), time.monotonic()
        self._lock = trio.Lock()

    def current(self) -> int | None:
        if self.rate:
            return self.rate
        return self.busy_rate if self.busy is not None and self.busy() else None

    async def take(self, n: int) -> None:
        rate = self.current()
        if not rate:
            self._tokens, self._at = float(self.burst), time.monotonic()
            return
        async with self._lock:  # one upload at a time draws on the bucket: FIFO, no starvation
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * rate)
            self._at = now
            self._tokens -= n
            if self._tokens < 0:
                await trio.sleep(-self._tokens / rate)


async def _read_exact(stream: INetStream, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        chunk = await stream.read(max(n - len(buf), 65536))
        if not chunk:
            raise BlobError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def _read_map(stream: INetStream, limit: int, buf: bytearray) -> dict:
    (n,) = _LEN.unpack(await _read_exact(stream, _LEN.size, buf))
    if n > limit:
        raise BlobError(f"message of {n} bytes exceeds {limit}")
    try:
        d = msgpack.unpackb(await _read_exact(stream, n, buf), raw=False)
    except BlobError:
        raise
    except Exception as e:
        raise BlobError(f"undecodable message: {type(e).__name__}") from e
    if not isinstance(d, dict):
        raise BlobError("message is not a map")
    return d


def _pack(d: dict) -> bytes:
    body = msgpack.packb(d, use_bin_type=True)
    return _LEN.pack(len(body)) + body


class Blobs:
    """The protocol on one libp2p host: serve a handler under a protocol id, open clients to peers."""

    def __init__(self, host: IHost) -> None:
        self.host = host

    def serve(self, protocol: str, handler: Handler, limit: RateLimit) -> None:
        serve(self.host, protocol, handler, limit)

    def client(self, peer: str, protocol: str) -> BlobClient:
        return BlobClient(self.host, peer, protocol)


def serve(host: IHost, protocol: str, handler: Handler, limit: RateLimit) -> None:
    async def on_stream(stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        buf = bytearray()
        try:
            while True:
                try:
                    req = await _read_map(stream, MAX_REQUEST, buf)
                except BlobError as e:
                    if "ended after 0 of" not in str(e):
                        log.warning("blob request from %s dropped: %s", peer, e)
                    return
                try:
                    header, body = await handler(peer, req)
                except Exception as e:  # a peer's bad request, or our bug: answer, never die
                    if not isinstance(e, ValueError):
                        log.exception("blob handler failed for %s", peer)
                    header, body = {"err": str(e)[:500]}, b""
                await limit.take(len(body))
                await stream.write(_pack({**header, "n": len(body)}) + body)
        except Exception as e:  # stream reset, connection gone
            log.debug("blob stream from %s ended: %s", peer, e)
        finally:
            await end_stream(stream)

    host.set_stream_handler(TProtocol(protocol), on_stream)


class BlobClient:
    """One stream to `peer`; `request` is one exchange (callers serialise, or open several clients)."""

    def __init__(self, host: IHost, peer: str, protocol: str) -> None:
        self.host, self.peer, self.protocol = host, peer, protocol
        self.stream: INetStream | None = None
        self._buf = bytearray()

    async def __aenter__(self) -> BlobClient:
        try:
            self.stream = await self.host.new_stream(ID.from_base58(self.peer), [TProtocol(self.protocol)])
        except Exception as e:
            raise BlobError(f"cannot open a stream to {self.peer}: {type(e).__name__}: {e}") from e
        return self

    async def __aexit__(self, *exc) -> None:
        if self.stream is not None:
            await end_stream(self.stream, reset=exc[0] is not None)

    async def request(self, req: dict, max_body: int) -> tuple[dict, bytes]:
        assert self.stream is not None
        try:
            await self.stream.write(_pack(req))
            header = await _read_map(self.stream, MAX_HEADER, self._buf)
            n = header.get("n")
            if not isinstance(n, int) or not 0 <= n <= max_body:
                raise BlobError(f"{self.peer} announced {n!r} body bytes (at most {max_body} expected)")
            body = await _read_exact(self.stream, n, self._buf)
        except BlobError:
            raise
        except Exception as e:
            raise BlobError(f"exchange with {self.peer} failed: {type(e).__name__}: {e}") from e
        if "err" in header:
            raise BlobError(f"{self.peer} refused: {header['err']}")
        return header, body
