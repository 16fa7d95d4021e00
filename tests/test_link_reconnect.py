"""Ring streams that fail to open on a listed connection, and links that end as StreamEOF: reproduced.

What py-libp2p 0.8.1 does when a connection goes away (two real processes on 127.0.0.1, our host):
- the end that closes it: every stream's reader gets StreamEOF ("Connection shut down"), exactly as if
  the peer had closed that stream cleanly;
- the other end: opens in flight fail in protocol negotiation (StreamFailure), and for a while the
  closed connection stays listed, so new opens neither use it nor dial: "SwarmException: No valid
  connections available" (or "Failed to create stream" when the yamux session is already shutting
  down but the SwarmConn is not yet marked closed).

Our Linker used to answer any failed open, a timeout included, with close_peer: under load one slow
open closed a healthy connection, every other request's ring streams on it ended (StreamEOF here,
reset there), and the peers' own reconnects closed theirs. Now a slow open is reported as slow, only
connections already closing are dropped before the second try, and a link ended by a lost connection
says so ("connection lost"), while one its peer closed says "closed by peer".
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import trio

from tests.harness import end_child

ROOT = Path(__file__).resolve().parents[1]
H = np.ones((1, 576), np.float32)


def _host(seed: bytes | None = None, port: int = 0):
    import multiaddr

    from benchmarks.link import SECRET
    from p2pinfer.identity import Identity
    from p2pinfer.net.host import build_host

    me = Identity(seed or os.urandom(32))
    listen = [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")]
    return me, build_host(me.key_pair, SECRET, listen), listen


def _streams(host):
    from p2pinfer.net.keeper import Keeper
    from p2pinfer.net.streams import Streams

    return Streams(Keeper(host))


async def _peer(mode: str, port: str = "0") -> None:
    """Echoes ring frames. mode "close": closes its connections 0.7 s after the first one appears;
    "fixed": the same peer id and port every time it starts (a restarted agent).
    A frame {"t": "stall", "s": S} stops this whole process for S seconds (as a peer starved of CPU)."""
    from libp2p.peer.id import ID

    from p2pinfer.serve.links import LinkClosed, Linker

    me, host, listen = _host(b"\x11" * 32 if mode == "fixed" else None, int(port))

    async def echo(link) -> None:
        try:
            while True:
                f = await link.recv()
                if f.header.get("t") == "stall":
                    time.sleep(float(f.header["s"]))
                if f.header.get("t") == "burst":  # n frames, then this peer drops the connection
                    for i in range(int(f.header["n"])):
                        await link.send({"t": "h", "i": i}, H)
                    await host.get_network().close_peer(ID.from_base58(link.peer))
                    return
                await link.send(f.header, f.tensor)
        except LinkClosed:
            pass

    Linker(_streams(host), str(me.peer_id), echo)
    async with host.run(listen):
        print(f"{host.get_addrs()[0]}", flush=True)
        swarm = host.get_network()
        if mode == "close":
            while not swarm.connections:
                await trio.sleep(0.01)
            await trio.sleep(0.7)
            for peer in list(swarm.connections):
                await swarm.close_peer(peer)
        await trio.to_thread.run_sync(sys.stdin.read)


async def _opens_across_a_close(addr: str) -> None:
    """Live links plus 8 tasks opening links for 3 s, through Linker and (in the same run) raw."""
    from p2pinfer.net.addrs import parse_peer_addr
    from p2pinfer.serve.links import RING_PROTOCOL, LinkClosed, Linker

    me, host, listen = _host()

    async def refuse(link) -> None:
        return None

    linker = Linker(_streams(host), str(me.peer_id), refuse)
    info = parse_peer_addr(addr)
    out = {
        "linker_ok": 0,
        "linker_failed": [],
        "linker_cut": [],
        "raw_ok": 0,
        "raw_failed": collections.Counter(),
        "live": [],
    }
    async with host.run(listen):
        await host.connect(info)
        deadline = trio.current_time() + 3

        async def live() -> None:
            try:
                async with linker.open(str(info.peer_id)) as link:
                    while trio.current_time() < deadline:
                        await link.send({"t": "h"}, H)
                        await link.recv()
            except LinkClosed as e:
                out["live"].append(str(e))

        async def via_linker() -> None:
            while trio.current_time() < deadline:
                opened = False
                try:
                    async with linker.open(str(info.peer_id), connect_timeout=5) as link:
                        opened = True
                        await link.send({"t": "h"}, H)
                        await link.recv()
                    out["linker_ok"] += 1
                except LinkClosed as e:  # a link the close cut after it opened is fine; an open is not
                    out["linker_cut" if opened else "linker_failed"].append(str(e))

        async def raw() -> None:
            while trio.current_time() < deadline:
                try:
                    stream = await host.new_stream(info.peer_id, [RING_PROTOCOL])
                    await stream.close()
                    out["raw_ok"] += 1
                except Exception as e:
                    out["raw_failed"][type(e).__name__] += 1
                    await trio.sleep(0.005)

        async with trio.open_nursery() as nursery:
            for task in [live, live] + [via_linker] * 4 + [raw] * 4:
                nursery.start_soon(task)
    print(json.dumps(out), flush=True)


async def _slow_open(addr: str) -> None:
    """A live link; the peer stalls 3 s; an open with a 1 s timeout fails; the live link carries on."""
    from p2pinfer.net.addrs import parse_peer_addr
    from p2pinfer.serve.links import LinkClosed, Linker

    me, host, listen = _host()

    async def refuse(link) -> None:
        return None

    linker = Linker(_streams(host), str(me.peer_id), refuse)
    info = parse_peer_addr(addr)
    out: dict = {}
    async with host.run(listen):
        await host.connect(info)
        try:
            async with linker.open(str(info.peer_id)) as link:
                await link.send({"t": "h"}, H)
                await link.recv()
                await link.send({"t": "stall", "s": 3.0})
                await trio.sleep(0.2)  # the peer is asleep now
                try:
                    async with linker.open(str(info.peer_id), connect_timeout=1.0):
                        out["second"] = "opened"
                except LinkClosed as e:
                    out["second"] = str(e)
                assert (await link.recv()).header["t"] == "stall"
                for _ in range(5):
                    await link.send({"t": "h"}, H)
                    await link.recv()
                out["live"] = "carried on"
        except LinkClosed as e:
            out["live"] = str(e)
    print(json.dumps(out), flush=True)


async def _restart(addr: str) -> None:
    """A link to a peer; the peer goes down (an open fails), comes back; a link opens at once."""
    from p2pinfer.net.addrs import parse_peer_addr
    from p2pinfer.serve.links import LinkClosed, Linker

    me, host, listen = _host()

    async def refuse(link) -> None:
        return None

    async def line() -> str:
        return (await trio.to_thread.run_sync(sys.stdin.readline)).strip()

    async def try_open() -> str:
        try:
            async with linker.open(str(info.peer_id), connect_timeout=3) as link:
                await link.send({"t": "h"}, H)
                await link.recv()
            return "opened"
        except LinkClosed as e:
            return str(e)

    linker = Linker(_streams(host), str(me.peer_id), refuse)
    info = parse_peer_addr(addr)
    host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
    out = {}
    async with host.run(listen):
        out["before"] = await try_open()
        print("ready", flush=True)
        assert await line() == "down"
        out["down"] = await try_open()
        print("tried", flush=True)
        assert await line() == "up"
        out["after"] = await try_open()
    print(json.dumps(out), flush=True)


async def _last_frames(addr: str) -> None:
    """The peer sends 50 frames and closes the connection at once, while this process is busy."""
    from p2pinfer.net.addrs import parse_peer_addr
    from p2pinfer.serve.links import LinkClosed, Linker

    me, host, listen = _host()

    async def refuse(link) -> None:
        return None

    linker = Linker(_streams(host), str(me.peer_id), refuse)
    info = parse_peer_addr(addr)
    got, end = [], ""
    async with host.run(listen):
        await host.connect(info)
        async with linker.open(str(info.peer_id)) as link:
            await link.send({"t": "burst", "n": 50})
            time.sleep(0.5)  # frames and the close all arrive before anything here runs
            try:
                while True:
                    got.append((await link.recv()).header["i"])
            except LinkClosed as e:
                end = str(e)
    print(json.dumps({"got": got, "end": end}), flush=True)


def _run(peer_mode: str, client: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys, trio; from tests import test_link_reconnect as t; trio.run(t._{}, *sys.argv[1:])"
    peer = subprocess.Popen([sys.executable, "-c", code.format("peer"), peer_mode], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        addr = peer.stdout.readline().strip()
        assert addr, peer.stderr.read()
        run = subprocess.run([sys.executable, "-c", code.format(client), addr], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=90)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        return json.loads(run.stdout.strip().splitlines()[-1])
    finally:
        end_child(peer)


def test_opens_survive_a_connection_closed_under_them():
    out = _run("close", "opens_across_a_close")
    # the reproduction: raw opens across the close fail (negotiation cut off, closed connection listed)
    assert sum(out["raw_failed"].values()) > 0 and out["raw_ok"] > 0, out
    # the links that lived on the closed connection say why they ended
    cut = out["live"] + out["linker_cut"]
    assert out["live"] and all("connection lost" in why for why in cut), cut
    # every Linker.open across the same close succeeded (second try on a fresh connection)
    assert out["linker_failed"] == [] and out["linker_ok"] > 0, out


def test_a_slow_open_does_not_close_the_connection():
    out = _run("echo", "slow_open")
    assert "within 1 s" in out["second"], out
    assert out["live"] == "carried on", out


def test_a_restarted_peer_is_reachable_at_once():
    """py-libp2p refused dials to a peer for 60 s after one failed; a restarted agent stayed unreachable."""
    from tests.harness import free_port

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import sys, trio; from tests import test_link_reconnect as t; trio.run(t._{}, *sys.argv[1:])"
    port = str(free_port())

    def start_peer() -> subprocess.Popen:
        peer = subprocess.Popen([sys.executable, "-c", code.format("peer"), "fixed", port], cwd=ROOT, env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        assert peer.stdout.readline().strip(), peer.stderr.read()
        return peer

    peer = start_peer()
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/" + _fixed_peer_id()
    client = subprocess.Popen([sys.executable, "-c", code.format("restart"), addr], cwd=ROOT, env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert client.stdout.readline().strip() == "ready", client.stderr.read()[-3000:]
        peer.kill()
        peer.wait()
        client.stdin.write("down\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "tried", client.stderr.read()[-3000:]
        peer = start_peer()
        client.stdin.write("up\n")
        client.stdin.flush()
        out = json.loads(client.stdout.readline())
    finally:
        for p in (client, peer):
            p.kill()
            p.wait()
    assert out["before"] == "opened" and out["down"] != "opened", out
    assert out["after"] == "opened", out


def _fixed_peer_id() -> str:
    from p2pinfer.identity import Identity

    return str(Identity(b"\x11" * 32).peer_id)


@pytest.mark.xfail(strict=False, reason="py-libp2p closes a socket over unread bytes: RST, and the "
                   "receiving kernel drops what its application had not read yet")  # fmt: skip
def test_frames_sent_before_a_connection_closed_are_delivered():
    """A peer sends 50 frames and closes the connection while this end is busy for 0.5 s.

    Unpatched py-libp2p lost the tail in every run (6 of 6, then 4 of 4): yamux cleared every
    stream's unread buffer at the peer's GO_AWAY / EOF. net/tuning.py lets readers drain first, which
    leaves the second cause (2 of 6 runs lost 10 frames, having read ~97 KB of ~120 KB before
    ECONNRESET): the peer closes its socket at once, so whatever this end sends next (identify, a ping
    reply) draws an RST, and an RST makes the receiving kernel drop what its application had not read.
    A lingering close (FIN, then read until the peer's FIN, up to 1 s) lost nothing in 8 of 8 runs, but
    made agents' shutdown slow enough that a redial raced the swarm's stop (a py-libp2p traceback in
    test_drain), so it is not in. Our links never close a connection themselves; agents close them
    when leaving, after draining."""
    out = _run("echo", "last_frames")
    assert out["got"] == list(range(50)), out
    assert "connection lost" in out["end"], out
