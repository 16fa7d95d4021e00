"""One link between two processes on loopback: our libp2p ring link against trio TCP + ChaCha20-Poly1305.

Three configurations, each a fresh pair of processes (a serving peer and a measuring client), one after
the other so they never compete for the CPU:

  tcp     trio TCP, every message a u32 length + ChaCha20-Poly1305 ciphertext (what Noise's
          transport phase costs at its cheapest: one AEAD per message, one send, buffered receives)
  stock   our libp2p host (TCP + Noise + admission + yamux) with py-libp2p 0.8.1 as installed
  tuned   the same with p2pinfer/net/tuning.py applied (what agents run)

and four measurements in each:

  bulk    MB/s of BULK_MB sent in 1 MiB writes, until the receiver acknowledges the last byte
  rtt8k   median round trip of an 8 KiB message echoed back (ms)
  hop     median one-way time of a ring frame (msgpack header + float32 (1, H) hidden state, H=576:
          SmolLM2's decode step) = round trip / 2, through the ring's own code: Linker.open on one
          side, the Linker handler on the other, RemoteLink.send/recv (pump task + memory channel)
          at both ends; over tcp: the same frames (net/wire.py) on the bare secure socket
  hop2k   the same for H=2048 (a 1B model's hidden state)
  writes/frame  socket writes the libp2p client makes per ring frame it sends during `hop` (one frame
          per hop means 1.00: header and tensor in one yamux frame, one Noise message, one send; window
          updates and pings show up as the excess)

Per-hop overhead of our link = hop(libp2p) - hop(tcp): what a ring hop costs beyond the cheapest
secure transport. Goals (issue 12): bulk >= 0.6x, rtt8k <= 2x of tcp, per-hop overhead <= 0.5 ms.
Ratios are within one run; the box is shared, so compare configurations of the same run.

Run: python benchmarks/link.py [--bulk-mb 64] [--rounds 400] [--configs tcp,stock,tuned]
The peer process (also used by tests/test_net_tuning.py): python benchmarks/link.py --serve tcp|libp2p
prints its address on stdout, then serves until stdin closes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BULK_PROTOCOL = "/p2pinfer/linkbench/1.0.0"
WRITE_CHUNK = 1 << 20
SECRET = bytes.fromhex("5e" * 32)
_LEN = struct.Struct(">I")
_CMD = struct.Struct(">cQ")  # b"B" + total bytes (bulk) | b"E" + message size (echo)


# --- the baseline: trio TCP + ChaCha20-Poly1305 -----------------------------------------------------
class SecureTcp:
    """Length-prefixed ChaCha20-Poly1305 messages (64 KiB plaintext max) over a trio socket stream."""

    MAX_PLAIN = 65519

    def __init__(self, stream: trio.SocketStream, key: bytes, initiator: bool) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

        self.stream = stream
        self.aead = ChaCha20Poly1305(key)
        self.tx_n = 0
        self.rx_n = 0
        self.tx_dir, self.rx_dir = (b"\x00", b"\x01") if initiator else (b"\x01", b"\x00")
        self.buf = bytearray()

    def _nonce(self, direction: bytes, n: int) -> bytes:
        return direction + b"\x00" * 3 + n.to_bytes(8, "little")

    async def write(self, data: bytes) -> None:
        parts = []
        for lo in range(0, len(data), self.MAX_PLAIN):
            ct = self.aead.encrypt(
                self._nonce(self.tx_dir, self.tx_n), bytes(data[lo : lo + self.MAX_PLAIN]), None
            )
            self.tx_n += 1
            parts += [_LEN.pack(len(ct)), ct]
        await self.stream.send_all(b"".join(parts))

    async def read(self) -> bytes:
        """The next message's plaintext; b"" at the end of the stream."""
        while True:
            if len(self.buf) >= 4:
                n = _LEN.unpack_from(self.buf)[0]
                if len(self.buf) >= 4 + n:
                    ct = bytes(self.buf[4 : 4 + n])
                    del self.buf[: 4 + n]
                    pt = self.aead.decrypt(self._nonce(self.rx_dir, self.rx_n), ct, None)
                    self.rx_n += 1
                    return pt
            chunk = await self.stream.receive_some(256 * 1024)
            if not chunk:
                return b""
            self.buf += chunk


