"""One gossipsub topic, configured deliberately; knows bytes and a validator, nothing of records.

Sized for clusters of 2-100 peers whose messages are small (heartbeats ~160 bytes, full records
~1 kB) and frequent (every peer, every 1.5 s). A peer's own messages are flood-published to every
connected peer (below), and agents dial every peer they learn, so the mesh only carries relays for
pairs not (yet) connected: every relayed copy to a connected peer is a duplicate that costs both
ends a py-libp2p RPC (~0.5-1 ms of CPU each: yamux, Noise, protobuf, trio). Mesh degree D=2
(1..4) keeps relays at ~1-3 copies per message per peer (D=4..8 made 20 agents on 2 cores spend
0.11 core each and flap); IHAVE
gossip to 3 non-mesh peers about the last router heartbeat's messages (each id is 46 bytes: a
longer window costs more than the copies it recovers, and the next heartbeat or a Want heals a
loss anyway); a 1 s router heartbeat so the mesh forms and heals within seconds.

py-libp2p 0.8.1 defaults that would bite: a 10 msg/s per-topic spam limit that silently drops (a
20-peer cluster exceeds it), eclipse protection that wants peers on 3 distinct IPs (a LAN behind one
NAT, or loopback, has fewer), a 32-message subscription queue, a 120 s heartbeat (the mesh would
take minutes to form), and "adaptive gossip": when peers connect or disconnect more than 10 times a
minute (any cluster starting up) it raises the mesh degree by up to 4, IHAVEs to a quarter of all
peers (quadratic bytes), and stretches the router heartbeat to 30-60 s, so the mesh stops healing
exactly when it must; more traffic, more load, more churn. It is off, and the IHAVE fan-out is a
constant (`_get_adaptive_gossip_peers_count` ignores the flag for its floor of 6 and a quarter of
the peers: overridden). Also: a 60 s backoff after a PRUNE and a 10 s "GRAFT flood" rule (a GRAFT
within 10 s of a PRUNE is penalised with another PRUNE): with peers joining, a pruned pair could not
mesh again for a minute, and a new peer connected only to such a neighbour had an empty mesh and
published to nobody. Backoff 5 s, flood rule 1 s, and our own messages go to every topic peer
(flood publish, below).

Each pubsub RPC also carries the sender's signed libp2p peer record (~210 bytes, py-libp2p 0.8.1),
which the sender re-marshals (~0.15 ms) and the receiver re-verifies (~0.3 ms) on every RPC: the
same bytes each time. `_cache_sender_records` memoises both (same bytes on the wire; a changed record
is verified as before), since we do not use libp2p's certified address book beyond what it already
holds.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import libp2p
import libp2p.pubsub.gossipsub as gossipsub_module
import libp2p.pubsub.pubsub as pubsub_module
import trio
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

log = logging.getLogger("p2pinfer.gossip")

SUBSCRIPTION_QUEUE = 1024
MAX_RPC_BYTES = 256 * 1024
DEGREE, DEGREE_LOW, DEGREE_HIGH = 2, 1, 4
PRUNE_BACKOFF_S = 5  # py-libp2p: 60
GOSSIP_PEERS = 3  # IHAVE targets per router heartbeat
GOSSIP_WINDOW, GOSSIP_HISTORY = 1, 2  # router heartbeats
ROUTER_HEARTBEAT_S = 1.0
LIBP2P_VERSION = "0.8.1"  # what the adjustments below were written against

Validator = Callable[[str, bytes], bool]  # (forwarder peer id, data) -> accept?


class _Router(GossipSub):
    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.graft_flood_threshold = 1.0  # py-libp2p: 10 s (a re-GRAFT after our PRUNE is a "flood")

    def _get_adaptive_gossip_peers_count(self, topic: str, total_peers: int) -> int:
        return min(GOSSIP_PEERS, max(0, total_peers))

    def _get_peers_to_send(self, topic_ids, msg_forwarder, origin, msg_id=None):
        """Flood publish (go-libp2p's default, not py-libp2p's): our own messages go to every peer in
        the topic, not only the mesh, so a heartbeat takes one hop and does not wait on a relay that
        is busy (a peer starting up, a loaded box) or on a mesh still forming. Relayed messages
        follow the mesh as usual."""
        peers = set(super()._get_peers_to_send(topic_ids, msg_forwarder, origin, msg_id))
        if self.pubsub is not None and origin == self.pubsub.my_id:
            for topic in topic_ids:
                peers.update(p for p in self.pubsub.peer_topics.get(topic, ()) if p != msg_forwarder)
        yield from peers


_SENDER_RECORD_TTL_S = 10.0
_VERIFIED_CACHE = 512


def _cache_sender_records() -> None:
    """Memoise py-libp2p's per-RPC signed peer record: marshalled once per 10 s per host, verified once
    per distinct (peer, bytes). Idempotent; only the pubsub modules' references are replaced."""
    if getattr(pubsub_module, "_p2pinfer_cached", False):
        return
    if libp2p.__version__ != LIBP2P_VERSION:
        log.warning("py-libp2p %s, not %s: per-RPC peer records are not cached", libp2p.__version__,
                    LIBP2P_VERSION)  # fmt: skip
        return
    make, consume = pubsub_module.env_to_send_in_RPC, pubsub_module.maybe_consume_signed_record
    made: dict[int, tuple[float, tuple[bytes, bool]]] = {}
    verified: OrderedDict[tuple[ID, bytes], None] = OrderedDict()

    def env_to_send_in_RPC(host):  # noqa: N802 (py-libp2p's name)
        now = time.monotonic()
        hit = made.get(id(host))
        if hit is None or now - hit[0] > _SENDER_RECORD_TTL_S:
            hit = made[id(host)] = (now, make(host))
        return hit[1]

    def maybe_consume_signed_record(msg, host, peer_id) -> bool:
        if not msg.HasField("senderRecord"):
            return True
        key = (peer_id, bytes(msg.senderRecord))
        if key in verified:
            return True
        ok = consume(msg, host, peer_id)
        if ok:
            verified[key] = None
            if len(verified) > _VERIFIED_CACHE:
                verified.popitem(last=False)
        return ok

    for module in (pubsub_module, gossipsub_module):
        module.env_to_send_in_RPC = env_to_send_in_RPC
        module.maybe_consume_signed_record = maybe_consume_signed_record
    pubsub_module._p2pinfer_cached = True


