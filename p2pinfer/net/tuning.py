"""Every py-libp2p performance adjustment we make, in one place, for the version it was written for.

py-libp2p 0.8.1 moves bulk data over Noise + yamux at ~0.4x of trio TCP with ChaCha20-Poly1305 and
adds several times its round trip (benchmarks/link.py measures both). The adjustments below change
how this process reads, writes and acknowledges, never what goes on the wire: a peer without them
(another py-libp2p, go-libp2p) sees valid yamux frames inside valid Noise messages, only cut and
acknowledged differently (tests/test_net_tuning.py runs both directions against an unpatched peer).
Measured with them (benchmarks/link.py, two runs at load average ~1 on the shared 2-core box; stock
in brackets): bulk 0.49-1.12x of the baseline (0.17-0.35x), 8 KiB round trip 1.65-1.74x (3.5-5.1x),
a ring frame's hop 0.07-0.08 ms slower than over the baseline (0.27-0.38 ms), 1.00 socket write per
ring frame sent (2.00).

1. One yamux frame per Noise message. yamux cuts writes into 64 KiB frames (12-byte header
   included); Noise carries at most 65,519 plaintext bytes per message, so every full frame became
   two Noise messages (two encryptions, two length prefixes, a 17-byte tail). We cut frames at
   65,519 bytes, header included.
2. Window updates at half the window, not after every read, and a window big enough for that.
   0.8.1 sends a WINDOW_UPDATE back after nearly every read (RELEASE_ON_READ, and a "partial slack"
   branch that credits delta + bytes_read, i.e. twice what was read, whatever that setting), so a
   ring frame cost an extra encrypted write here and an extra frame to decode there: 2 socket
   writes per frame sent (benchmarks/link.py, writes/frame). Like go-yamux, we credit the sender once
   the reader has consumed half the target window, and keep 0.8.1's auto-tuning (doubling the target
   when updates come within 4 RTTs). A stream's target starts at RECV_WINDOW, not 256 KiB, so the
   first read's update carries that credit (yamux peers honour any credit; go-yamux grows its
   windows the same way) and half-window credit does not become stop-and-wait between processes.
3. Buffered Noise reads. 0.8.1 reads a Noise message with one receive for its 2-byte length and
   at least one more for its body. We receive up to 256 KiB at a time into a buffer kept on the
   raw connection (not on the reader object: the handshake and transport phases use different
   reader objects over one connection, and bytes read ahead in one phase belong to the next).
4. Writers woken by window updates, and patient. 0.8.1's writer, once its send window is spent, polls
   every 10 ms for credit and fails the write after 5 s without it (the stream is then reset at this
   end). Ours wakes on the update itself and waits up to WINDOW_WAIT_TIMEOUT (a receiver that is
   merely slow slows the ring; tests/test_link_stall.py), while a stream or connection that closes
   meanwhile still ends the wait. A write's chunks are also kept together (one writer at a time).
5. Reads that take what is buffered in one piece. 0.8.1's read() (no size) copies the stream's
   buffer out in 64 KiB slices and appends each to a bytes object (quadratic: with a few MiB
   buffered, reading them cost ~13 ms per call and bulk fell to a few MB/s) and runs the window
   bookkeeping once per slice; ours copies once and does the bookkeeping once. What arrived before
   the peer ended the connection is still delivered: 0.8.1 discarded it (readers saw EOF), so a
   peer's last frames before it closed could vanish; readers now get DRAIN_TIMEOUT to take them.
6. Fewer copies of each frame. A yamux frame arriving in one Noise message was copied about seven
   times on its way to the stream buffer (the session's BytesIO buffer, memoryview slices, and
   read_exactly's bytearray and its bytes() of it); ours slices each decrypted message once.
7. No log formatting on the hot path, and no scheduler pass a frame write does not need. yamux's
   `_write_frame` and Noise's `read_msg` build f-string debug messages (and decode the yamux header
   just to name its flags) on every frame, whether or not DEBUG is on; ours do that only when DEBUG
   is enabled for their loggers. `_write_frame` also took its lock and then yielded once more after
   the socket write; ours does not yield again.
8. Free locks taken without a pass through trio's run loop. A trio.Lock yields to the scheduler even
   when it is free, and a ring frame crossed about ten of them (the TCP stream's read and write
   locks, the stream's state lock on each read and write, yamux's session and write locks); the
   I/O each guards yields anyway. Ours yield only when they have to wait.

`apply()` is idempotent, patches nothing on any other py-libp2p version (it logs why), and is called
by `net.host.build_host` unless P2PINFER_LIBP2P_TUNING=0 (the escape hatch, and how the tests run
an unpatched peer).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import struct

log = logging.getLogger("p2pinfer.net")

WRITTEN_FOR = "0.8.1"
RECV_CHUNK = 256 * 1024
RECV_WINDOW = 4 * 1024 * 1024  # per stream; yamux allows 16 MiB
DRAIN_TIMEOUT = 0.25  # for readers to take what arrived before a connection ended
WINDOW_WAIT_TIMEOUT = 60.0  # as long as 0.8.1 waits for the body of a DATA frame it was promised
_applied = False


def installed_version() -> str:
    return importlib.metadata.version("libp2p")


def enabled_by_env() -> bool:
    return os.environ.get("P2PINFER_LIBP2P_TUNING", "1").strip().lower() not in ("0", "false", "no", "off")


def is_applied() -> bool:
    return _applied


def apply() -> bool:
    """Install the adjustments in this process; True if they are in place."""
    global _applied
    if _applied:
        return True
    if not enabled_by_env():
        log.info("py-libp2p tuning off (P2PINFER_LIBP2P_TUNING=0)")
        return False
    version = installed_version()
    if version != WRITTEN_FOR:
        log.warning("py-libp2p %s installed; tuning written for %s left off", version, WRITTEN_FOR)
        return False
    _frame_fits_noise_message()
    _window_updates_at_half_window()
    _buffered_noise_reads()
    _quiet_yamux_writes()
    _window_waits_on_an_event()
    _reads_in_one_piece()
    _fewer_copies_per_frame()
    _free_locks_do_not_yield()
    _applied = True
    return True


def _frame_fits_noise_message() -> None:
    from libp2p.security.noise import io as noise_io
    from libp2p.stream_muxer.yamux import yamux

    # yamux.write cuts at MAX_MESSAGE_SIZE - HEADER_SIZE payload bytes (module global, read per call)
    yamux.MAX_MESSAGE_SIZE = noise_io.MAX_PLAINTEXT_LENGTH


def _window_updates_at_half_window() -> None:
    from libp2p.stream_muxer.yamux import yamux

    yamux._yamux_release_on_read = lambda: False
    original_init = yamux.YamuxStream.__init__

    def __init__(self, *args, **kwargs) -> None:
        original_init(self, *args, **kwargs)
        self.target_recv_window = RECV_WINDOW

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        """go-yamux's sendWindowUpdate: credit what the reader consumed once it is half the target."""
        buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
        delta = self.target_recv_window - (self.recv_window + buffered)
        if delta < self.target_recv_window // 2:
            return
        self.recv_window += delta  # no await since reading the fields: nothing else ran in between
        delta += self._apply_autotune_epoch(buffered)
        await self.send_window_update(delta)

    yamux.YamuxStream.__init__ = __init__
    yamux.YamuxStream._auto_tune_and_send_window_update = _auto_tune_and_send_window_update


