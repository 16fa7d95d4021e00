"""A cluster member that misbehaves on gossip: the agent drops what it sends, logs it, and keeps running."""

from __future__ import annotations

import multiaddr
import trio
from libp2p.peer.id import ID

from p2pinfer.cluster.record import PeerRecord, seal
from p2pinfer.identity import Identity
from p2pinfer.membership import TOPIC
from p2pinfer.net.addrs import parse_peer_addr
from p2pinfer.net.gossip import Gossip
from p2pinfer.net.host import build_host
from tests.harness import new_secret, wait_for


async def _misbehave(target_addr: str, secret: bytes, victim_id: str) -> None:
    me = Identity(b"\x42" * 32)
    host = build_host(me.key_pair, secret, [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")])
    gossip = Gossip(host, TOPIC)

    async def ignore(_data: bytes) -> None:
        pass

    async with trio.open_nursery() as nursery, host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        await nursery.start(gossip.run, lambda forwarder, data: True, ignore)  # we forward anything: a broken peer
        await host.connect(parse_peer_addr(target_addr))
        with trio.fail_after(15):  # until the agent's subscription to the topic has reached us
            while ID.from_base58(victim_id) not in gossip.pubsub.peer_topics.get(TOPIC, set()):
                await trio.sleep(0.1)
        other = Identity(b"\x07" * 32)
        payloads = [
            b"\x00garbage",
            b"\xc1" * 5000,  # msgpack-invalid
            seal(PeerRecord(peer_id=victim_id, seq=2**62), me.signing_key, secret),  # speaking for the victim
            seal(
                PeerRecord(peer_id=other.peer_id.to_base58(), seq=1), other.signing_key, b"\x01" * 32
            ),  # outsider
        ]
        for _ in range(3):
            for p in payloads:
                await gossip.publish(p)
            await trio.sleep(0.5)
        nursery.cancel_scope.cancel()


def test_member_sending_junk_gossip_is_dropped_and_logged(agents):
    secret = new_secret()
    a = agents("a", secret_hex=secret)
    a.wait_ready()
    victim = a.peer_id
    trio.run(_misbehave, a.addr, bytes.fromhex(secret), victim)
    wait_for(lambda: "dropped gossip record" in a.log(), 5, what="a log line for the dropped records")
    log = a.log()
    assert "undecodable record envelope" in log
    assert "signed by" in log  # the record speaking for the victim
    assert "not signed by a cluster member" in log
    assert a.get("/health")["status"] == "ok"
    assert a.view() == {victim}  # the forged record for the victim changed nothing, the outsider is absent
    assert a.get("/v1/cluster")["peers"][0]["seq"] < 2**62
    assert a.proc.poll() is None
    assert "Traceback" not in log
