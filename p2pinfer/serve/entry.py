"""The entry side of a request: elect a ring, open it, stream tokens out, replay on a member's loss.

Runs on whichever peer the client called. Tokens are handed to the caller through a memory
channel, so the HTTP handler consumes at its own pace and leaving early (client gone, stop
string) cancels the ring, which makes every member free its KV session.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass

import numpy as np
import trio

from p2pinfer.cluster.record import PeerRecord
from p2pinfer.cluster.ring import Candidate, ClusterTooSmall, ModelNeeds, RingMember, repair_ring
from p2pinfer.cluster.routing import RouteInputs, route
from p2pinfer.config import DEFAULT_CAPACITY, Capacity
from p2pinfer.engine import ModelEntry
from p2pinfer.engine.sampling import PENALTY_LAST_N
from p2pinfer.serve import protocol as P
from p2pinfer.serve.failures import ROUTE_AROUND, Failure, FailureKind, wire_kind
from p2pinfer.serve.links import Link, LinkClosed, Linker
from p2pinfer.tasks import open_nursery

log = logging.getLogger("p2pinfer.entry")

READY_TIMEOUT = 300.0  # a member may load and compile its shard first
FIRST_TOKEN_TIMEOUT = 120.0
TOKEN_TIMEOUT = 30.0
MAX_REPLAYS = 6  # ring failures in a row without a new token before a request gives up
ELECT_GRACE = 5.0  # seconds a request waits for a ring to fit before 503
REPLAY_BACKOFF = 0.5  # seconds, times the attempt number: the first replay starts at once


class MemberFailed(Exception):
    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"member {peer} failed: {reason}")
        self.peer = peer
        self.reason = reason


@dataclass(frozen=True)
class Generation:
    model: ModelEntry
    prompt: list[int]
    max_new: int
    sampling: dict  # protocol.SAMPLING_KEYS but "recent" (the entry adds it per ring)
    stop_ids: tuple[int, ...]
    request_id: str = ""  # the API's id, so /v1/requests and metrics can follow the ring
    routing: str = "memory"  # cluster/routing.py policy the ring is elected by


@dataclass
class Event:
    kind: str  # "token", "done", "error"
    token: int = 0
    reason: str = ""
    error: Failure | None = None
    logprob: float | None = None
    top: list | None = None  # [[id, logprob], ...]


def model_needs(entry: ModelEntry, kv_tokens: int) -> ModelNeeds:
    """What a ring for `entry` must hold: weights, and `kv_tokens` of KV per member (Capacity.kv_tokens)."""
    return ModelNeeds(
        name=entry.name,
        n_layers=entry.n_layers,
        layer_bytes=entry.layer_bytes,
        embed_bytes=entry.embed_bytes,
        head_bytes=entry.head_bytes,
        kv_bytes_per_token_per_layer=entry.kv_bytes_per_token_per_layer,
        context_tokens=min(entry.context_length, kv_tokens),
    )


def candidates_for(records: list[PeerRecord], entry: ModelEntry) -> list[Candidate]:
    """Peers that compute and have the model's file, or can fetch its weights from a peer that gossips
    them (marked `fetch`: elected after those with the file); layers held warm count as free for it."""
    out = []
    fetchable = any(w[0] == entry.name for r in records for w in r.weights)
    for r in records:
        if not r.can_compute or r.leave or r.draining:
            continue
        has_file = entry.name in r.models
        if not has_file and not (fetchable and r.fetches):
            continue
        warm = tuple(x for x in r.layers if x[0] == entry.name)
        warm_bytes = sum(entry.shard_bytes(s, e) for _, s, e in warm if 0 <= s < e <= entry.n_layers)
        fetch = not has_file and not any(w[0] == entry.name for w in r.weights)
        free = r.memory_free + warm_bytes
        out.append(Candidate(r.peer_id, free, r.active_requests, r.compute, warm, fetch))
    return out


class EntryService:
    def __init__(self, self_id: str, linker: Linker, records: Callable[[], list[PeerRecord]],
                 max_requests: int, capacity: Capacity = DEFAULT_CAPACITY) -> None:  # fmt: skip
        self.self_id = self_id
        self.capacity = capacity
        self.linker = linker
        self.records = records
        self.max_requests = max_requests
        self.draining = False  # set on SIGTERM: requests in flight finish, new ones go to other peers
        self.active = 0
        self.rings: dict[str, list[RingMember]] = {}  # request id -> its current ring, for /v1/cluster
        self.on_ring: Callable[[str, list[RingMember], int], None] = lambda rid, ring, attempt: None
        # measured RTTs and tok/s for the routing policies (set by the orchestration layer)
        self.routing_inputs: Callable[[], RouteInputs | None] = lambda: None

    def needs(self, entry: ModelEntry) -> ModelNeeds:
        return model_needs(entry, self.capacity.kv_tokens)

    def elect(self, entry: ModelEntry, exclude: frozenset[str] = frozenset(),
              routing: str = "memory") -> list[RingMember]:  # fmt: skip
        try:
            # "memory" is ring.py's election; the inputs may ask a retry to avoid a failed ring's peers
            return route(routing, candidates_for(self.records(), entry), self.needs(entry), exclude=exclude,
                         inputs=self.routing_inputs())  # fmt: skip
        except ClusterTooSmall as e:
            raise Failure(FailureKind.UNAVAILABLE, str(e), retry_after=5) from e

    def replacement_ring(self, entry: ModelEntry, previous: list[RingMember], failed: set[str],
                         lost: str, routing: str = "memory") -> list[RingMember]:  # fmt: skip
        """The ring to replay on after `lost` failed: `previous` with only the lost range moved to a
        spare when that fits (survivors keep their warm shards), else a new election."""
        repaired = repair_ring(candidates_for(self.records(), entry), self.needs(entry), previous,
                               frozenset({lost}), exclude=frozenset(failed))  # fmt: skip
        return repaired if repaired is not None else self.elect_avoiding(entry, failed, routing)

    async def _until_a_ring_fits(self, entry: ModelEntry, routing: str) -> list[RingMember]:
        """The request's ring; if none fits, look again for a few seconds before failing: under churn
        room comes back as a restarted peer rejoins or a finished request releases its shards."""
        with trio.move_on_after(ELECT_GRACE):
            while True:
                try:
                    return self.elect(entry, routing=routing)
                except Failure:
                    await trio.sleep(0.5)
        return self.elect(entry, routing=routing)

    def elect_avoiding(self, entry: ModelEntry, failed: set[str],
                       routing: str = "memory") -> list[RingMember]:  # fmt: skip
        """A ring without the members that failed this request; if none fits without them, take back
        those still alive in the view (a broken stream is not a dead peer) before giving up."""
        try:
            return self.elect(entry, frozenset(failed), routing)
        except Failure:
            alive = {r.peer_id for r in self.records()}
            if not failed & alive:
                raise
            log.info("no ring fits without %d failed member(s); retrying those still alive", len(failed))
            return self.elect(entry, frozenset(failed - alive), routing)

    @asynccontextmanager
    async def generate(self, gen: Generation,
                       cancel: trio.CancelScope | None = None) -> AsyncIterator[trio.MemoryReceiveChannel]:  # fmt: skip
        """Yield a channel of Events for `gen`; leaving the block early cancels the ring, and so does
        `cancel` (the channel then ends with a CANCELLED error). A Failure raised here, before the
        block, means no ring fits or this peer takes no more requests: nothing was sent anywhere."""
        if self.draining:
            raise Failure(FailureKind.UNAVAILABLE, "this peer is shutting down: send the request to another peer",
                          retry_after=1)  # fmt: skip
        if self.active >= self.max_requests:
            raise Failure(
                FailureKind.BUSY, f"this peer is serving {self.active} requests, its limit", retry_after=1
            )
        entry = gen.model
        self.active += 1
        rid = gen.request_id or uuid.uuid4().hex
        try:
            ring = await self._until_a_ring_fits(entry, gen.routing)  # the request's one election
            tx, rx = trio.open_memory_channel[Event](1024)
            async with open_nursery() as nursery:  # what the consumer raises comes out as itself
                nursery.start_soon(self._drive, rid, entry, gen, ring, tx, cancel or trio.CancelScope())
                try:
                    yield rx
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self.active -= 1
            self.rings.pop(rid, None)

    async def _drive(self, rid: str, entry: ModelEntry, gen: Generation, ring: list[RingMember],
                     tx: trio.MemorySendChannel, cancel: trio.CancelScope) -> None:  # fmt: skip
        """Run the request to the end, replaying on a new ring when a member is lost."""
        async with tx:
            try:
                with cancel:
                    await self._drive_rings(rid, entry, gen, ring, tx)
                if cancel.cancelled_caught:
                    failure = Failure(FailureKind.CANCELLED, f"request {rid} was cancelled")
                    await tx.send(Event("error", error=failure))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the consumer left (client gone, stop string): nothing more to deliver

    async def _drive_rings(self, rid: str, entry: ModelEntry, gen: Generation, ring: list[RingMember],
                           tx: trio.MemorySendChannel) -> None:  # fmt: skip
        generated: list[int] = []
        excluded: set[str] = set()
        lost = ""
        stalled = 0  # failures in a row with no token in between: a request that progresses never gives up
        for attempt in itertools.count():
            before = len(generated)
            try:
                if lost:
                    ring = self.replacement_ring(entry, ring, excluded, lost, gen.routing)
                elif attempt:
                    ring = self.elect_avoiding(entry, excluded, gen.routing)
                self.rings[rid] = ring
                self.on_ring(rid, ring, attempt)
                if attempt:
                    log.info("request %s: replaying %d prompt + %d generated tokens on ring %s", rid[:12],
                             len(gen.prompt), len(generated), _ring_str(ring))  # fmt: skip
                with first_error():  # the links' nurseries wrap what the ring raises in groups
                    reason = await self._run_ring(f"{rid}-{attempt}", entry, gen, ring, generated, tx)
                await tx.send(Event("done", reason=reason))
                return
            except MemberFailed as e:
                if len(generated) >= gen.max_new:  # every token is here: nothing to replay
                    await tx.send(Event("done", reason="length"))
                    return
                log.warning("request %s: %s", rid[:12], e)
                excluded.add(e.peer)
                lost = e.peer
                stalled = 1 if len(generated) > before else stalled + 1
                if stalled > MAX_REPLAYS:
                    log.warning("request %s: %d rings failed in a row; giving up", rid[:12], stalled)
                    await tx.send(Event("error", error=Failure(FailureKind.UNAVAILABLE,
                        f"{stalled} rings failed in a row without a token; giving up", retry_after=5)))  # fmt: skip
                    return
                # a member still tearing down the last try, or a connection being redialled
                await trio.sleep(min(2.0, REPLAY_BACKOFF * (stalled - 1)))
            except Failure as e:
                await tx.send(Event("error", error=e))
                return

    async def _run_ring(self, rid: str, entry: ModelEntry, gen: Generation, ring: list[RingMember],
                        generated: list[int], tx: trio.MemorySendChannel) -> str:  # fmt: skip
        prompt = np.array(gen.prompt + generated, dtype=np.int32)
        max_new = gen.max_new - len(generated)
        ring_t = tuple((m.peer_id, m.start, m.end) for m in ring)
        sampling = dict(gen.sampling)
        if any(sampling.get(k) not in (None, 0, 0.0) for k in ("frequency_penalty", "presence_penalty")) or \
                sampling.get("repetition_penalty", 1.0) != 1.0:  # fmt: skip
            sampling["recent"] = prompt[-PENALTY_LAST_N:].tolist()  # the last member never sees the ids
        t0 = time.monotonic()
        # streams to every member opened side by side (none when pooled ones are idle)
        for peer, e in (await self.linker.prepare([m.peer_id for m in ring])).items():
            raise MemberFailed(peer, str(e))
        async with AsyncExitStack() as stack:
            controls: list[Link] = []
            for m in ring:
                try:
                    controls.append(await stack.enter_async_context(self.linker.open(m.peer_id)))
                except LinkClosed as e:
                    raise MemberFailed(m.peer_id, str(e)) from e
            report = _reporter(ring_t, self.self_id)
            for i, link in enumerate(controls):
                req = P.OpenRequest(rid=rid, model=entry.name, n_layers=entry.n_layers, ring=list(ring_t), i=i,
                                    sampling=sampling, stop_ids=list(gen.stop_ids), max_new=max_new,
                                    ctx=int(prompt.size) + max_new, report=report)  # fmt: skip
                await self._send(link, req.to_header())
            with trio.move_on_after(READY_TIMEOUT) as scope, first_error():
                async with trio.open_nursery() as nursery:
                    for link in controls:
                        nursery.start_soon(self._expect_ready, link)
            if scope.cancelled_caught:
                raise Failure(FailureKind.TIMEOUT, f"ring members not ready within {READY_TIMEOUT:.0f} s")
            replay = not rid.endswith("-0")  # a replay's wait is what its client sees as a stall
            (log.info if replay else log.debug)(
                "request %s: ring ready in %.2f s", rid, time.monotonic() - t0
            )
            for i, link in enumerate(controls):
                await self._send(link, {"t": P.START}, prompt if i == 0 else None)
            reason = await self._collect(controls, generated, tx, report)
            for link in controls:  # the request is over: members free their sessions, the links stay open
                try:
                    await link.send({"t": P.END})
                    link.reusable = True
                except LinkClosed:
                    pass
            return reason

    async def _send(self, link: Link, header: dict, tensor=None) -> None:
        try:
            await link.send(header, tensor)
        except LinkClosed as e:
            raise MemberFailed(link.peer, str(e)) from e

    async def _expect_ready(self, link: Link) -> None:
        try:
            frame = await link.recv()
        except LinkClosed as e:
            raise MemberFailed(link.peer, str(e)) from e
        kind = frame.header.get("t")
        if kind == P.ERROR and frame.header.get("lost"):  # it cannot reach its neighbour: route around that one
            raise _member_error(link.peer, frame.header)
        if kind == P.ERROR:
            failure, msg = wire_kind(frame.header.get("kind")), str(frame.header.get("msg", ""))
            if failure in ROUTE_AROUND:  # busy or out of memory there: another ring may do
                raise MemberFailed(link.peer, msg)
            raise Failure(failure, f"member {link.peer}: {msg}")
        if kind != P.READY:
            raise MemberFailed(link.peer, f"unexpected {kind!r} instead of ready")

    async def _collect(self, controls: list[Link], generated: list[int], tx: trio.MemorySendChannel,
                       report: int) -> str:  # fmt: skip
        """Tokens come from the reporter (protocol.py); any member's link dropping means that member is lost."""
        finish: list[str] = []
        with first_error():
            async with trio.open_nursery() as nursery:
                for i, link in enumerate(controls):
                    if i != report:
                        nursery.start_soon(self._watch_member, link)
                await self._receive_tokens(controls[report], generated, tx, finish)
                nursery.cancel_scope.cancel()
        return finish[0]

    async def _watch_member(self, link: Link) -> None:
        try:
            frame = await link.recv()
        except LinkClosed as e:
            raise MemberFailed(link.peer, str(e)) from e
        raise _member_error(link.peer, frame.header)

    async def _receive_tokens(self, link: Link, generated: list[int], tx, finish: list[str]) -> None:
        timeout = FIRST_TOKEN_TIMEOUT
        while True:
            with trio.move_on_after(timeout) as scope:
                try:
                    frame = await link.recv()
                except LinkClosed as e:
                    raise MemberFailed(link.peer, str(e)) from e
            if scope.cancelled_caught:
                raise Failure(FailureKind.TIMEOUT, f"ring stalled: no token for {timeout:.0f} s")
            timeout = TOKEN_TIMEOUT
            kind = frame.header.get("t")
            if kind == P.TOK:
                tok = int(frame.header["id"])
                await tx.send(
                    Event("token", token=tok, logprob=frame.header.get("lp"), top=frame.header.get("top"))
                )
                # only once delivered: a send cancelled by a member's failure leaves the token to the replay
                generated.append(tok)
            elif kind == P.DONE:
                finish.append(str(frame.header.get("reason", "stop")))
                return
            else:
                raise _member_error(link.peer, frame.header)