def _buffered_noise_reads() -> None:
    from libp2p.io.exceptions import IncompleteReadError
    from libp2p.security.noise import io as noise_io

    size_len = noise_io.SIZE_NOISE_MESSAGE_LEN

    async def read_msg(self) -> bytes:
        """One length-prefixed Noise message, from a read-ahead buffer on the raw connection."""
        raw = self.read_write_closer
        buf: bytearray | None = getattr(raw, "_p2pinfer_rbuf", None)
        if buf is None:
            buf = raw._p2pinfer_rbuf = bytearray()
        need = size_len
        while True:
            if len(buf) >= size_len:
                need = size_len + int.from_bytes(buf[:size_len], "big")
                if len(buf) >= need:
                    msg = bytes(buf[size_len:need])
                    del buf[:need]
                    return msg
            chunk = await raw.read(max(RECV_CHUNK, need - len(buf)))
            if not chunk:
                got = len(buf)
                # as 0.8.1's read_exactly: received_bytes 0 means a clean close between messages
                raise IncompleteReadError(
                    f"Connection closed during read operation: expected {need} bytes but received {got} bytes",
                    expected_bytes=need,
                    received_bytes=got,
                )
            buf += chunk

    async def noise_read_msg(self, prefix_encoded: bool = False) -> bytes:
        encrypted = await self.read_writer.read_msg()
        if prefix_encoded:
            encrypted = encrypted[len(self.prefix) :]
        return self.decrypt(encrypted)

    noise_io.NoisePacketReadWriter.read_msg = read_msg
    noise_io.BaseNoiseMsgReadWriter.read_msg = noise_read_msg


