"""One part of an orchestration: an OpenAI-shaped body run to the end on a ring, as a Result.

The body is parsed by the OpenAI routes' own parser (defaults, chat template, stop strings, the
routing extension), the tokens come from EntryService.generate, and the part shows in /v1/requests
like any request, with the task and part it belongs to.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import trio

from p2pinfer.api.openai import (
    BadRequest,
    OpenAIRoutes,
    Parsed,
    RequestCancelled,
    StopMatcher,
    Tracked,
    _message_text,
)
from p2pinfer.serve.entry import Generation, RequestError
from p2pinfer.tasks import open_nursery

RETRYABLE = {429, 500, 502, 503, 504}  # another try (a fresh election) may do
# Peers the ring of the request being started should leave out if it can (a retry after a failed ring).
# Read by the entry's routing inputs (api/orchestrate.py) in the request's own tasks, which inherit it.
AVOID: ContextVar[frozenset[str]] = ContextVar("p2pinfer_avoid", default=frozenset())
ELECTION_GATE = 2.0  # s a part's start waits for the previous part's ring before electing anyway
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


@dataclass
class PartTracked(Tracked):
    task: str = ""
    part: str = ""

    def to_dict(self) -> dict:
        return {**super().to_dict(), "task": self.task, "part": self.part}


@dataclass
class Result:
    id: str
    model: str
    chat: bool
    text: str
    finish: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] = field(default_factory=list)
    ring: list = field(default_factory=list)
    ttft: float | None = None
    elapsed: float = 0.0
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def mean_logprob(self) -> float | None:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else None

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}  # fmt: skip

    def openai_body(self) -> dict:
        """The non-streaming chat.completion / text_completion body (logprobs are not carried)."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": self.text}, "logprobs": None,
                      "finish_reason": self.finish}  # fmt: skip
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": self.text, "logprobs": None, "finish_reason": self.finish}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage()}  # fmt: skip


def chat_messages(messages: object) -> list[dict]:
    """Validated chat messages, as the chat route checks them."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", "messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES:
            raise BadRequest(
                "each message needs a role of system, user, assistant, developer or tool", "messages"
            )
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _message_text(m.get("content"))})
    return out


class Runner:
    def __init__(self, routes: OpenAIRoutes) -> None:
        self.routes = routes
        self.entry = routes.entry
        # Parts elect their rings one at a time, each once the one before has its ring: then the
        # least-loaded policy counts it (RouteInputs.pending) and parts started together spread out.
        self._gate = trio.Semaphore(1)

    async def parse(self, body: dict, chat: bool) -> Parsed:
        """Parse a chat or completions body; BadRequest / UnknownModelError as the OpenAI routes raise."""
        if not isinstance(body, dict):
            raise BadRequest("a request body must be a JSON object")
        body = {**body, "stream": False}
        if chat:
            msgs = chat_messages(body.get("messages"))
            return await self.routes._parse_common(body, lambda tok: tok.render_chat(msgs), chat=True)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string", "prompt")
        return await self.routes._parse_common(body, lambda tok: tok.encode(prompt), chat=False)

    async def run(
        self,
        p: Parsed,
        chat: bool,
        *,
        task: str = "",
        part: str = "",
        on_text: Callable[[str], Awaitable[None]] | None = None,
        want_logprobs: bool = False,
        on_track: Callable[[PartTracked], None] | None = None,
        avoid: frozenset[str] = frozenset(),
    ) -> Result:
        """Generate to the end; RequestError when the request fails (the part is tracked either way)."""
        routes = self.routes
        tokenizer = await routes.tokenizer(p.model)
        sampling = dict(p.sampling)
        if want_logprobs and sampling.get("logprobs") is None:
            sampling["logprobs"] = 0  # the chosen token's logprob only
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        gen = Generation(p.model, p.prompt, p.max_new, sampling, tuple(tokenizer.eos_token_ids), request_id=rid,
                         routing=p.routing)  # fmt: skip
        decoder, stops = tokenizer.decoder(), StopMatcher(p.stops)
        track = PartTracked(rid, p.model, len(p.prompt), task=task, part=part)
        routes.active[rid] = track
        metrics = routes.metrics
        metrics.active.inc()
        metrics.tokens.labels(p.model, "prompt").inc(len(p.prompt))
        if on_track is not None:
            on_track(track)
        parts: list[str] = []
        lps: list[float] = []
        finish, stopped, failure = "stop", False, None

        async def out(text: str) -> None:
            if text:
                parts.append(text)
                if on_text is not None:
                    await on_text(text)

        gate_held = False

        def open_gate() -> None:
            nonlocal gate_held
            if gate_held:
                gate_held = False
                self._gate.release()

        async def open_gate_once_elected() -> None:
            with trio.move_on_after(ELECTION_GATE):
                while not track.ring and track.state == "waiting":
                    await trio.sleep(0.005)
            open_gate()

        avoiding = AVOID.set(frozenset(avoid))
        try:
            await self._gate.acquire()
            gate_held = True
            with track.scope:  # DELETE /v1/requests/{id} cancels this part alone
                async with open_nursery() as nursery:
                    nursery.start_soon(open_gate_once_elected)
                    try:
                        async with self.entry.generate(gen) as events:
                            async for ev in events:
                                if ev.kind == "error":
                                    failure = ev.error
                                    break
                                if ev.kind == "done":
                                    finish = ev.reason
                                    break
                                routes.token_arrived(track)
                                if ev.logprob is not None:
                                    lps.append(float(ev.logprob))
                                text, stopped = stops.feed(decoder.feed(ev.token))
                                await out(text)
                                if stopped:
                                    finish = "stop"
                                    break
                    finally:
                        open_gate()
                        nursery.cancel_scope.cancel()
            if track.scope.cancelled_caught:
                raise RequestCancelled(f"request {rid} was cancelled (DELETE /v1/requests/{rid})")
            if failure is not None:
                raise failure
            if not stopped:
                await out(stops.feed(decoder.flush())[0] + stops.flush())
            track.state, track.finish = "done", finish
        except RequestError as e:
            gone = isinstance(e, RequestCancelled)
            track.state, track.finish = ("cancelled", "cancelled") if gone else ("error", "error")
            raise
        finally:
            open_gate()
            AVOID.reset(avoiding)
            routes.retire(track)
        d = track.to_dict()
        return Result(rid, p.model, chat, "".join(parts), finish, len(p.prompt), track.tokens, lps, track.ring,
                      d["ttft"], d["elapsed"])  # fmt: skip
