"""Gossip simulation: N memberships in ONE process over an in-memory gossipsub model, simulated time.

What runs for real: each peer's p2pinfer.cluster.announce.Announcer (when to send a full record, a
heartbeat or a Want; what a received message changes), its View (highest seq wins, expiry, signed
leave) and the real signed wire bytes (record.py: Ed25519 + membership MAC). Each distinct message
is verified for real once and the result shared by every receiver (verifying the same bytes 100
times would only cost wall time); the per-receiver checks (stale seq, unknown peer) all run.

What is modelled: gossipsub as a mesh of degree D (kept within bounds each 1 s router heartbeat,
like net/gossip.py: D=2 within 1..4), relaying each new message to mesh neighbours except the
sender, a peer's own messages flooded to every peer it is connected to (its mesh and every peer
whose record it holds: the agent dials peers it learns), dedup by message id, IHAVE to 3 random non-mesh peers each router heartbeat with the ids first seen in the
last heartbeat and IWANT of the unknown ones; per-copy latency uniform 0.5-3 ms; each copy lost with
probability --loss. Peers start spread over --spread s; a new peer connects to D random started
peers, which then see a new neighbour (as Membership._watch_neighbours does). Bytes per copy: the
payload plus py-libp2p 0.8.1's overhead measured with its protobufs (RPC + Message with signature,
key, from, seqno, topic, plus its 213-byte sender peer record) + varint + yamux header + Noise frame.

Not modelled: TCP, Noise/yamux flow control and CPU (no load, no stalls), dialling, py-libp2p's
subscription exchange and fanout before the mesh exists, PX, scoring, GRAFT/PRUNE bytes.

Measured: convergence (last start -> every view holds all N), then over a steady window the bytes
sent per peer per second (linear in N means bytes/peer/N constant), message counts and expiries of
live peers (must be 0); then a peer killed silently (time until every view expired it) and a peer
leaving with its signed leave (time until every view dropped it).

Run: python benchmarks/gossip_sim.py [--sizes 10,20,50,100] [--window 30] (about a minute).
"""

from __future__ import annotations

import argparse
import heapq
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import p2pinfer.cluster.announce as announce  # noqa: E402
from p2pinfer.cluster.record import open_message  # noqa: E402
from p2pinfer.identity import Identity  # noqa: E402

D, D_LOW, D_HIGH, GOSSIP_PEERS = 2, 1, 4, 3
ROUTER_HEARTBEAT = 1.0
TTL = 6.0
SECRET = b"\x11" * 32
TOPIC = "p2pinfer/peers/v1"
MSG_ID_BYTES = 46  # from (38) + seqno (8)

_opened: dict[bytes, object] = {}


def _open_shared(data: bytes, secret: bytes):
    """Verify each distinct message once; every receiver gets the same result (or error)."""
    hit = _opened.get(data)
    if hit is None:
        try:
            hit = open_message(data, secret)
        except Exception as e:  # noqa: BLE001 -- replayed to each receiver below
            hit = e
        _opened[data] = hit
    if isinstance(hit, Exception):
        raise hit
    return hit


announce.open_message = _open_shared


def _overheads() -> tuple[int, int, int]:
    """(bytes per published message beyond its data, IHAVE/IWANT fixed bytes, bytes per id)."""
    from libp2p.pubsub.pb import rpc_pb2

    frame = 2 + 12 + 2 + 16  # varint length, yamux header, Noise length + tag
    m = rpc_pb2.Message(data=b"", topicIDs=[TOPIC], from_id=b"p" * 38, seqno=b"s" * 8, signature=b"g" * 64,
                        key=b"k" * 36)  # fmt: skip
    per_msg = rpc_pb2.RPC(publish=[m], senderRecord=b"e" * 213).ByteSize() + 3 + frame
    ihave = rpc_pb2.RPC(
        control=rpc_pb2.ControlMessage(ihave=[rpc_pb2.ControlIHave(topicID=TOPIC, messageIDs=[])]),
        senderRecord=b"e" * 213,
    )
    return per_msg, ihave.ByteSize() + frame, MSG_ID_BYTES + 2


PER_MSG, CONTROL_FIXED, PER_ID = _overheads()


class Node:
    def __init__(self, idx: int, sim: Sim) -> None:
        ident = Identity(idx.to_bytes(4, "big") * 8)
        self.idx, self.sim = idx, sim
        self.peer_id = ident.peer_id.to_base58()
        self.desc = {
            "addrs": (f"/ip4/10.0.{idx // 250}.{idx % 250 + 1}/tcp/52416/p2p/{self.peer_id}",),
            "http_port": 52415, "version": "0.1.0", "memory_total": 16 * 2**30, "memory_free": 8 * 2**30,
            "compute": 100.0, "backend": "tinygrad", "can_compute": True, "models": ("smollm2-135m",),
            "layers": (), "loading": (), "active_requests": 0,
        }  # fmt: skip
        self.ann = announce.Announcer(
            self.peer_id, ident.signing_key, SECRET, lambda: dict(self.desc), TTL,
            rng=random.Random(idx), wall_us=lambda: int(sim.now * 1e6) + 10**15,
        )  # fmt: skip
        self.mesh: set[int] = set()
        self.seen: set[bytes] = set()
        self.recent: list[bytes] = []  # ids first seen since the last router heartbeat
        self.cache: dict[bytes, bytes] = {}
        self.alive = False
        self.started_at = 0.0
        self.wake_at = None
        self.seqno = 0


