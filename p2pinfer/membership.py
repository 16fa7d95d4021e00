"""Membership: publish our signed record, verify others' into the View, expire the silent, dial the new.

Joins the pure cluster state (record, View) to the network (gossip, dialer); the agent owns one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import trio
from libp2p.host.ping import PingService
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo

from p2pinfer.cluster.record import PeerRecord, RecordError, open_sealed, seal
from p2pinfer.cluster.view import Rejected, View
from p2pinfer.identity import Identity
from p2pinfer.net.addrs import AddressError, parse_peer_addr
from p2pinfer.net.dialer import Dialer
from p2pinfer.net.gossip import Gossip

log = logging.getLogger("p2pinfer.membership")

TOPIC = "p2pinfer/peers/v1"
PUBLISH_INTERVAL = 1.0
RELAY_SLACK_S = 10.0
PROBE_TIMEOUT = 10.0


class StaleRecord(RecordError):
    def __init__(self, record: PeerRecord, last: int) -> None:
        self.behind_s = (last - record.seq) / 1e6  # seq counts wall-clock microseconds
        super().__init__(
            f"replayed or older record of {record.peer_id} (seq {record.seq} <= {last}, {self.behind_s:.1f} s behind)"
        )


class Membership:
    def __init__(
        self,
        identity: Identity,
        secret: bytes,
        gossip_factory: Callable[[Callable[[str, bytes], bool]], Gossip],
        dialer: Dialer,
        describe: Callable[[], dict],
        ttl: float,
    ) -> None:
        self.identity = identity
        self.peer_id = identity.peer_id.to_base58()
        self._signing_key = identity.signing_key
        self._secret = secret
        self.view = View(self.peer_id, ttl)
        self.dialer = dialer
        self.describe = describe
        self.gossip = gossip_factory(self._validate)
        # Wall-clock microseconds: seq keeps rising across restarts, so peers accept a restarted agent.
        self._seq = time.time_ns() // 1000
        self._changed = trio.Event()
        self._leaving = False
        self._probed_at: dict[str, float] = {}
        self._rejections: dict[str, float] = {}
        self.changed_at = time.monotonic()

    # --- our record -------------------------------------------------------
    def _next_record(self, leave: bool = False) -> PeerRecord:
        self._seq = max(self._seq + 1, time.time_ns() // 1000)
        return PeerRecord(peer_id=self.peer_id, seq=self._seq, leave=leave, **self.describe())

    def poke(self) -> None:
        """Something in our record changed: publish now rather than at the next tick."""
        self._changed.set()

    async def publish_now(self, leave: bool = False) -> None:
        record = self._next_record(leave)
        self.view.apply(record, time.monotonic())
        await self.gossip.publish(seal(record, self._signing_key, self._secret))

    # --- their records ----------------------------------------------------
    def _log_drop(self, source: str, reason: Exception) -> None:
        # one line per source and kind of fault every 10 s: a misbehaving peer cannot flood the log
        key, now = f"{source}:{type(reason).__name__}:{str(reason)[:24]}", time.monotonic()
        if now - self._rejections.get(key, -1e9) > 10:
            self._rejections[key] = now
            log.warning("dropped gossip record from %s: %s", source, reason)

    def _check(self, data: bytes) -> PeerRecord:
        record = open_sealed(data, self._secret)
        last = self.view.high_seq(record.peer_id)
        if record.peer_id != self.peer_id and last is not None and record.seq <= last:
            raise StaleRecord(record, last)
        return record

    def _validate(self, forwarder: str, data: bytes) -> bool:
        """gossipsub validator: an invalid record is neither delivered nor forwarded."""
        try:
            self._check(data)
            return True
        except StaleRecord as e:
            # gossipsub relays recent messages late by design (IWANT, replays to new peers): a record
            # a few seconds behind is routine; one far behind is a replay worth a line.
            if e.behind_s > RELAY_SLACK_S:
                self._log_drop(forwarder, e)
            else:
                log.debug("dropped late relay from %s: %s", forwarder, e)
            return False
        except RecordError as e:
            self._log_drop(forwarder, e)
            return False

    async def on_message(self, data: bytes) -> None:
        try:
            record = open_sealed(data, self._secret)
            if record.peer_id == self.peer_id:
                return
            changed = self.view.apply(record, time.monotonic())
        except (RecordError, Rejected) as e:
            log.debug("dropped record on delivery: %s", e)  # raced with a newer one: normal
            return
        if record.leave:
            log.info("peer %s left the cluster", record.peer_id)
            self.dialer.forget(ID.from_base58(record.peer_id))
        else:
            if changed:
                log.info("peer %s joined the view (%d peers)", record.peer_id, len(self.view))
            self._dial_learned(record)
        if changed:
            self.changed_at = time.monotonic()

    def _dial_learned(self, record: PeerRecord) -> None:
        infos = []
        for a in record.addrs:
            try:
                infos.append(parse_peer_addr(a))
            except AddressError:
                continue
        infos = [i for i in infos if str(i.peer_id) == record.peer_id]
        if infos:
            self.dialer.want(PeerInfo(infos[0].peer_id, [a for i in infos for a in i.addrs]), "gossip")

    # --- loops ------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.gossip.run, self.on_message)
            task_status.started()
            last_tick = time.monotonic()
            while True:
                try:
                    if not self._leaving:
                        await self.publish_now()
                except Exception as e:  # no peers yet, or a closing stream: next tick retries
                    log.debug("publish failed: %s", e)
                now = time.monotonic()
                # If this loop itself was stalled, the silence is ours, not theirs: wait a tick for
                # the queued records before declaring anyone gone.
                stalled = now - last_tick > 3 * PUBLISH_INTERVAL
                last_tick = now
                if not stalled:
                    self._probe_quiet_connections(nursery, now)
                for pid in [] if stalled else self.view.expire(now):
                    log.info("peer %s expired from the view (silent > %.0f s)", pid, self.view.ttl)
                    self.dialer.forget(ID.from_base58(pid))
                    self.changed_at = time.monotonic()
                self._changed = trio.Event()
                with trio.move_on_after(PUBLISH_INTERVAL):
                    await self._changed.wait()

    def _probe_quiet_connections(self, nursery: trio.Nursery, now: float) -> None:
        """A directly connected peer whose records stopped for half the TTL may sit on a connection
        py-libp2p still lists but that no longer carries streams: ping it, and only if the ping
        fails, close the connection so the dialler redials. (Closing on silence alone made an
        overloaded cluster churn.)"""
        connected = self.dialer.connected_peers()
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
        peer = ID.from_base58(record.peer_id)
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                await PingService(self.dialer.host).ping(peer)
            return
        except Exception as e:
            log.info("connected peer %s is silent and does not answer ping (%s): reconnecting",
                     record.peer_id, type(e).__name__)  # fmt: skip
        with trio.move_on_after(2):
            await self.dialer.host.get_network().close_peer(peer)
        self._dial_learned(record)

    async def leave(self) -> None:
        """Tell every peer we are going, so they drop us at once instead of after the TTL."""
        self._leaving = True  # no regular record may follow the leave and undo it
        with trio.move_on_after(1.0):
            await self.publish_now(leave=True)
            await trio.sleep(0.3)  # let the routers flush the message before connections close

    def snapshot(self) -> list[dict]:
        now = time.monotonic()
        connected = self.dialer.connected_peers()
        out = []
        for e in self.view.entries():
            d = dataclasses.asdict(e.record)
            d["age"] = round(now - e.received_at, 2)
            d["connected"] = e.record.peer_id in connected
            d["self"] = e.record.peer_id == self.peer_id
            out.append(d)
        return out
