"""net/streams.py and net/keeper.py: two of our hosts in one process on 127.0.0.1 (Noise, admission, yamux).

The cross-process behaviour (connections closed under open streams, stalled receivers, restarted
peers) is in tests/test_link_reconnect.py and tests/test_link_stall.py; these are the API's basics:
frames both ways, how a stream's end is named, malformed frames, failed opens, and the keeper's
ping, repair and targets.
"""

from __future__ import annotations

import os

import multiaddr
import numpy as np
import pytest
import trio

from p2pinfer.identity import Identity
from p2pinfer.net.addrs import parse_peer_addr
from p2pinfer.net.host import build_host
from p2pinfer.net.keeper import Keeper
from p2pinfer.net.streams import LinkClosed, Streams
from p2pinfer.net.wire import encode_frame

SECRET = b"\x05" * 32
ECHO = "/p2pinfer-test/echo/1.0.0"
LISTEN = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]


def _node():
    me = Identity(os.urandom(32))
    host = build_host(me.key_pair, SECRET, LISTEN)
    keeper = Keeper(host)
    return str(me.peer_id), host, keeper, Streams(keeper)


def _addr(host, peer: str) -> str:
    addr = str(host.get_addrs()[0])
    return addr if "/p2p/" in addr else f"{addr}/p2p/{peer}"


def _pair(body, serve_b=None):
    """Run `body(a, b)` with hosts a and b up and a connected to b; b serves ECHO with `serve_b`."""

    async def main() -> None:
        a, b = _node(), _node()
        if serve_b is not None:
            b[3].serve(ECHO, serve_b)
        async with a[1].run(LISTEN), b[1].run(LISTEN):
            await a[1].connect(parse_peer_addr(_addr(b[1], b[0])))
            with trio.fail_after(20):
                await body(a, b)

    trio.run(main)


async def _echo(stream) -> None:
    try:
        while True:
            f = await stream.recv()
            if f.header.get("t") == "bye":
                return  # the stream is closed when the handler returns
            await stream.send(f.header, f.tensor)
    except LinkClosed:
        pass


def test_frames_go_both_ways_and_a_closed_stream_says_closed_by_peer():
    seen = []

    async def body(a, b) -> None:
        async with a[3].open(b[0], ECHO, timeout=5) as s:
            assert s.peer == b[0]
            x = np.arange(12, dtype=np.float32).reshape(3, 4)
            for i in range(20):
                await s.send({"t": "h", "i": i}, x)
                f = await s.recv()
                seen.append(f.header["i"])
                assert np.array_equal(f.tensor, x)
            await s.send({"t": "bye"})
            with pytest.raises(LinkClosed, match=f"link to {b[0]} closed by peer"):
                await s.recv()

    _pair(body, _echo)
    assert seen == list(range(20))


def test_the_handler_sees_the_opening_peer_as_a_string():
    got = []

    async def handler(stream) -> None:
        got.append(stream.peer)
        await stream.send({"t": "hi"})

    async def body(a, b) -> None:
        async with a[3].open(b[0], ECHO, timeout=5) as s:
            assert (await s.recv()).header == {"t": "hi"}

    _pair(body, handler)
    assert len(got) == 1 and isinstance(got[0], str) and got[0].startswith("12D3")


def test_a_malformed_frame_ends_the_stream_at_its_receiver():
    ends = []

    async def handler(stream) -> None:
        try:
            await stream.recv()
        except LinkClosed as e:
            ends.append(str(e))

    async def body(a, b) -> None:
        from libp2p.peer.id import ID

        raw = await a[1].new_stream(ID.from_base58(b[0]), [ECHO])
        frame = encode_frame({"t": "h"})
        await raw.write(b"\xff\xff\xff\xff" + frame[4:])  # a length beyond every limit
        with trio.move_on_after(3):
            while not ends:
                await trio.sleep(0.02)

    _pair(body, handler)
    assert len(ends) == 1 and "malformed frame" in ends[0], ends


def test_failed_opens_are_link_closed_naming_the_protocol():
    async def body(a, b) -> None:
        with pytest.raises(LinkClosed, match="cannot open a echo stream to"):
            async with a[3].open(b[0], ECHO, timeout=5):
                pass  # b serves nothing
        nobody = str(Identity(os.urandom(32)).peer_id)  # no address known
        with pytest.raises(LinkClosed, match=f"(cannot open a echo stream|no echo stream) to {nobody}"):
            async with a[3].open(nobody, ECHO, timeout=2):
                pass

    _pair(body)


def test_the_keeper_pings_repairs_nothing_healthy_and_keeps_targets_by_id():
    async def body(a, b) -> None:
        keeper = a[2]
        assert keeper.connected_peers() == {b[0]}
        assert 0 < await keeper.rtt_ms(b[0], 3) < 1000
        assert await keeper.repair(b[0], timeout=5) is None  # it answers: left alone
        assert keeper.connected_peers() == {b[0]}
        assert await keeper.drop_dying(b[1].get_id()) == 0  # a healthy connection is never dropped
        other = str(Identity(os.urandom(32)).peer_id)
        keeper.want_addrs(b[0], [f"/ip4/127.0.0.1/tcp/1/p2p/{other}", "junk"], "gossip")
        assert keeper._targets == {}  # addresses naming another peer, or none, are ignored
        keeper.want_addrs(b[0], [_addr(b[1], b[0])], "gossip")
        assert [str(p) for p in keeper._targets] == [b[0]]
        keeper.forget(b[0])
        assert keeper._targets == {}

    _pair(body)
