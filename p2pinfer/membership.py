"""Membership: gossip our signed record and heartbeats, verify others' into the View, expire the
silent, dial the new.

Joins the pure protocol state (cluster/announce.py: what to send when, what a message changes) to
the network (net/gossip.py, and net/keeper.py for dialling and repairing connections); the agent
owns one. No libp2p here: peers are base58 strings.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import trio

from p2pinfer.cluster.announce import Announcer, StaleRecord
from p2pinfer.cluster.record import Heartbeat, PeerRecord, RecordError, Want
from p2pinfer.cluster.view import Rejected
from p2pinfer.identity import Identity
from p2pinfer.net.gossip import Gossip
from p2pinfer.net.keeper import Keeper

log = logging.getLogger("p2pinfer.membership")

TOPIC = "p2pinfer/peers/v1"
MAX_WAKE = 0.5  # the loop looks at new gossip neighbours and expiries at least this often
_CHECKED_CACHE = 256


class Membership:
    def __init__(
        self,
        identity: Identity,
        secret: bytes,
        gossip: Gossip,
        keeper: Keeper,
        describe: Callable[[], dict],
        ttl: float,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id.to_base58()
        self.announcer = Announcer(self.peer_id, identity.signing_key, secret, describe, ttl)
        self.view = self.announcer.view
        self.keeper = keeper
        self.describe = describe
        self.gossip = gossip
        self._changed = trio.Event()
        self._probed_at: dict[str, float] = {}
        self._rejections: dict[str, float] = {}
        # the validator already verified these bytes: delivery takes the result instead of verifying again
        self._checked: OrderedDict[bytes, PeerRecord | Heartbeat | Want] = OrderedDict()
        self._neighbours: set[str] = set()
        self.changed_at = time.monotonic()

    # --- our record -------------------------------------------------------
    def poke(self) -> None:
        """Something in our record (or our load) changed: publish now rather than at the next tick."""
        self.announcer.poke()
        self._changed.set()

    async def _publish(self, messages: list[bytes]) -> None:
        for data in messages:
            try:
                await self.gossip.publish(data)
            except Exception as e:  # no peers yet, or a closing stream: the next heartbeat follows
                log.debug("publish failed: %s", e)

    # --- their records ----------------------------------------------------
    def _log_drop(self, source: str, reason: Exception) -> None:
        # one line per source and kind of fault every 10 s: a misbehaving peer cannot flood the log
        key, now = f"{source}:{type(reason).__name__}:{str(reason)[:24]}", time.monotonic()
        if now - self._rejections.get(key, -1e9) > 10:
            self._rejections[key] = now
            log.warning("dropped gossip record from %s: %s", source, reason)

    def _validate(self, forwarder: str, data: bytes) -> bool:
        """gossipsub validator: an invalid or stale message is neither delivered nor forwarded."""
        try:
            msg = self.announcer.check(data)
        except StaleRecord as e:
            # gossipsub relays recent messages late by design (IHAVE/IWANT, replays to new peers), and
            # after a restart old messages come round again: routine, never worth a warning.
            log.debug("dropped late relay from %s: %s", forwarder, e)
            return False
        except RecordError as e:
            self._log_drop(forwarder, e)  # bad signature, non-member, a record naming another peer, junk
            return False
        self._checked[data] = msg
        if len(self._checked) > _CHECKED_CACHE:
            self._checked.popitem(last=False)
        return True

    async def on_message(self, data: bytes) -> None:
        msg = self._checked.pop(data, None)
        try:
            if msg is None:
                msg = self.announcer.check(data)
            got = self.announcer.receive(msg, time.monotonic())
        except (RecordError, Rejected) as e:
            log.debug("dropped message on delivery: %s", e)  # raced with a newer one: normal
            return
        if got.kind == "left":
            log.info("peer %s left the cluster", got.record.peer_id)
            self.keeper.forget(got.record.peer_id)
        elif got.kind in ("joined", "updated"):
            if got.kind == "joined":
                log.info("peer %s joined the view (%d peers)", got.record.peer_id, len(self.view))
            self._dial_learned(got.record)
        if got.kind in ("joined", "left"):
            self.changed_at = time.monotonic()
        if (
            got.kind in ("unknown", "other", "refreshed")
            and self.announcer.next_due() < time.monotonic() + MAX_WAKE
        ):
            self._changed.set()  # a Want to send or to answer

    def _dial_learned(self, record: PeerRecord) -> None:
        self.keeper.want_addrs(record.peer_id, record.addrs, "gossip")

    # --- loops ------------------------------------------------------------
    def _watch_neighbours(self) -> None:
        topic_peers = self.gossip.topic_peers()
        if topic_peers - self._neighbours:
            self.announcer.new_neighbour()
        self._neighbours = topic_peers

    def quiet_for(self, peer_id: str) -> float:
        """Seconds since a record or heartbeat of `peer_id` arrived (infinite if never)."""
        return self.view.quiet_for(peer_id, time.monotonic())

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.gossip.run, self._validate, self.on_message)
            task_status.started()
            interval = self.announcer.interval
            last_tick = time.monotonic()
            while True:
                self._changed = trio.Event()
                self._watch_neighbours()
                now = time.monotonic()
                await self._publish(self.announcer.tick(now))
                # If this loop itself was stalled, the silence is ours, not theirs: wait a tick for
                # the queued messages before declaring anyone gone.
                stalled = now - last_tick > 3 * interval
                last_tick = now
                if not stalled:
                    self._probe_quiet_connections(nursery, now)
                for pid in [] if stalled else self.view.expire(now):
                    log.info("peer %s expired from the view (silent > %.0f s)", pid, self.view.ttl)
                    self.keeper.forget(pid)
                    self.changed_at = time.monotonic()
                wait = min(MAX_WAKE, self.announcer.next_due() - time.monotonic())
                # Always a checkpoint, even with nothing to wait for: a loop that never yields takes the
                # thread from every other task and can never be cancelled.
                with trio.move_on_after(max(wait, 0)):
                    await self._changed.wait()

    def _probe_quiet_connections(self, nursery: trio.Nursery, now: float) -> None:
        """A directly connected peer whose records stopped for half the TTL may sit on a connection
        py-libp2p still lists but that no longer carries streams: the keeper pings it and closes it
        only if the ping fails on the connection; then we want it dialled again."""
        connected = self.keeper.connected_peers()
        for e in self.view.entries():
            pid = e.record.peer_id
            quiet = now - e.received_at > self.view.ttl / 2
            if pid == self.peer_id or pid not in connected or not quiet:
                continue
            if now - self._probed_at.get(pid, -1e9) < self.view.ttl:
                continue
            self._probed_at[pid] = now
            nursery.start_soon(self._probe, e.record)

    async def _probe(self, record: PeerRecord) -> None:
        failed = await self.keeper.repair(record.peer_id)
        if failed:
            log.info("connected peer %s is silent and its connection failed (%s): reconnecting",
                     record.peer_id, failed)  # fmt: skip
            self._dial_learned(record)

    async def leave(self) -> None:
        """Tell every peer we are going, so they drop us at once instead of after the TTL."""
        data = self.announcer.leave(time.monotonic())  # no regular message may follow the leave
        with trio.move_on_after(1.0):
            await self._publish([data])
            await trio.sleep(0.3)  # let the routers flush the message before connections close

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        connected = self.keeper.connected_peers()
        out = []
        for e in self.view.entries():
            d = dataclasses.asdict(e.record)
            d["age"] = round(now - e.received_at, 2)
            d["connected"] = e.record.peer_id in connected
            d["self"] = e.record.peer_id == self.peer_id
            out.append(d)
        return out