class Reader:
    """Exact reads over anything with an async read() returning whatever is available."""

    def __init__(self, read) -> None:
        self._read = read
        self.buf = bytearray()

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = await self._read()
            if not chunk:
                raise EOFError(f"stream ended after {len(self.buf)} of {n} bytes")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def skip(self, n: int) -> None:
        while n > 0:
            if not self.buf:
                chunk = await self._read()
                if not chunk:
                    raise EOFError("stream ended in bulk data")
                self.buf += chunk
            take = min(n, len(self.buf))
            del self.buf[:take]
            n -= take


async def serve_commands(read, write) -> None:
    """The serving side of bulk and echo, over any read/write pair."""
    await _serve_prefilled(Reader(read), write)


# --- measuring, over any read/write pair ------------------------------------------------------------
async def bulk(read, write, total: int) -> float:
    data = os.urandom(WRITE_CHUNK)
    r = Reader(read)
    t0 = time.perf_counter()
    await write(_CMD.pack(b"B", total))
    for _ in range(total // WRITE_CHUNK):
        await write(data)
    assert await r.exactly(1) == b"k"
    return total / (time.perf_counter() - t0) / 1e6


async def echo_rtt(read, write, size: int, rounds: int) -> float:
    msg = os.urandom(size)
    r = Reader(read)
    await write(_CMD.pack(b"E", size))
    times = []
    for i in range(rounds + rounds // 10):
        t0 = time.perf_counter()
        await write(msg)
        got = await r.exactly(size)
        if i >= rounds // 10:  # the first tenth warms up
            times.append(time.perf_counter() - t0)
    assert got == msg
    return statistics.median(times) * 1e3


def hidden(width: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)


async def frame_hop(send, recv, width: int, rounds: int) -> float:
    """Median one-way ms of a ring frame: half the round trip of a frame echoed by the other side."""
    h = hidden(width)
    times = []
    for i in range(rounds + rounds // 10):
        t0 = time.perf_counter()
        await send({"t": "h", "last": True}, h)
        frame = await recv()
        if i >= rounds // 10:
            times.append(time.perf_counter() - t0)
        if frame.tensor is None or not np.array_equal(frame.tensor, h):
            raise AssertionError("a ring frame came back different")
    return statistics.median(times) / 2 * 1e3


# --- the peer process ---------------------------------------------------------------------------------
async def _wait_stdin_closed() -> None:
    await trio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


async def serve_tcp() -> None:
    from p2pinfer.net.wire import FrameReader, StreamClosed, encode_frame

    async def handle(stream: trio.SocketStream) -> None:
        conn = SecureTcp(stream, SECRET, initiator=False)
        first = await conn.read()
        if first == b"F":  # ring frames: echo each frame back
            reader = FrameReader(conn.read)
            try:
                while True:
                    f = await reader.read_frame()
                    await conn.write(encode_frame(f.header, f.tensor))
            except StreamClosed:
                return
        r = Reader(conn.read)
        r.buf += first
        await _serve_prefilled(r, conn.write)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        print(f"127.0.0.1:{port}", flush=True)
        await _wait_stdin_closed()
        nursery.cancel_scope.cancel()


async def _serve_prefilled(r: Reader, write) -> None:
    """Bulk: swallow n bytes, then acknowledge; echo: send back every n-byte message."""
    kind, n = _CMD.unpack(await r.exactly(_CMD.size))
    if kind == b"B":
        await r.skip(n)
        await write(b"k")
    else:
        while True:
            try:
                msg = await r.exactly(n)
            except EOFError:
                return
            await write(msg)


def _host():
    import multiaddr

    from p2pinfer.identity import Identity
    from p2pinfer.net.host import build_host

    me = Identity(secrets.token_bytes(32))
    listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
    return me, build_host(me.key_pair, SECRET, listen), listen


async def serve_libp2p() -> None:
    from libp2p.custom_types import TProtocol

    from p2pinfer.net import tuning
    from p2pinfer.net.keeper import Keeper
    from p2pinfer.net.streams import Streams
    from p2pinfer.serve.links import Linker

    me, host, listen = _host()

    async def echo_frames(link) -> None:
        while True:
            f = await link.recv()
            await link.send(f.header, f.tensor)

    async def bulk_handler(stream) -> None:
        try:
            await serve_commands(stream.read, stream.write)
        finally:
            with trio.move_on_after(1):
                await stream.close()

    Linker(Streams(Keeper(host)), str(me.peer_id), echo_frames)
    host.set_stream_handler(TProtocol(BULK_PROTOCOL), bulk_handler)
    async with host.run(listen):
        addr = f"{host.get_addrs()[0]}"
        if "/p2p/" not in addr:
            addr += f"/p2p/{me.peer_id}"
        print(addr, flush=True)
        print(json.dumps({"tuned": tuning.is_applied()}), flush=True)
        await _wait_stdin_closed()


# --- the measuring client -------------------------------------------------------------------------------
async def client_tcp(addr: str, bulk_mb: int, rounds: int) -> dict:
    from p2pinfer.net.wire import FrameReader, encode_frame

    host, port = addr.rsplit(":", 1)
    out = {}
    async with await trio.open_tcp_stream(host, int(port)) as s:
        c = SecureTcp(s, SECRET, initiator=True)
        out["bulk"] = await bulk(c.read, c.write, bulk_mb << 20)
    async with await trio.open_tcp_stream(host, int(port)) as s:
        c = SecureTcp(s, SECRET, initiator=True)
        out["rtt8k"] = await echo_rtt(c.read, c.write, 8192, rounds)
    for key, width in (("hop", 576), ("hop2k", 2048)):
        async with await trio.open_tcp_stream(host, int(port)) as s:
            c = SecureTcp(s, SECRET, initiator=True)
            await c.write(b"F")
            reader = FrameReader(c.read)

            async def send(header, tensor, c=c):
                await c.write(encode_frame(header, tensor))

            out[key] = await frame_hop(send, reader.read_frame, width, rounds)
    return out


async def echo_check(read, write, size: int, rounds: int) -> int:
    """Echo `rounds` random messages of `size` bytes and check every byte that comes back."""
    r = Reader(read)
    await write(_CMD.pack(b"E", size))
    for _ in range(rounds):
        msg = os.urandom(size)
        await write(msg)
        if await r.exactly(size) != msg:
            raise AssertionError(f"echo of {size} bytes came back different")
    return rounds


async def client_libp2p(addr: str, bulk_mb: int, rounds: int, check: bool = False) -> dict:
    from libp2p.custom_types import TProtocol

    from p2pinfer.net import tuning
    from p2pinfer.net.addrs import parse_peer_addr
    from p2pinfer.net.keeper import Keeper
    from p2pinfer.net.streams import Streams
    from p2pinfer.serve.links import Linker

    _count_socket_writes()
    me, host, listen = _host()
    info = parse_peer_addr(addr)
    out: dict = {"tuned": tuning.is_applied()}

    async def refuse(link) -> None:
        return None

    linker = Linker(Streams(Keeper(host)), str(me.peer_id), refuse)
    async with host.run(listen):
        await host.connect(info)
        if check:  # 3 MiB messages cross the 256 KiB initial window many times, both ways
            stream = await host.new_stream(info.peer_id, [TProtocol(BULK_PROTOCOL)])
            out["echoed"] = await echo_check(stream.read, stream.write, 3 << 20, 4)
            await stream.close()
        stream = await host.new_stream(info.peer_id, [TProtocol(BULK_PROTOCOL)])
        out["bulk"] = await bulk(stream.read, stream.write, bulk_mb << 20)
        await stream.close()
        stream = await host.new_stream(info.peer_id, [TProtocol(BULK_PROTOCOL)])
        out["rtt8k"] = await echo_rtt(stream.read, stream.write, 8192, rounds)
        await stream.close()
        for key, width in (("hop", 576), ("hop2k", 2048)):
            async with linker.open(str(info.peer_id)) as link:
                before = _socket_writes[0]
                out[key] = await frame_hop(link.send, link.recv, width, rounds)
                # socket writes of this process per frame sent (each frame also reads one frame back)
                out[f"{key}_writes"] = (_socket_writes[0] - before) / (rounds + rounds // 10)
    return out


_socket_writes = [0]


def _count_socket_writes() -> None:
    """Count every write to a TCP socket by libp2p in this process (a Noise message is one write)."""
    from libp2p.io.trio import TrioTCPStream

    original = TrioTCPStream.write

    async def write(self, data: bytes) -> None:
        _socket_writes[0] += 1
        await original(self, data)

    TrioTCPStream.write = write


def run_config(name: str, bulk_mb: int, rounds: int) -> dict:
    kind = "tcp" if name == "tcp" else "libp2p"
    env = {**os.environ, "P2PINFER_LIBP2P_TUNING": "0" if name == "stock" else "1"}
    me = [sys.executable, str(Path(__file__).resolve())]
    server = subprocess.Popen(me + ["--serve", kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                              text=True)  # fmt: skip
    try:
        addr = server.stdout.readline().strip()
        if not addr:
            raise RuntimeError(f"{name}: the serving peer printed no address")
        client = subprocess.run(me + ["--client", kind, "--addr", addr, "--bulk-mb", str(bulk_mb),
                                      "--rounds", str(rounds)], env=env, capture_output=True, text=True,
                                timeout=600)  # fmt: skip
        if client.returncode != 0:
            raise RuntimeError(f"{name}: client failed:\n{client.stderr[-3000:]}")
        return json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", choices=["tcp", "libp2p"])
    ap.add_argument("--client", choices=["tcp", "libp2p"])
    ap.add_argument("--addr")
    ap.add_argument("--bulk-mb", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=400)
    ap.add_argument("--configs", default="tcp,stock,tuned")
    ap.add_argument(
        "--check", action="store_true", help="client: also echo 3 MiB messages, checking every byte"
    )
    args = ap.parse_args()
    if args.serve:
        return trio.run(serve_tcp if args.serve == "tcp" else serve_libp2p)
    if args.client:
        if args.client == "tcp":
            result = trio.run(client_tcp, args.addr, args.bulk_mb, args.rounds)
        else:
            result = trio.run(client_libp2p, args.addr, args.bulk_mb, args.rounds, args.check)
        print(json.dumps(result))
        return
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    results = {name: run_config(name, args.bulk_mb, args.rounds) for name in args.configs.split(",")}
    base = results.get("tcp")
    print(f"\n{'config':>6} {'bulk MB/s':>10} {'x tcp':>6} {'rtt8k ms':>9} {'x tcp':>6} {'hop ms':>7} "
          f"{'+tcp ms':>8} {'hop2k ms':>9} {'+tcp ms':>8} {'writes/frame':>12}")  # fmt: skip
    for name, r in results.items():
        bx = f"{r['bulk'] / base['bulk']:.2f}" if base else "-"
        rx = f"{r['rtt8k'] / base['rtt8k']:.2f}" if base else "-"
        hx = f"{r['hop'] - base['hop']:+.3f}" if base else "-"
        h2x = f"{r['hop2k'] - base['hop2k']:+.3f}" if base else "-"
        writes = f"{r['hop_writes']:.2f}" if "hop_writes" in r else "1 (by design)"
        print(f"{name:>6} {r['bulk']:>10.1f} {bx:>6} {r['rtt8k']:>9.3f} {rx:>6} {r['hop']:>7.3f} {hx:>8} "
              f"{r['hop2k']:>9.3f} {h2x:>8} {writes:>12}")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