class Gossip:
    def __init__(self, host: IHost, topic: str) -> None:
        self.topic = topic
        self._validator: Validator = lambda forwarder, data: False  # run() sets the real one
        _cache_sender_records()
        self.router = _Router(
            [PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=DEGREE,
            degree_low=DEGREE_LOW,
            degree_high=DEGREE_HIGH,
            gossip_window=GOSSIP_WINDOW,
            gossip_history=GOSSIP_HISTORY,
            heartbeat_interval=ROUTER_HEARTBEAT_S,
            prune_back_off=PRUNE_BACKOFF_S,
            heartbeat_initial_delay=0.1,
            adaptive_gossip_enabled=False,
            spam_protection_enabled=False,  # our own check: one verified message per seq per peer
            eclipse_protection_enabled=False,
            time_to_live=30,
        )
        self.pubsub = Pubsub(host, self.router, max_inbound_rpc_size=MAX_RPC_BYTES)
        self._subscription = None

    def _validate(self, forwarder: ID, msg) -> bool:
        try:
            return self._validator(str(forwarder), bytes(msg.data))
        except Exception:  # a validator bug must not take the router down
            log.exception("gossip validator failed")
            return False

    async def run(self, validator: Validator, on_message: Callable[[bytes], Awaitable[None]], *,
                  task_status=trio.TASK_STATUS_IGNORED):  # fmt: skip
        """Run the router and deliver every message `validator` accepts (it runs before a message is
        forwarded, so a bad one goes no further); call before any peer connects."""
        self._validator = validator
        self.pubsub.set_topic_validator(self.topic, self._validate, False)
        pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = SUBSCRIPTION_QUEUE
        async with background_trio_service(self.pubsub), background_trio_service(self.router):
            await self.pubsub.wait_until_ready()
            self._subscription = await self.pubsub.subscribe(self.topic)
            task_status.started()
            while True:
                msg = await self._subscription.get()
                await on_message(bytes(msg.data))

    def topic_peers(self) -> set[str]:
        """The peers subscribed to our topic, as far as the router knows."""
        return {str(p) for p in self.pubsub.peer_topics.get(self.topic, ())}

    async def publish(self, data: bytes) -> None:
        await self.pubsub.publish(self.topic, data)
