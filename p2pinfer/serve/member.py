"""The member side of a ring: receive, forward through our layers, pass on; the last member samples.

A member trusts the ring in the entry's open header, not its own view, so views that differ for a
moment cannot split a request. A request lives as long as its use of the control link: when the entry
ends it (`end`: finished; `cancel` or closing it: cancelled, client gone) or dies, the member stops and
frees its KV session. A use that ended cleanly leaves the link open for the next request (protocol.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import trio

from p2pinfer.engine import (
    ContextLimitError,
    EngineError,
    ModelCatalog,
    Sampler,
    SamplingParams,
    SessionLimitError,
    Shard,
    UnknownModelError,
)
from p2pinfer.net.wire import Frame
from p2pinfer.serve import protocol as P
from p2pinfer.serve.failures import FailureKind as F
from p2pinfer.serve.links import Link, LinkClosed, Linker
from p2pinfer.serve.shards import ShardHost
from p2pinfer.tasks import open_nursery

log = logging.getLogger("p2pinfer.member")

class _Trace:
    """Per-step timestamps of every ring part, for benchmarks/ring.py --trace (P2PINFER_RING_TRACE=<dir>):
    a JSON line per part in <dir>/<pid>.jsonl. time.perf_counter is CLOCK_MONOTONIC, so one machine's
    processes share its clock and a hop can be followed from one member to the next."""

    def __init__(self, directory: str) -> None:
        self.path = Path(directory) / f"{os.getpid()}.jsonl"
        self.parts: dict[str, list] = {}

    def mark(self, rid: str, what: str, t: float | None = None) -> None:
        self.parts.setdefault(rid, []).append((what, time.perf_counter() if t is None else t))

    async def forward(self, shards: ShardHost, shard: Shard, rid: str, x: np.ndarray, frame: Frame | None):
        if frame is not None:
            self.mark(rid, "in", frame.at)  # its stream's reader had it
            self.mark(rid, "got")  # the request's task has it
        self.mark(rid, "call")
        times: list[float] = []

        def forward(*args):
            times.append(time.perf_counter())
            try:
                return shard.forward(*args)
            finally:
                times.append(time.perf_counter())

        out = await shards.compute(forward, rid, x)
        self.mark(rid, "t0", times[0])
        self.mark(rid, "t1", times[1])
        self.mark(rid, "back")
        return out

    def dump(self, req: P.OpenRequest) -> None:
        events = self.parts.pop(req.rid, [])
        with open(self.path, "a") as f:
            f.write(json.dumps({"rid": req.rid, "i": req.index, "k": len(req.ring), "report": req.reporter,
                                "events": events}) + "\n")


TRACE = _Trace(os.environ["P2PINFER_RING_TRACE"]) if os.environ.get("P2PINFER_RING_TRACE") else None

INBOUND_TIMEOUT = 30.0  # the previous member connects right after `start`
LINGER_TIMEOUT = 30.0  # how long a finished member waits for the entry to end the request
END_GRACE = 5.0  # how long after `end` a member's part may take to pass the ring's done on
DRAIN_TIMEOUT = 5.0  # how long the last member waits for the done that comes round to it


def _error(kind: F, msg: str, **extra) -> dict:
    return {"t": P.ERROR, "kind": kind.value, "msg": msg, **extra}


async def _no_resolve(name: str) -> None:
    """Without serve/fetch.py a model is known only from a local file."""


class NeighbourLost(Exception):
    """The member before or after us in the ring is gone: the entry must route around *it*, not us."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"neighbour {peer} lost: {reason}")
        self.peer = peer


class _Blaming(Link):
    """A link to a ring neighbour whose failure names the neighbour (our control link's does not)."""

    def __init__(self, link: Link) -> None:
        self.link, self.peer = link, link.peer

    async def send(self, header: dict, tensor: np.ndarray | None = None) -> None:
        try:
            await self.link.send(header, tensor)
        except LinkClosed as e:
            raise NeighbourLost(self.peer, str(e)) from e

    async def recv(self):
        try:
            return await self.link.recv()
        except LinkClosed as e:
            raise NeighbourLost(self.peer, str(e)) from e

    async def aclose(self) -> None:
        await self.link.aclose()


@dataclass
class _Active:
    req: P.OpenRequest
    inbound: Link | None = None
    inbound_ready: trio.Event = field(default_factory=trio.Event)
    inbound_done: bool = False  # the ring's done was read from it: it may carry another request
    ended: trio.Event = field(default_factory=trio.Event)  # the entry sent `end`
    done: trio.Event = field(default_factory=trio.Event)


