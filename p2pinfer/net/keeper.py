"""The connection keeper: the one place that dials, pings, closes and forgets libp2p connections.

- Dialling: targets come from --bootstrap (kept forever), mDNS and gossip (kept while the peer is
  believed alive), dialled with exponential backoff. A failing target logs once when it starts
  failing and once when it recovers, not on every retry: a departed peer must not fill the log.
- Stale connections, three kinds, each repaired here:
  - closed but still listed (py-libp2p 0.8.1 sometimes keeps one after a simultaneous dial is
    trimmed, and while it is listed nothing redials that peer): forgotten on every tick;
  - dying (closing, its yamux session shutting down; a stream opened on it fails): dropped when a
    stream fails to open on it (`drop_dying`, used by net/streams.py), never a healthy one;
  - listed and open but carrying nothing (a peer silent on gossip): `repair` pings it and closes it
    only if the ping fails on the connection, so the dialler redials.
- Round-trip times for the routing policies (`rtt_ms`): libp2p's ping protocol, timed here.

Peer ids cross this module's public methods as base58 strings, except `want`, which takes the
PeerInfo that net/addrs.py parses.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.host.ping import PING_LENGTH, PingService
from libp2p.io.utils import read_exactly
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from p2pinfer.net.addrs import AddressError, parse_peer_addr
from p2pinfer.net.host import end_stream

log = logging.getLogger("p2pinfer.dialer")

MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0
DIAL_TIMEOUT = 6.0
GOSSIP_DIAL_DEFER = 3.0
REPAIR_PING_TIMEOUT = 10.0


@dataclass
class Target:
    info: PeerInfo
    source: str  # "bootstrap", "mdns" or "gossip"
    persistent: bool
    next_try: float = 0.0
    backoff: float = MIN_BACKOFF
    failures: int = 0
    dialling: bool = field(default=False)


def connection_dying(conn) -> bool:
    """A connection py-libp2p still lists but that carries no new stream: closed, or its yamux session
    shutting down (0.8.1 marks the SwarmConn closed only after the muxer's teardown has awaited a
    few things; a stream opened meanwhile fails with `SwarmException: Failed to create stream`)."""
    if conn.is_closed:
        return True
    muxed = getattr(conn, "muxed_conn", None)
    shutting = getattr(muxed, "event_shutting_down", None)
    return bool(shutting is not None and shutting.is_set()) or bool(getattr(muxed, "is_closed", False))


async def ping_rtt_ms(host: IHost, peer: str, rounds: int) -> float:
    """The lowest of `rounds` round trips on one libp2p ping stream to `peer`, in ms (timed here with
    perf_counter: the library reports whole milliseconds, 0 on a LAN)."""
    stream = await host.new_stream(ID.from_base58(peer), [PING_PROTOCOL])
    try:
        best = float("inf")
        for _ in range(rounds):
            payload = secrets.token_bytes(PING_LENGTH)
            t0 = time.perf_counter()
            await stream.write(payload)
            pong = await read_exactly(stream, PING_LENGTH)
            ms = (time.perf_counter() - t0) * 1000
            if pong != payload:
                raise ValueError("ping payload mismatch")
            best = min(best, ms)
        return best
    finally:
        await end_stream(stream)


class Keeper:
    def __init__(self, host: IHost) -> None:
        self.host = host
        self._targets: dict[ID, Target] = {}
        self._wake = trio.Event()

    # --- what is connected ------------------------------------------------
    def is_connected(self, peer: ID) -> bool:
        return any(not c.is_closed for c in self.host.get_network().get_connections(peer))

    def connected_peers(self) -> set[str]:
        swarm = self.host.get_network()
        return {str(p) for p, conns in list(swarm.connections.items()) if any(not c.is_closed for c in conns)}

    # --- stale connections ------------------------------------------------
    def purge_closed(self) -> None:
        """Forget connections that are closed but still listed: py-libp2p 0.8.1 sometimes keeps one
        after a simultaneous dial is trimmed, and while it is listed nothing redials that peer."""
        swarm = self.host.get_network()
        for peer, conns in list(swarm.connections.items()):
            for c in list(conns):
                if c.is_closed:
                    log.debug("forgetting a closed connection to %s", peer)
                    swarm.remove_conn(c)

    async def drop_dying(self, peer: ID, wait: float = 1.0) -> int:
        """Let the dying connections to `peer` finish closing (at most `wait` s), then unlist any left, so
        the next stream dials afresh. Healthy connections to the peer are left alone. Returns how many."""
        swarm = self.host.get_network()
        dying = [c for c in swarm.get_connections(peer) if connection_dying(c)]
        if not dying:
            return 0
        with trio.move_on_after(wait):
            for conn in dying:
                await conn.event_closed.wait()
        for conn in dying:
            if conn in swarm.get_connections(peer):
                swarm.remove_conn(conn)
        return len(dying)

    async def repair(self, peer: str, timeout: float = REPAIR_PING_TIMEOUT) -> str | None:
        """Ping `peer`'s connection; only if the ping fails on the connection, close it so the dialler
        redials, and return why. An answer, or one that is merely slow, leaves it alone (None): a slow
        answer is load (ours or theirs), and closing then would add a redial, a handshake and a new
        mesh on top of the load (closing on silence alone made an overloaded cluster churn)."""
        pid = ID.from_base58(peer)
        try:
            with trio.fail_after(timeout):
                await PingService(self.host).ping(pid)
            return None
        except trio.TooSlowError:
            log.debug("connected peer %s is slow to answer ping", peer)
            return None
        except Exception as e:
            reason = type(e).__name__
        with trio.move_on_after(2):
            await self.host.get_network().close_peer(pid)
        return reason

    async def rtt_ms(self, peer: str, rounds: int) -> float:
        """The lowest of `rounds` ping round trips to `peer`, in ms."""
        return await ping_rtt_ms(self.host, peer, rounds)

    # --- dialling ---------------------------------------------------------
    async def ensure_connected(self, peer: ID, timeout: float = DIAL_TIMEOUT) -> None:
        if self.is_connected(peer):
            return
        self.purge_closed()
        addrs = self.host.get_peerstore().addrs(peer)
        with trio.fail_after(timeout):
            await self.host.connect(PeerInfo(peer, addrs))

    def want(self, info: PeerInfo, source: str, persistent: bool = False) -> None:
        """Ask to be connected to `info`; new addresses replace old ones for the same peer."""
        if info.peer_id == self.host.get_id():
            return
        t = self._targets.get(info.peer_id)
        if t is None:
            t = self._targets[info.peer_id] = Target(info, source, persistent)
            if source == "gossip" and str(self.host.get_id()) > str(info.peer_id):
                # Both peers learn of each other from the same gossip and would dial at once, leaving
                # two connections per pair; the smaller id dials first, the other only if that fails.
                t.next_try = trio.current_time() + GOSSIP_DIAL_DEFER
            self._wake.set()
        else:
            t.persistent = t.persistent or persistent
            if set(map(str, info.addrs)) - set(map(str, t.info.addrs)):
                t.info = PeerInfo(
                    info.peer_id, list({str(a): a for a in [*info.addrs, *t.info.addrs]}.values())
                )
                t.next_try = 0.0
                self._wake.set()

    def want_addrs(self, peer: str, addrs: Iterable[str], source: str) -> None:
        """`want` for a peer known by its id and /p2p/ addresses (say, from its record); addresses that
        do not parse or name another peer are ignored."""
        infos = []
        for a in addrs:
            try:
                infos.append(parse_peer_addr(a))
            except AddressError:
                continue
        infos = [i for i in infos if str(i.peer_id) == peer]
        if infos:
            self.want(PeerInfo(infos[0].peer_id, [a for i in infos for a in i.addrs]), source)

    def forget(self, peer: str) -> None:
        t = self._targets.get(ID.from_base58(peer))
        if t is not None and not t.persistent:
            del self._targets[t.info.peer_id]

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                self.purge_closed()
                now = trio.current_time()
                for t in list(self._targets.values()):
                    if not t.dialling and now >= t.next_try and not self.is_connected(t.info.peer_id):
                        t.dialling = True
                        nursery.start_soon(self._dial, t)
                self._wake = trio.Event()
                with trio.move_on_after(0.5):
                    await self._wake.wait()

    async def _dial(self, t: Target) -> None:
        peer = t.info.peer_id
        try:
            with trio.fail_after(DIAL_TIMEOUT):
                await self.host.connect(t.info)
        except Exception as e:  # every dial failure is expected churn, never fatal
            t.failures += 1
            jitter = random.uniform(0.8, 1.2)
            t.next_try = trio.current_time() + t.backoff * jitter
            t.backoff = min(MAX_BACKOFF, t.backoff * 2)
            level = logging.INFO if t.failures == 1 else logging.DEBUG
            reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            log.log(level, "cannot reach %s peer %s: %s (retrying with backoff)", t.source, peer, reason)
        else:
            if t.failures:
                log.info("reached %s peer %s after %d failed attempts", t.source, peer, t.failures)
            else:
                log.debug("connected to %s peer %s", t.source, peer)
            t.failures, t.backoff, t.next_try = 0, MIN_BACKOFF, 0.0
        finally:
            t.dialling = False