def _quiet_yamux_writes() -> None:
    import trio
    from libp2p.stream_muxer.yamux import yamux

    original = yamux.Yamux._write_frame  # decodes each header only to log it

    async def _write_frame(self, data: bytes) -> None:
        if yamux.logger.isEnabledFor(logging.DEBUG):
            return await original(self, data)
        # The socket write below yields to the scheduler anyway; a free lock need not do so too
        # (nor the extra checkpoint after the write: each costs a pass through trio's run loop).
        lock = self._write_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await self.secured_conn.write(data)
        finally:
            lock.release()

    yamux.Yamux._write_frame = _write_frame


def _window_waits_on_an_event() -> None:
    import trio
    from libp2p.stream_muxer.exceptions import MuxedStreamError
    from libp2p.stream_muxer.yamux import yamux

    header = struct.Struct(yamux.YAMUX_HEADER_FORMAT)

    def get_window(self) -> int:
        return self.__dict__["_p2p_send_window"]

    def set_window(self, value: int) -> None:
        self.__dict__["_p2p_send_window"] = value
        event = self.__dict__.get("_p2p_window_event")
        if event is not None and value > 0:
            event.set()

    async def wait_for_window(self) -> None:
        deadline = trio.current_time() + WINDOW_WAIT_TIMEOUT
        while self.send_window <= 0 and not (self.closed or self.send_closed):
            if self.conn.event_shutting_down.is_set():
                raise MuxedStreamError("Connection is shutting down")
            left = deadline - trio.current_time()
            if left <= 0:
                raise MuxedStreamError(
                    f"Timed out waiting for window update after {WINDOW_WAIT_TIMEOUT:g} seconds."
                )
            event = self.__dict__["_p2p_window_event"] = trio.Event()
            with trio.move_on_after(min(0.5, left)):  # closing sets no window: look again now and then
                await event.wait()

    async def write(self, data: bytes) -> None:
        if self.send_closed:
            raise MuxedStreamError("Stream is closed for sending")
        lock = self.__dict__.get("_p2p_write_lock")
        if lock is None:
            lock = self.__dict__["_p2p_write_lock"] = trio.Lock()
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            total, sent = len(data), 0
            while sent < total:
                if self.send_closed:
                    raise MuxedStreamError("Stream is closed for sending")
                if self.closed:
                    raise MuxedStreamError("Stream is closed")
                window = self.send_window
                if window <= 0:
                    await wait_for_window(self)
                    continue
                n = min(window, yamux.MAX_MESSAGE_SIZE - yamux.HEADER_SIZE, total - sent)
                self.send_window = window - n  # no await between reading and spending the window
                frame = header.pack(0, yamux.TYPE_DATA, 0, self.stream_id, n) + data[sent : sent + n]
                await self.conn._write_frame(frame)
                sent += n
        finally:
            lock.release()

    yamux.YamuxStream.send_window = property(get_window, set_window)
    yamux.YamuxStream.write = write


def _reads_in_one_piece() -> None:
    import trio
    from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamReset
    from libp2p.stream_muxer.yamux import yamux

    original = yamux.YamuxStream.read

    async def read(self, n: int | None = -1) -> bytes:
        """0.8.1's read(-1), less its per-64 KiB slicing, and data that arrived is read even when
        the connection is going down (0.8.1 raised EOF over it): same states, errors and credit."""
        if n is not None and n != -1:
            return await original(self, n)
        conn, sid = self.conn, self.stream_id
        while True:
            buffer = conn.stream_buffers.get(sid)
            if buffer is None:
                if self.reset_received:
                    raise MuxedStreamReset("Stream was reset")
                raise MuxedStreamEOF(
                    "Stream buffer closed" if not self.recv_closed else "Stream is closed for receiving"
                )
            if buffer:
                data = bytes(buffer)
                buffer.clear()
                if not conn.event_shutting_down.is_set():
                    await self._auto_tune_and_send_window_update(bytes_read=len(data))
                if self.closed and not buffer:
                    await conn._finalize_stream(self, fully_closed=True)
                return data
            if self.reset_received:
                raise MuxedStreamReset("Stream was reset")
            if self.recv_closed:
                raise MuxedStreamEOF("Stream is closed for receiving")
            if conn.event_shutting_down.is_set():
                raise MuxedStreamEOF("Connection shut down")
            try:
                await conn.stream_events[sid].wait()
                conn.stream_events[sid] = trio.Event()
            except KeyError:
                raise MuxedStreamEOF("Stream was removed during read") from None

    original_cleanup = yamux.Yamux._cleanup_on_error

    async def _cleanup_on_error(self) -> None:
        """0.8.1 drops every stream's unread data when the peer ends the connection: a frame sent
        just before a peer closed (its last token, its DONE) was lost if the reader had not run in
        between. Readers get DRAIN_TIMEOUT to take what arrived first."""
        for event in list(self.stream_events.values()):
            event.set()
        with trio.move_on_after(DRAIN_TIMEOUT):
            while any(self.stream_buffers.values()):
                await trio.sleep(0.001)
        await original_cleanup(self)

    yamux.Yamux._cleanup_on_error = _cleanup_on_error
    yamux.YamuxStream.read = read


