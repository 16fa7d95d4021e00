"""Keeps dialling the peers we should be connected to, with exponential backoff.

Targets come from --bootstrap (kept forever), mDNS and gossip (kept while the peer is believed
alive). A failing target logs once when it starts failing and once when it recovers, not on every
retry: a departed peer must not fill the log.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

log = logging.getLogger("p2pinfer.dialer")

MIN_BACKOFF = 0.5
MAX_BACKOFF = 30.0
DIAL_TIMEOUT = 6.0
GOSSIP_DIAL_DEFER = 3.0


@dataclass
class Target:
    info: PeerInfo
    source: str  # "bootstrap", "mdns" or "gossip"
    persistent: bool
    next_try: float = 0.0
    backoff: float = MIN_BACKOFF
    failures: int = 0
    dialling: bool = field(default=False)


class Dialer:
    def __init__(self, host: IHost) -> None:
        self.host = host
        self._targets: dict[ID, Target] = {}
        self._wake = trio.Event()

    def is_connected(self, peer: ID) -> bool:
        return any(not c.is_closed for c in self.host.get_network().get_connections(peer))

    def connected_peers(self) -> set[str]:
        swarm = self.host.get_network()
        return {str(p) for p, conns in list(swarm.connections.items()) if any(not c.is_closed for c in conns)}

    def purge_closed(self) -> None:
        """Forget connections that are closed but still listed: py-libp2p 0.8.1 sometimes keeps one
        after a simultaneous dial is trimmed, and while it is listed nothing redials that peer."""
        swarm = self.host.get_network()
        for peer, conns in list(swarm.connections.items()):
            for c in list(conns):
                if c.is_closed:
                    log.debug("forgetting a closed connection to %s", peer)
                    swarm.remove_conn(c)

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

    def forget(self, peer: ID) -> None:
        t = self._targets.get(peer)
        if t is not None and not t.persistent:
            del self._targets[peer]

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
