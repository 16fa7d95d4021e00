"""One part of an orchestration: an OpenAI-shaped body run to the end on a ring, as a Result.

The body is validated by the OpenAI routes' own models (api/bodies.py), the text comes from serve's
Generator (defaults, chat template, stop strings, the routing extension), and the part shows in
/v1/requests like any request, with the task and part it belongs to.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass, field, replace

import trio

from p2pinfer.api.bodies import parse_body
from p2pinfer.serve.failures import FailureKind
from p2pinfer.serve.generate import Delta, Generator, Prepared, Tracked
from p2pinfer.tasks import open_nursery

RETRYABLE = {FailureKind.BUSY, FailureKind.UNAVAILABLE, FailureKind.TIMEOUT, FailureKind.INTERNAL}  # another try may do
# Peers the ring of the request being started should leave out if it can (a retry after a failed ring).
# Read by the entry's routing inputs (api/orchestrate.py) in the request's own tasks, which inherit it.
AVOID: ContextVar[frozenset[str]] = ContextVar("p2pinfer_avoid", default=frozenset())
ELECTION_GATE = 2.0  # s a part's start waits for the previous part's ring before electing anyway
CHAT_ROLES = ("system", "user", "assistant", "developer", "tool")


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


class Runner:
    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self.entry = generator.entry
        # Parts elect their rings one at a time, each once the one before has its ring: then the
        # least-loaded policy counts it (RouteInputs.pending) and parts started together spread out.
        self._gate = trio.Semaphore(1)

    async def parse(self, body: dict, chat: bool, task: str = "", part: str = "") -> Prepared:
        """A part's body checked and tokenized; a Failure (bad request, unknown model) otherwise."""
        parsed = parse_body({**body, "stream": False} if isinstance(body, dict) else body, chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        return await self.generator.prepare(parsed.to_request(rid, {"task": task, "part": part}))

    async def run(
        self,
        p: Prepared,
        chat: bool,
        *,
        task: str = "",
        part: str = "",
        on_text: Callable[[str], Awaitable[None]] | None = None,
        want_logprobs: bool = False,
        on_track: Callable[[Tracked], None] | None = None,
        avoid: frozenset[str] = frozenset(),
    ) -> Result:
        """Generate to the end; a Failure when the request fails (the part is tracked either way)."""
        p = replace(p, id=("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],  # a retry is a new request
                    tags={**p.tags, "task": task, "part": part})  # fmt: skip
        if want_logprobs and p.logprobs is None:
            p = replace(p, logprobs=0, sampling={**p.sampling, "logprobs": 0})  # the chosen token's only
        texts: list[str] = []
        lps: list[float] = []
        finish = "stop"
        book = self.generator.book
        gate_held = False

        def open_gate() -> None:
            nonlocal gate_held
            if gate_held:
                gate_held = False
                self._gate.release()

        async def open_gate_once_elected() -> None:
            with trio.move_on_after(ELECTION_GATE):
                while p.id not in book.active or (not book.active[p.id].ring and book.active[p.id].state == "waiting"):
                    await trio.sleep(0.005)
            open_gate()

        avoiding = AVOID.set(frozenset(avoid))
        try:
            await self._gate.acquire()
            gate_held = True
            async with open_nursery() as nursery:
                nursery.start_soon(open_gate_once_elected)
                try:
                    async with self.generator.generate(p) as stream:
                        if on_track is not None:
                            on_track(book.active[p.id])
                        async for item in stream:
                            if isinstance(item, Delta):
                                texts.append(item.text)
                                lps.extend(x.logprob for x in item.logprobs)
                                if on_text is not None and item.text:
                                    await on_text(item.text)
                            else:
                                finish = item.reason
                finally:
                    open_gate()
                    nursery.cancel_scope.cancel()
        finally:
            open_gate()
            AVOID.reset(avoiding)
        track = book.get(p.id)
        d = track.to_dict()
        return Result(p.id, p.model.name, chat, "".join(texts), finish, len(p.prompt), track.tokens, lps, track.ring,
                      d["ttft"], d["elapsed"])  # fmt: skip