def _fewer_copies_per_frame() -> None:
    from libp2p.io.exceptions import ConnectionClosedError, IncompleteReadError
    from libp2p.security.secure_session import SecureSession
    from libp2p.stream_muxer.yamux import yamux

    async def read(self, n: int | None = None) -> bytes:
        """0.8.1's SecureSession.read: n=None gives what one message (or the rest of one) holds,
        else exactly n bytes unless the connection ends first; the rest of a message is kept."""
        if n == 0:
            return b""
        pending, offset = self.__dict__.get("_p2p_pending", b""), self.__dict__.get("_p2p_offset", 0)
        if n is None:
            if pending:
                self._p2p_pending = b""
                return pending[offset:] if offset else pending
            msg = await self.conn.read_msg()
            if msg == b"":
                raise ConnectionClosedError("Connection closed")
            return msg
        parts, need = [], n
        while need > 0:
            if not pending:
                msg = await self.conn.read_msg()
                if msg == b"":
                    if parts:
                        return b"".join(parts)
                    raise ConnectionClosedError("Connection closed")
                pending, offset = msg, 0
            available = len(pending) - offset
            if available <= need:
                parts.append(pending[offset:] if offset else pending)
                pending, offset = b"", 0
                need -= available
            else:
                parts.append(pending[offset : offset + need])
                offset += need
                need = 0
        self._p2p_pending, self._p2p_offset = pending, offset
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_exactly(reader, n: int, retry_count: int = 100) -> bytes:
        """0.8.1's read_exactly, without copying a read that is already complete."""
        data = await reader.read(n)
        if len(data) == n:
            return data
        buffer = bytearray(data)
        for _ in range(retry_count):
            if len(buffer) >= n:
                return bytes(buffer)
            buffer.extend(await reader.read(n - len(buffer)))
        if len(buffer) >= n:
            return bytes(buffer)
        raise IncompleteReadError(
            f"Connection closed during read operation: expected {n} bytes but received {len(buffer)} bytes",
            expected_bytes=n,
            received_bytes=len(buffer),
        )

    original_body = yamux.Yamux._read_data_body

    async def _read_data_body(self, length: int) -> bytes:
        """A DATA frame's body; when it is already decrypted here (it came in the header's Noise
        message), without 0.8.1's 60 s cancel scope, which nothing could trip."""
        session = self.secured_conn
        pending = session.__dict__.get("_p2p_pending", b"")
        if len(pending) - session.__dict__.get("_p2p_offset", 0) >= length:
            return await read_exactly(session, length)
        return await original_body(self, length)

    SecureSession.read = read
    yamux.read_exactly = read_exactly  # yamux's own name for it (headers and DATA bodies)
    yamux.Yamux._read_data_body = _read_data_body


class _NoYieldLock:
    """A trio.Lock that does not yield to the scheduler when it is free (trio.Lock always does)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        import trio

        self._lock = trio.Lock()

    async def acquire(self) -> None:
        import trio

        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    def acquire_nowait(self) -> None:
        self._lock.acquire_nowait()

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def statistics(self):
        return self._lock.statistics()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc) -> None:
        self.release()


def _free_locks_do_not_yield() -> None:
    from libp2p.io.trio import TrioTCPStream
    from libp2p.network.stream.net_stream import NetStream
    from libp2p.stream_muxer.yamux import yamux

    def swap_locks(cls, *names: str) -> None:
        original = cls.__init__

        def __init__(self, *args, **kwargs) -> None:
            original(self, *args, **kwargs)
            for name in names:
                setattr(self, name, _NoYieldLock())

        cls.__init__ = __init__

    swap_locks(TrioTCPStream, "read_lock", "write_lock")
    swap_locks(NetStream, "_state_lock")
    swap_locks(yamux.Yamux, "streams_lock", "_write_lock")
    swap_locks(yamux.YamuxStream, "window_lock")
