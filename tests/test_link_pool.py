"""serve/links.py's stream pool, on two of our hosts in one process (Noise, admission, yamux on 127.0.0.1):
a stream whose use ended cleanly carries the next use; one that did not, or whose peer went quiet and
does not answer a ping, is never handed out again."""

from __future__ import annotations

import trio

from p2pinfer.net.addrs import parse_peer_addr
from p2pinfer.serve import links as L
from p2pinfer.serve.links import Linker
from tests.test_net_streams import LISTEN, _addr, _node


async def _serve_uses(link) -> bool:
    """A use: one 'use' frame answered by 'ack'; clean unless the frame says otherwise."""
    f = await link.recv()
    if f.header.get("t") == "ping":
        return True
    await link.send({"t": "ack", "n": f.header["n"]})
    return bool(f.header.get("clean", True))


def _pool(body, quiet_for=lambda peer: 0.0):
    async def main() -> None:
        a, b = _node(), _node()
        Linker(b[3], b[0], _serve_uses)
        linker = Linker(a[3], a[0], lambda link: None, quiet_for=quiet_for)
        async with a[1].run(LISTEN), b[1].run(LISTEN), trio.open_nursery() as nursery:
            await a[1].connect(parse_peer_addr(_addr(b[1], b[0])))
            await nursery.start(linker.run)
            with trio.fail_after(20):
                await body(linker, b[0])
            nursery.cancel_scope.cancel()

    trio.run(main)


async def _use(linker: Linker, peer: str, n: int, clean: bool = True):
    async with linker.open(peer) as link:
        await link.send({"t": "use", "n": n, "clean": clean})
        assert (await link.recv()).header == {"t": "ack", "n": n}
        link.reusable = clean
        return link


async def _pooled(linker: Linker, peer: str, count: int) -> None:
    while sum(not s.ended for _, s, _ in linker._idle.get(peer, [])) < count:
        await trio.sleep(0.01)


def test_a_clean_use_leaves_its_stream_for_the_next_and_an_unclean_one_closes_it():
    async def body(linker: Linker, peer: str) -> None:
        first = await _use(linker, peer, 1)
        await _pooled(linker, peer, 1)  # after the serving side's idle
        assert await _use(linker, peer, 2) is first and (linker.opened, linker.reused) == (1, 1)
        await _pooled(linker, peer, 1)
        assert await _use(linker, peer, 3, clean=False) is first  # ...and this use ends it
        fourth = await _use(linker, peer, 4)
        assert fourth is not first and first.ended and linker.opened == 2  # first was closed, not pooled

    _pool(body)


def test_concurrent_uses_get_their_own_streams_and_prepare_opens_side_by_side():
    async def body(linker: Linker, peer: str) -> None:
        assert await linker.prepare([peer, peer, peer]) == {}
        assert linker.opened == 3
        held, all_open = [], trio.Event()

        async def hold(n: int) -> None:
            async with linker.open(peer) as link:
                held.append(link)
                if len(held) == 3:
                    all_open.set()
                await link.send({"t": "use", "n": n})
                assert (await link.recv()).header == {"t": "ack", "n": n}
                await all_open.wait()  # no use ends before all three have their links
                link.reusable = True

        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(hold, n)
        assert len({id(x) for x in held}) == 3 and linker.opened == 3  # the three prepared, one each

    _pool(body)


def test_a_stream_idle_while_its_peer_is_quiet_is_pinged_and_one_that_ended_is_skipped(monkeypatch):
    monkeypatch.setattr(L, "PROBE_AFTER", 0.05)

    async def body(linker: Linker, peer: str) -> None:
        first = await _use(linker, peer, 1)
        await _pooled(linker, peer, 1)
        await trio.sleep(0.1)  # idle past PROBE_AFTER, and the peer "not heard from": pinged, still fine
        assert await _use(linker, peer, 2) is first and linker.opened == 1
        await _pooled(linker, peer, 1)
        await first.aclose()  # as if its connection dropped: the pool must not hand it out
        while not first.ended:
            await trio.sleep(0.01)
        assert await _use(linker, peer, 3) is not first and linker.opened == 2

    _pool(body, quiet_for=lambda peer: float("inf"))