def _reporter(ring: tuple[tuple[str, int, int], ...], self_id: str) -> int:
    """The member that sends the tokens to us: ourselves when we are in the ring (an in-process link; the
    tokens ride the ring's own frames to us), else the last member, as soon as it samples them."""
    return next((i for i, (peer, _, _) in enumerate(ring) if peer == self_id), len(ring) - 1)


def _member_error(peer: str, header: dict) -> MemberFailed:
    """What a member's unexpected frame means: an error naming a lost neighbour blames that neighbour
    (the member itself is fine and only reports it), anything else blames the member."""
    lost = header.get("lost")
    if header.get("t") == P.ERROR and isinstance(lost, str) and lost and lost != peer:
        return MemberFailed(lost, f"reported by {peer[-6:]}: {header.get('msg')}")
    return MemberFailed(peer, f"{header.get('t')}: {header.get('msg')}")


@contextmanager
def first_error():
    """Surface the first Failure or MemberFailed from a nursery's exception group as itself."""
    try:
        yield
    except BaseExceptionGroup as group:
        for kind in (Failure, MemberFailed):
            matched, _ = group.split(kind)
            if matched is not None:
                leaf = matched
                while isinstance(leaf, BaseExceptionGroup):
                    leaf = leaf.exceptions[0]
                raise leaf from None
        raise


def _ring_str(ring: list[RingMember]) -> str:
    return " -> ".join(f"{m.peer_id[-6:]}[{m.start},{m.end})" for m in ring)