class Member:
    def __init__(self, catalog: ModelCatalog, shards: ShardHost, linker: Linker, on_change=lambda: None,
                 can_compute: bool = True, resolve_model=None) -> None:  # fmt: skip
        self.catalog = catalog
        self.can_compute = can_compute
        self.draining = False  # set on SIGTERM: parts in flight finish, no new ones start
        self.shards = shards
        self.linker = linker
        self.on_change = on_change
        self._active: dict[str, _Active] = {}
        self._registered: dict[str, trio.Event] = {}
        # serve/fetch.py: a catalog entry for a model known only from peers (its header fetched)
        self.resolve_model = resolve_model or _no_resolve

    @property
    def active_requests(self) -> int:
        return len(self._active)

    async def handle(self, link: Link) -> bool:
        """Every use of an incoming ring link starts here; its first frame says what it is. True: the use
        ended cleanly and the link may carry another (links.py answers `idle`)."""
        first = await link.recv()
        kind = first.header.get("t")
        if kind == P.OPEN:
            return await self._serve_control(link, first.header)
        if kind == P.DATA:
            return await self._serve_data(link, str(first.header.get("rid", "")))
        if kind == P.PING:
            return True  # its opener checks that a pooled link still works
        log.warning("dropping ring link from %s: unexpected first frame %r", link.peer, kind)
        return False

    # --- data links: hand them to the request they belong to ---------------
    async def _serve_data(self, link: Link, rid: str) -> bool:
        with trio.move_on_after(INBOUND_TIMEOUT):
            while rid not in self._active:
                ev = self._registered.setdefault(rid, trio.Event())
                await ev.wait()
        active = self._active.get(rid)
        if active is None or active.inbound is not None:
            log.warning(
                "dropping data link from %s for unknown or already linked request %s", link.peer, rid[:12]
            )
            return False
        active.inbound = link
        active.inbound_ready.set()
        await active.done.wait()  # keep the stream open while the request uses it
        return active.inbound_done

    async def _wait_inbound(self, active: _Active) -> Link:
        with trio.move_on_after(INBOUND_TIMEOUT):
            await active.inbound_ready.wait()
            return _Blaming(active.inbound)
        req = active.req
        raise NeighbourLost(req.ring[req.index - 1][0], f"it never connected for request {req.rid[:12]}")

    # --- control link: the whole life of our part of a request -------------
    async def _serve_control(self, control: Link, header: dict) -> bool:
        """Our part of one request; True when the entry ended it with `end` (the link may be reused)."""
        try:
            req = P.OpenRequest.from_header(header)
        except P.ProtocolError as e:
            await control.send(_error(F.BAD_REQUEST, str(e)))
            return False
        if not self.can_compute:
            await control.send(_error(F.UNAVAILABLE, "this peer is a gateway (--no-compute)"))
            return False
        if self.draining:
            await control.send(_error(F.UNAVAILABLE, "this peer is shutting down"))
            return False
        try:
            params = SamplingParams(**req.sampling_fields(), stop_token_ids=tuple(req.stop_ids))
        except (TypeError, ValueError) as e:
            await control.send(_error(F.BAD_REQUEST, f"bad sampling parameters: {e}"))
            return False
        if req.rid in self._active:
            await control.send(_error(F.CONFLICT, "duplicate request id"))
            return False
        try:
            await self.resolve_model(req.model)
            entry = self.catalog.get(req.model)
        except UnknownModelError as e:
            # a peer that fetches weights may just not have heard of the model's holders yet: not fatal
            await control.send(_error(F.UNAVAILABLE if self.resolve_model is not _no_resolve else F.UNKNOWN_MODEL,
                                      str(e)))  # fmt: skip
            return False
        except EngineError as e:  # its header could not be fetched from peers: another ring may do
            await control.send(_error(F.UNAVAILABLE, f"cannot get {req.model}: {e}"))
            return False
        if entry.n_layers != req.n_layers:
            await control.send(_error(F.CONFLICT, f"{req.model} has {entry.n_layers} layers here"))
            return False
        try:
            shard = await self.shards.acquire(entry, req.start, req.end)
        except EngineError as e:
            await control.send(_error(F.UNAVAILABLE, f"cannot load layers: {e}"))
            return False
        active = _Active(req)
        try:
            try:
                await self.shards.compute(shard.open_session, req.rid, req.ctx)
            except (SessionLimitError, ContextLimitError) as e:
                await control.send(_error(F.BUSY, str(e)))
                return False
            self._active[req.rid] = active
            self._registered.pop(req.rid, trio.Event()).set()
            self.on_change()
            if len(req.ring) > 1:  # our data link's stream, opened while the others get ready, not after start
                for peer, e in (await self.linker.prepare([req.peer_after()])).items():
                    raise NeighbourLost(peer, str(e))
            await control.send({"t": P.READY})
            start = await control.recv()
            if start.header.get("t") != P.START:
                return False
            await self._run(control, active, shard, start.tensor, params)
        except LinkClosed as e:
            log.info("request %s: our part ended early: %s", req.rid[:12], e)
        except NeighbourLost as e:
            # tell the entry whom to route around; closing silently would make it blame us
            log.info("request %s: our part ended early: %s", req.rid[:12], e)
            with trio.move_on_after(2):
                try:
                    await control.send(_error(F.UNAVAILABLE, str(e), lost=e.peer))
                except LinkClosed:
                    pass
        except EngineError as e:
            log.warning("request %s failed in the engine: %s", req.rid[:12], e)
            with trio.move_on_after(2):
                try:
                    await control.send(_error(F.INTERNAL, f"engine error: {e}"))
                except LinkClosed:
                    pass
        finally:
            self._active.pop(req.rid, None)
            self._registered.pop(req.rid, None)
            if TRACE is not None:
                TRACE.dump(req)
            active.done.set()
            with trio.CancelScope(shield=True):
                await self.shards.compute(shard.close_session, req.rid)
            self.shards.release(shard)
            self.on_change()
        return active.ended.is_set()

    async def _run(self, control: Link, active: _Active, shard: Shard, prompt: np.ndarray | None,
                   params: SamplingParams) -> None:  # fmt: skip
        req = active.req
        async with open_nursery() as nursery:

            async def watch_control() -> None:
                # cancel, or the entry's loss, ends our part at once; end lets it pass the ring's done on first
                try:
                    while (kind := (await control.recv()).header.get("t")) != P.CANCEL:
                        if kind == P.END:
                            active.ended.set()
                            await trio.sleep(END_GRACE)
                            break
                except LinkClosed:
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_control)
            if len(req.ring) == 1:
                await self._run_single(control, req, shard, prompt, params)
            else:
                async with AsyncExitStack() as stack:
                    try:
                        out = _Blaming(await stack.enter_async_context(self.linker.open(req.peer_after())))
                    except LinkClosed as e:
                        raise NeighbourLost(req.peer_after(), str(e)) from e
                    await out.send({"t": P.DATA, "rid": req.rid})
                    if req.is_first:
                        await self._run_first(control, active, shard, prompt, out)
                    elif req.is_last:
                        await self._run_last(control, active, shard, out, params)
                        await self._drain(active)
                    else:
                        await self._run_middle(control, active, shard, out)
                    out.link.reusable = True  # our part ended by passing the ring's done on
            # Our part is done, but the entry alone ends the request: a control link closing early
            # would look to it like a lost member. watch_control ends us when the entry says so.
            with trio.move_on_after(LINGER_TIMEOUT):
                await active.ended.wait()
            nursery.cancel_scope.cancel()

    @staticmethod
    async def _drain(active: _Active) -> None:
        """The last member ends its part by sampling the end, before the ring's done comes round to it:
        read that done, so the link it comes on is clean for another request."""
        if active.inbound is None or active.inbound_done:
            return
        with trio.move_on_after(DRAIN_TIMEOUT):
            try:
                while (await active.inbound.recv()).header.get("t") != P.DONE:
                    pass
                active.inbound_done = True
            except LinkClosed:
                pass

    def _check_prompt(self, prompt: np.ndarray | None) -> np.ndarray:
        if prompt is None or prompt.ndim != 1 or prompt.size == 0 or prompt.dtype != np.int32:
            raise EngineError("start frame lacks a 1-D int32 prompt")
        return prompt

    async def _run_single(self, control: Link, req: P.OpenRequest, shard: Shard, prompt, params) -> None:
        sampler = Sampler(params)
        logits = await self._forward(shard, req.rid, self._check_prompt(prompt))
        for n in range(1, req.max_new + 1):
            tok = sampler.sample(logits)
            # (Starting the next forward before the entry hears of the token measured no faster: the
            # engine's thread needs the GIL to start, and the entry's streaming holds it meanwhile.)
            if await self._emit(control, sampler, tok, n, req.max_new):
                return
            logits = await self._forward(shard, req.rid, np.array([tok], dtype=np.int32))

    async def _forward(self, shard: Shard, rid: str, x: np.ndarray, frame: Frame | None = None) -> np.ndarray:
        if TRACE is None:
            return await self.shards.forward(shard, rid, x)
        return await TRACE.forward(self.shards, shard, rid, x, frame)

    async def _pass_on(self, out: Link, rid: str, header: dict, tensor: np.ndarray | None = None) -> None:
        await out.send(header, tensor)
        if TRACE is not None:
            TRACE.mark(rid, "sent")

    def _sampled(self, sampler: Sampler, tok: int) -> dict:
        """The token fields of a sampled token, as tok frames and h headers carry them."""
        fields: dict = {"id": tok}
        if sampler.params.logprobs is not None:
            fields["lp"], fields["top"] = sampler.last_logprob, [list(x) for x in sampler.last_top]
        return fields

    async def _emit(self, control: Link, sampler: Sampler, tok: int, n: int, max_new: int) -> bool:
        """Send a sampled token to the entry; True when the request is finished."""
        if sampler.is_stop(tok):
            await control.send({"t": P.DONE, "reason": "stop"})
            return True
        await control.send({"t": P.TOK, **self._sampled(sampler, tok)})
        if n >= max_new:
            await control.send({"t": P.DONE, "reason": "length"})
            return True
        return False

    async def _report(self, control: Link, req: P.OpenRequest, header: dict) -> None:
        """As the reporter, pass a token (and the end) that came around the ring on to the entry."""
        if not req.is_reporter:
            return
        fields = self._fields(header)
        if fields:
            await control.send({"t": P.TOK, **fields})
        if header.get("t") == P.DONE:
            await control.send({"t": P.DONE, "reason": "length" if header.get("reason") == "length" else "stop"})

    @staticmethod
    def _fields(header: dict) -> dict:
        try:
            return P.token_fields(header)
        except P.ProtocolError as e:
            raise LinkClosed(str(e)) from None

    async def _run_first(self, control: Link, active: _Active, shard: Shard, prompt, out: Link) -> None:
        req = active.req
        rid, prompt = req.rid, self._check_prompt(prompt)
        for lo in range(0, prompt.size, P.WIRE_PREFILL_CHUNK):
            chunk = prompt[lo : lo + P.WIRE_PREFILL_CHUNK]
            hidden = await self._forward(shard, rid, chunk)
            await out.send({"t": P.HIDDEN, "last": lo + chunk.size >= prompt.size}, hidden)
        inbound = await self._wait_inbound(active)
        carry = req.reporter > req.index  # the token rides on towards the reporter
        while True:
            frame = await inbound.recv()
            kind = frame.header.get("t")
            if kind == P.DONE:
                active.inbound_done = True
                await out.send(frame.header)
                await self._report(control, req, frame.header)
                return
            if kind != P.TOK:
                raise LinkClosed(f"unexpected frame {kind!r} on the token link")
            fields = self._fields(frame.header)
            if not fields:
                raise LinkClosed("a tok frame without a token id")
            hidden = await self._forward(shard, rid, np.array([fields["id"]], dtype=np.int32), frame)
            await self._pass_on(out, rid, {"t": P.HIDDEN, "last": True, **fields} if carry else
                                {"t": P.HIDDEN, "last": True}, hidden)  # fmt: skip
            # after our frame is on its way: the entry (in this process when we report) then streams the
            # token to its client while we wait for the next one, off the ring's critical path
            await self._report(control, req, frame.header)

    async def _next_hidden(self, inbound: Link) -> Frame:
        """The next h frame, or the done frame that ends the request."""
        frame = await inbound.recv()
        kind = frame.header.get("t")
        if kind == P.DONE:
            return frame
        if kind != P.HIDDEN or frame.tensor is None:
            raise LinkClosed(f"unexpected frame {kind!r} on the hidden-state link")
        return frame

    async def _run_middle(self, control: Link, active: _Active, shard: Shard, out: Link) -> None:
        req = active.req
        inbound = await self._wait_inbound(active)
        carry = req.reporter > req.index
        while (frame := await self._next_hidden(inbound)).header.get("t") != P.DONE:
            hidden = await self._forward(shard, req.rid, frame.tensor, frame)
            header = {"t": P.HIDDEN, "last": bool(frame.header.get("last"))}
            if carry:
                header.update(self._fields(frame.header))
            await self._pass_on(out, req.rid, header, hidden)
            await self._report(control, req, frame.header)  # off the critical path, as in _run_first
        active.inbound_done = True
        await out.send(frame.header)
        await self._report(control, req, frame.header)

    async def _run_last(self, control: Link, active: _Active, shard: Shard, out: Link, params) -> None:
        req = active.req
        sampler = Sampler(params)
        inbound = await self._wait_inbound(active)
        n = 0
        while (frame := await self._next_hidden(inbound)).header.get("t") != P.DONE:
            logits = await self._forward(shard, req.rid, frame.tensor, frame)
            if not frame.header.get("last"):
                continue  # a prompt chunk before the last one: nothing to sample yet
            n += 1
            tok = sampler.sample(logits)
            if sampler.is_stop(tok):
                end = {"t": P.DONE, "reason": "stop"}
            elif n >= req.max_new:
                end = {"t": P.DONE, "reason": "length", **self._sampled(sampler, tok)}
            else:  # the ring's frame first: it is the next step's critical path, the entry's copy is not
                await self._pass_on(out, req.rid, {"t": P.TOK, **self._sampled(sampler, tok)})
                if req.is_reporter:
                    await control.send({"t": P.TOK, **self._sampled(sampler, tok)})
                continue
            await out.send(end)
            if req.is_reporter:
                await self._report(control, req, end)
            return
