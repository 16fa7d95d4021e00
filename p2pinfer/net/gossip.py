"""One gossipsub topic, configured deliberately; knows bytes and a validator, nothing of records.

py-libp2p 0.8.1 defaults that would bite: a 10 msg/s per-topic spam limit that silently drops (a
20-peer cluster publishing each second exceeds it), eclipse protection that wants peers on 3
distinct IPs (a LAN behind one NAT, or loopback, has fewer), a 32-message subscription queue, and
a 120 s heartbeat (the mesh would take minutes to form).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

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

Validator = Callable[[str, bytes], bool]  # (forwarder peer id, data) -> accept?


class Gossip:
    def __init__(self, host: IHost, topic: str, validator: Validator) -> None:
        self.topic = topic
        self._validator = validator
        self.router = GossipSub(
            [PROTOCOL_ID_V11, PROTOCOL_ID],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=1,
            heartbeat_initial_delay=0.1,
            spam_protection_enabled=False,  # our own check: one verified record per seq per peer
            eclipse_protection_enabled=False,
            time_to_live=30,
        )
        self.pubsub = Pubsub(host, self.router, max_inbound_rpc_size=MAX_RPC_BYTES)
        self.pubsub.set_topic_validator(topic, self._validate, False)
        self._subscription = None

    def _validate(self, forwarder: ID, msg) -> bool:
        try:
            return self._validator(str(forwarder), bytes(msg.data))
        except Exception:  # a validator bug must not take the router down
            log.exception("gossip validator failed")
            return False

    async def run(
        self, on_message: Callable[[bytes], Awaitable[None]], *, task_status=trio.TASK_STATUS_IGNORED
    ):
        """Run the router and deliver every accepted message; call before any peer connects."""
        pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = SUBSCRIPTION_QUEUE
        async with background_trio_service(self.pubsub), background_trio_service(self.router):
            await self.pubsub.wait_until_ready()
            self._subscription = await self.pubsub.subscribe(self.topic)
            task_status.started()
            while True:
                msg = await self._subscription.get()
                await on_message(bytes(msg.data))

    async def publish(self, data: bytes) -> None:
        await self.pubsub.publish(self.topic, data)