class Sim:
    def __init__(self, n: int, loss: float, seed: int) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self.loss = loss
        self.q: list = []
        self._n = 0
        self.nodes = [Node(i, self) for i in range(n)]
        self.index = {m.peer_id: m.idx for m in self.nodes}
        self.sent_bytes = [0] * n
        self.counts: dict[str, int] = defaultdict(int)
        self.false_expiries = 0
        self.dead: set[str] = set()

    def at(self, t: float, fn, *args) -> None:
        self._n += 1
        heapq.heappush(self.q, (t, self._n, fn, args))

    def run_until(self, t_end: float, stop=None) -> bool:
        while self.q and self.q[0][0] <= t_end:
            t, _n, fn, args = heapq.heappop(self.q)
            self.now = t
            fn(*args)
            if stop is not None and stop():
                return True
        self.now = t_end
        return False

    # --- peers ------------------------------------------------------------------------------
    def start(self, node: Node) -> None:
        node.alive, node.started_at = True, self.now
        others = [m for m in self.nodes if m.alive and m is not node]
        for m in self.rng.sample(others, min(D, len(others))):
            self.link(node, m)
        self.wake(node, self.now)
        self.at(self.now + self.rng.uniform(0.1, 1.0), self.router_heartbeat, node)

    def link(self, a: Node, b: Node) -> None:
        if b.idx in a.mesh:
            return
        a.mesh.add(b.idx)
        b.mesh.add(a.idx)
        for x in (a, b):
            x.ann.new_neighbour()
            self.wake(x, self.now + 0.001)

    def wake(self, node: Node, t: float) -> None:
        if node.wake_at is None or t < node.wake_at - 1e-9:
            node.wake_at = t
            self.at(t, self.tick, node, t)

    def tick(self, node: Node, t: float) -> None:
        if not node.alive or node.wake_at != t:
            return  # superseded by an earlier wake-up
        node.wake_at = None
        for data in node.ann.tick(self.now):
            self.publish(node, data)
        for pid in node.ann.view.expire(self.now):
            if pid not in self.dead:
                self.false_expiries += 1
        self.wake(node, max(self.now + 0.001, min(node.ann.next_due(), self.now + 0.5)))

    def publish(self, node: Node, data: bytes) -> None:
        node.seqno += 1
        mid = node.idx.to_bytes(38, "big") + node.seqno.to_bytes(8, "big")
        self.counts[type(_open_shared(data, SECRET)).__name__] += 1
        node.seen.add(mid)
        node.recent.append(mid)
        node.cache[mid] = data
        # flood publish: to every connected peer, i.e. the mesh and every peer whose record we hold
        # (the agent dials the peers it learns)
        targets = set(node.mesh) | {self.index[p] for p in node.ann.view._entries if p != node.peer_id}
        for j in targets:
            self.send(node, self.nodes[j], mid, data)

    def send(self, src: Node, dst: Node, mid: bytes, data: bytes) -> None:
        self.sent_bytes[src.idx] += len(data) + PER_MSG
        if self.rng.random() >= self.loss:
            self.at(self.now + self.rng.uniform(0.0005, 0.003), self.deliver, src, dst, mid, data)

    def deliver(self, src: Node, dst: Node, mid: bytes, data: bytes) -> None:
        if not dst.alive or mid in dst.seen:
            return
        try:
            msg = dst.ann.check(data)  # the validator: drop (and do not forward) if invalid or stale
        except Exception:
            return
        dst.seen.add(mid)
        dst.recent.append(mid)
        dst.cache[mid] = data
        try:
            got = dst.ann.receive(msg, self.now)
        except Exception:
            got = None
        if got is not None and got.kind in ("unknown", "other"):
            self.wake(dst, max(self.now + 0.001, dst.ann.next_due()))
        for j in dst.mesh:
            if j != src.idx:
                self.send(dst, self.nodes[j], mid, data)

    def router_heartbeat(self, node: Node) -> None:
        if not node.alive:
            return
        live = [m for m in self.nodes if m.alive and m is not node]
        node.mesh = {j for j in node.mesh if self.nodes[j].alive}
        if len(node.mesh) < D_LOW:
            pool = [m for m in live if m.idx not in node.mesh]
            for m in self.rng.sample(pool, min(D - len(node.mesh), len(pool))):
                self.link(node, m)
        elif len(node.mesh) > D_HIGH:
            for j in self.rng.sample(sorted(node.mesh), len(node.mesh) - D):
                node.mesh.discard(j)
                self.nodes[j].mesh.discard(node.idx)
        ids, node.recent = node.recent, []
        if ids:
            pool = [m for m in live if m.idx not in node.mesh]
            for m in self.rng.sample(pool, min(GOSSIP_PEERS, len(pool))):
                self.sent_bytes[node.idx] += CONTROL_FIXED + PER_ID * len(ids)
                self.counts["ihave"] += 1
                want = [i for i in ids if i not in m.seen and i in node.cache]
                if want:  # IWANT back, then the messages
                    self.sent_bytes[m.idx] += CONTROL_FIXED + PER_ID * len(want)
                    for i in want:
                        self.send(node, m, i, node.cache[i])
        if len(node.cache) > 4 * len(self.nodes):  # mcache history: a few heartbeats
            for i in list(node.cache)[: len(node.cache) // 2]:
                del node.cache[i]
        self.at(self.now + ROUTER_HEARTBEAT, self.router_heartbeat, node)

    def converged(self) -> bool:
        ids = {m.peer_id for m in self.nodes if m.alive}
        return all(len(m.ann.view) == len(ids) for m in self.nodes if m.alive) and all(
            all(p in m.ann.view for p in ids) for m in self.nodes if m.alive
        )


def run(n: int, window: float, spread: float, loss: float, seed: int) -> dict:
    t0 = time.perf_counter()
    sim = Sim(n, loss, seed)
    starts = sorted(sim.rng.uniform(0, spread) for _ in range(n))
    for node, t in zip(sim.nodes, starts, strict=True):
        sim.at(t, sim.start, node)
    last_start = starts[-1]
    sim.run_until(last_start)
    done = sim.run_until(last_start + 30.0, stop=sim.converged)
    conv = sim.now - last_start if done else float("inf")
    # steady state: settle, then count over the window
    sim.run_until(sim.now + 5.0)
    b0, c0, w0 = list(sim.sent_bytes), dict(sim.counts), sim.now
    sim.run_until(w0 + window)
    per_peer = [(b1 - b) / window for b, b1 in zip(b0, sim.sent_bytes, strict=True)]
    counts = {k: (v - c0.get(k, 0)) / window / n for k, v in sim.counts.items()}
    false_exp = sim.false_expiries
    # a peer killed silently, then one leaving with its signed leave
    victim, leaver = sim.nodes[0], sim.nodes[1]
    victim.alive = False
    sim.dead.add(victim.peer_id)
    t_kill = sim.now
    sim.run_until(t_kill + 3 * TTL, stop=lambda: all(victim.peer_id not in m.ann.view for m in sim.nodes if m.alive))
    kill_s = sim.now - t_kill
    sim.dead.add(leaver.peer_id)
    sim.publish(leaver, leaver.ann.leave(sim.now))
    leaver.alive = False
    t_leave = sim.now
    sim.run_until(t_leave + 3 * TTL, stop=lambda: all(leaver.peer_id not in m.ann.view for m in sim.nodes if m.alive))
    return {
        "n": n, "conv": conv, "bps": sum(per_peer) / n, "bps_max": max(per_peer), "counts": counts,
        "false_exp": false_exp + sim.false_expiries - false_exp, "kill_s": kill_s, "leave_s": sim.now - t_leave,
        "wall": time.perf_counter() - t0,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10,20,50,100")
    ap.add_argument("--window", type=float, default=30.0, help="steady-state window, simulated seconds")
    ap.add_argument("--spread", type=float, default=1.0, help="peers start uniformly over this many s")
    ap.add_argument("--loss", type=float, default=0.005, help="probability a copy is lost")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(f"simulated gossip: D={D} ({D_LOW}..{D_HIGH}), TTL {TTL} s, heartbeat "
          f"{announce.heartbeat_interval(TTL)} s, loss {args.loss:.1%}, start spread {args.spread} s; "
          f"per-copy overhead {PER_MSG} B")  # fmt: skip
    print(f"{'N':>4} {'conv s':>7} {'B/s/peer':>9} {'max':>8} {'B/s/peer/N':>11} {'x/N':>5} {'hb/s':>5} "
          f"{'full/s':>7} {'want/s':>7} {'false exp':>9} {'kill->gone s':>12} {'leave->gone s':>13} {'wall s':>6}")  # fmt: skip
    base = None
    for n in [int(s) for s in args.sizes.split(",")]:
        r = run(n, args.window, args.spread, args.loss, args.seed)
        per_n = r["bps"] / n
        base = base or per_n
        c = r["counts"]
        print(
            f"{n:>4} {r['conv']:>7.2f} {r['bps']:>9.0f} {r['bps_max']:>8.0f} {per_n:>11.1f} {per_n / base:>5.2f} "
            f"{c.get('Heartbeat', 0):>5.2f} {c.get('PeerRecord', 0):>7.3f} {c.get('Want', 0):>7.3f} "
            f"{r['false_exp']:>9} {r['kill_s']:>12.2f} {r['leave_s']:>13.3f} {r['wall']:>6.1f}",
            flush=True,
        )
    print("\nconv s: simulated seconds from the last peer's start until every view holds all N. B/s/peer: bytes "
          "sent per peer per simulated second in steady state (payload + py-libp2p framing, IHAVE/IWANT "
          "included); x/N: B/s/peer/N against the smallest N (1.00 = linear). hb/full/want per s: "
          "published per peer per second. false exp: live peers expired from some view (whole run).")  # fmt: skip


if __name__ == "__main__":
    main()
