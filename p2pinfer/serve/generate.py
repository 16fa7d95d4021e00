"""The request path in one call: text in, text out, whatever ring serves it.

    prepared = await generator.prepare(TextRequest(model, ChatPrompt(messages), max_tokens=64))
    async with generator.generate(prepared) as stream:    # Failure here: nothing was streamed yet
        async for item in stream:                           # Delta ... then one Finish
            ...                                             # Failure here: mid-stream

`prepare` validates and tokenizes (chat template, the model's sampling defaults for fields the client
left out, context checks); `generate` admits the request, elects its ring once, and turns the ring's
tokens into text: incremental UTF-8 decoding, stop strings, logprobs. Every failure is a `Failure`
with a kind (serve/failures.py); api/ maps kinds to HTTP. Each request is tracked for /v1/requests
and metrics from admission to its end, and `cancel(id)` stops it.

`generate` is an async context manager rather than an async generator because the ring runs in a
nursery, and trio forbids yielding out of a nursery from a generator.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from p2pinfer.cluster.routing import POLICIES
from p2pinfer.engine import EngineError, ModelCatalog, ModelEntry, Tokenizer, UnknownModelError
from p2pinfer.engine.generation_defaults import sampling_defaults
from p2pinfer.serve.entry import EntryService, Event, Generation
from p2pinfer.serve.failures import Failure, FailureKind, bad_request
from p2pinfer.serve.metrics import Metrics

DEFAULT_MAX_TOKENS = 1024  # a request without max_tokens: at most this, at most the context's room
RECENT_REQUESTS = 20  # finished requests /v1/requests keeps (the page shows them)
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty",
                   "presence_penalty", "seed")  # fmt: skip


# --- what goes in -----------------------------------------------------------
@dataclass(frozen=True)
class ChatPrompt:
    messages: tuple[dict, ...]  # {"role": system|user|assistant|tool, "content": str}


@dataclass(frozen=True)
class TextRequest:
    prompt: ChatPrompt | str | tuple[int, ...]  # chat messages, raw text, or token ids
    model: str | None = None  # None: this peer's default model
    max_tokens: int | None = None  # None: up to DEFAULT_MAX_TOKENS, within the context
    sampling: dict = field(default_factory=dict)  # SAMPLING_FIELDS the client set; the rest take defaults
    stops: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; n: the chosen token's and the n most likely
    routing: str | None = None  # cluster/routing.py policy; None: this peer's default
    id: str = ""  # shown in /v1/requests and used to cancel; "" makes one
    tags: dict = field(default_factory=dict)  # extra fields /v1/requests shows (orchestration task, part)


@dataclass(frozen=True)
class Prepared:
    """A request checked and tokenized, ready to run (run it once)."""

    id: str
    model: ModelEntry
    prompt: list[int]
    max_new: int
    sampling: dict
    stops: tuple[str, ...]
    logprobs: int | None
    routing: str
    tags: dict


# --- what comes out ----------------------------------------------------------
@dataclass(frozen=True)
class TokenLogprob:
    token: str
    bytes: bytes
    logprob: float
    top: tuple[tuple[str, bytes, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    text: str  # may be "" while a possible stop string is held back
    logprobs: tuple[TokenLogprob, ...] = ()  # for the tokens since the last Delta (when asked)


@dataclass(frozen=True)
class Finish:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


class StopMatcher:
    """Cuts the text at the first stop string, holding back any tail that could still begin one."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        cut = max(0, len(self.pending) - self.hold) if self.stops else len(self.pending)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# --- tracking ----------------------------------------------------------------
@dataclass
class Tracked:
    """One request entered here, as /v1/requests and the page show it."""

    id: str
    model: str
    prompt_tokens: int
    tags: dict = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    created: float = field(default_factory=time.time)
    ring: list = field(default_factory=list)
    replays: int = 0
    tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    state: str = "waiting"  # waiting (electing, loading), generating, done, error, cancelled
    finish: str | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # cancel(id) cancels the ring

    @property
    def ttft(self) -> float | None:
        return self.first_token_at - self.started if self.first_token_at else None

    @property
    def tokens_per_second(self) -> float | None:
        if (
            self.first_token_at
            and self.last_token_at
            and self.tokens > 1
            and self.last_token_at > self.first_token_at
        ):
            return (self.tokens - 1) / (self.last_token_at - self.first_token_at)
        return None

    def to_dict(self) -> dict:
        ttft, tps = self.ttft, self.tokens_per_second
        ended = self.state in ("done", "error", "cancelled") and self.last_token_at
        return {"id": self.id, "model": self.model, "created": int(self.created), "state": self.state,
                "finish": self.finish, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                "ring": self.ring, "replays": self.replays,
                "ttft": round(ttft, 3) if ttft is not None else None,
                "tokens_per_second": round(tps, 2) if tps is not None else None,
                "elapsed": round((self.last_token_at if ended else time.monotonic()) - self.started, 2),
                **self.tags}  # fmt: skip


class RequestBook:
    """The requests entered at this peer: in flight, and the last few finished; their metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.active: dict[str, Tracked] = {}
        self.recent: deque[Tracked] = deque(maxlen=RECENT_REQUESTS)

    def all(self) -> list[Tracked]:
        """In flight, then finished (newest first)."""
        return list(self.active.values()) + list(reversed(self.recent))

    def get(self, rid: str) -> Tracked:
        track = self.active.get(rid) or next((t for t in self.recent if t.id == rid), None)
        if track is None:
            raise Failure(FailureKind.NOT_FOUND, f"no request {rid} entered at this peer")
        return track

    def cancel(self, rid: str) -> Tracked:
        track = self.get(rid)
        if rid not in self.active:
            raise Failure(FailureKind.CONFLICT, f"request {rid} already ended ({track.state})")
        track.scope.cancel()
        return track

    def begin(self, p: Prepared) -> Tracked:
        track = Tracked(p.id, p.model.name, len(p.prompt), dict(p.tags))
        self.active[p.id] = track
        self.metrics.active.inc()
        self.metrics.tokens.labels(track.model, "prompt").inc(track.prompt_tokens)
        return track

    def on_ring(self, rid: str, ring, attempt: int) -> None:
        self.metrics.ring_size.observe(len(ring))
        if attempt:
            self.metrics.replays.inc()
        track = self.active.get(rid)
        if track is not None:
            track.ring = [[m.peer_id, m.start, m.end] for m in ring]
            track.replays = attempt

    def token(self, track: Tracked) -> None:
        now = time.monotonic()
        if track.first_token_at is None:
            track.first_token_at, track.state = now, "generating"
            self.metrics.ttft.labels(track.model).observe(now - track.started)
        track.last_token_at, track.tokens = now, track.tokens + 1

    def end(self, track: Tracked, state: str, finish: str | None) -> None:
        track.state, track.finish = state, finish
        self.active.pop(track.id, None)
        self.recent.append(track)
        m = self.metrics
        m.active.dec()
        m.tokens.labels(track.model, "completion").inc(track.tokens)
        m.completions.labels(track.model, finish or state).inc()
        if (tps := track.tokens_per_second) is not None:
            m.tps.labels(track.model).observe(tps)


# --- the generator -----------------------------------------------------------
async def _no_resolve(name: str) -> None:
    """Without serve/fetch.py a model is known only from a local file."""


class Generator:
    def __init__(self, catalog: ModelCatalog, entry: EntryService, metrics: Metrics, default_model: str,
                 default_routing: str = "memory", resolve_model=None) -> None:  # fmt: skip
        self.catalog, self.entry = catalog, entry
        self.default_model, self.default_routing = default_model, default_routing
        self.book = RequestBook(metrics)
        entry.on_ring = self.book.on_ring
        self._tokenizers: dict[str, Tokenizer] = {}
        self._tokenizer_lock = trio.Lock()
        # serve/fetch.py: a model known only from peers gets a catalog entry (its header fetched)
        self.resolve_model = resolve_model or _no_resolve

    async def resolved_model(self, name: str | None) -> ModelEntry:
        """model(), after giving a model this peer has no file of the chance to be fetched (its header:
        metadata, tokenizer, layout) from the peers that gossip it."""
        try:
            await self.resolve_model(name or self.default_model)
        except UnknownModelError:
            pass
        except EngineError as e:
            raise Failure(FailureKind.UNAVAILABLE, f"cannot get {name} from peers: {e}", retry_after=5) from e
        return self.model(name)

    def model(self, name: str | None) -> ModelEntry:
        try:
            return self.catalog.get(name or self.default_model)
        except UnknownModelError as e:
            raise Failure(FailureKind.UNKNOWN_MODEL, str(e), param="model") from e

    def context_limit(self, entry: ModelEntry) -> int:
        """Most tokens a request may hold: the model's context within Capacity.max_context (shards size by it)."""
        return self.entry.capacity.context_for(entry.context_length)

    def defaults_for(self, entry: ModelEntry) -> dict:
        return sampling_defaults(entry.path, entry.format)

    async def tokenizer(self, entry: ModelEntry) -> Tokenizer:
        """Built once per model, in a thread: building one takes seconds, which would stall gossip."""
        async with self._tokenizer_lock:
            if entry.name not in self._tokenizers:
                try:
                    self._tokenizers[entry.name] = await trio.to_thread.run_sync(Tokenizer.from_entry, entry)
                except EngineError as e:
                    raise Failure(FailureKind.INTERNAL, f"cannot build {entry.name}'s tokenizer: {e}") from e
            return self._tokenizers[entry.name]

    async def warm(self, model: str) -> None:
        try:
            await self.tokenizer(await self.resolved_model(model))
        except Failure:
            pass  # reported when a request asks for it

    async def prepare(self, req: TextRequest) -> Prepared:
        entry = await self.resolved_model(req.model)
        tokenizer = await self.tokenizer(entry)
        prompt = self._tokenize(tokenizer, entry, req.prompt)
        if not prompt:
            raise bad_request("the prompt is empty", "prompt")
        ctx, name = self.context_limit(entry), entry.name
        if len(prompt) >= ctx:
            raise Failure(FailureKind.CONTEXT_EXCEEDED, f"the prompt is {len(prompt)} tokens; {name}'s context is {ctx}",
                          param="messages" if isinstance(req.prompt, ChatPrompt) else "prompt")  # fmt: skip
        room = ctx - len(prompt)
        max_new = req.max_tokens
        if max_new is None:
            max_new = min(DEFAULT_MAX_TOKENS, room)
        elif max_new > room:
            raise Failure(FailureKind.CONTEXT_EXCEEDED, f"prompt ({len(prompt)} tokens) + max_tokens ({max_new}) "
                          f"exceed {name}'s context of {ctx}", param="max_tokens")  # fmt: skip
        routing = req.routing or self.default_routing
        if routing not in POLICIES:
            raise bad_request(f"'p2pinfer.routing' must be one of {', '.join(POLICIES)}", "p2pinfer.routing")
        rid = req.id or "req-" + uuid.uuid4().hex[:24]
        return Prepared(rid, entry, prompt, max_new, self._sampling(entry, req), tuple(req.stops), req.logprobs,
                        routing, dict(req.tags))  # fmt: skip

    def _tokenize(self, tokenizer: Tokenizer, entry: ModelEntry, prompt) -> list[int]:
        try:
            if isinstance(prompt, ChatPrompt):
                return tokenizer.render_chat([dict(m) for m in prompt.messages])
            if isinstance(prompt, str):
                return tokenizer.encode(prompt)
        except EngineError as e:
            raise bad_request(f"cannot tokenize the prompt: {e}") from e
        ids = list(prompt)
        if any(not 0 <= t < entry.vocab_size for t in ids):
            raise bad_request("prompt token id out of range", "prompt")
        return ids

    def _sampling(self, entry: ModelEntry, req: TextRequest) -> dict:
        """The client's fields over the model's recommended values (else llama-server's defaults)."""
        d = self.defaults_for(entry)
        s = {k: req.sampling.get(k) if req.sampling.get(k) is not None else d.get(k) for k in SAMPLING_FIELDS}
        s["temperature"], s["top_p"], s["min_p"] = (
            float(s["temperature"]),
            float(s["top_p"]),
            float(s["min_p"]),
        )
        s["top_k"] = int(s["top_k"])
        for k in ("repetition_penalty", "frequency_penalty", "presence_penalty"):
            s[k] = float(s[k])
        if s["repetition_penalty"] <= 0:
            raise bad_request("'repetition_penalty' must be greater than 0", "repetition_penalty")
        if s["top_p"] == 0:
            s["top_p"], s["temperature"] = 1.0, 0.0  # top_p 0 means "only the best token"
        if s["seed"] is not None and s["seed"] < 0:
            s["seed"] &= 2**64 - 1
        s["logprobs"] = req.logprobs
        return s

    def cancel(self, rid: str) -> Tracked:
        return self.book.cancel(rid)

    @asynccontextmanager
    async def generate(self, p: Prepared) -> AsyncIterator[AsyncIterator[Delta | Finish]]:
        """Admit and elect (a Failure on entry means nothing was streamed), then yield the stream."""
        tokenizer = await self.tokenizer(p.model)
        gen = Generation(p.model, p.prompt, p.max_new, p.sampling, tuple(tokenizer.eos_token_ids),
                         request_id=p.id, routing=p.routing)  # fmt: skip
        track = self.book.begin(p)
        stream = None
        try:
            async with self.entry.generate(gen, cancel=track.scope) as events:
                stream = _Stream(self, tokenizer, p, track, events)
                yield stream.items()
        finally:
            self.book.end(track, *(stream.outcome if stream else ("error", "error")))


class _Stream:
    """One request's events turned into text (decoding, stop strings, logprobs)."""

    def __init__(self, gen: Generator, tokenizer: Tokenizer, p: Prepared, track: Tracked,
                 events: trio.MemoryReceiveChannel[Event]) -> None:  # fmt: skip
        self.gen, self.tokenizer, self.p, self.track, self.events = gen, tokenizer, p, track, events
        self.outcome = ("cancelled", "cancelled")  # until the stream ends: the consumer left early

    def _logprob(self, ev: Event) -> TokenLogprob:
        def one(tid: int) -> tuple[str, bytes]:
            b = self.tokenizer.token_bytes(tid)
            return b.decode("utf-8", "replace"), b

        text, b = one(ev.token)
        top = tuple((*one(int(t)), float(lp)) for t, lp in (ev.top or []))
        return TokenLogprob(text, b, float(ev.logprob if ev.logprob is not None else 0.0), top)

    async def items(self) -> AsyncIterator[Delta | Finish]:
        p, book, track = self.p, self.gen.book, self.track
        decoder, stops = self.tokenizer.decoder(), StopMatcher(p.stops)
        pending: list[TokenLogprob] = []
        finish = "stop"
        async for ev in self.events:
            if ev.kind == "error":
                cancelled = ev.error.kind is FailureKind.CANCELLED
                self.outcome = ("cancelled", "cancelled") if cancelled else ("error", "error")
                raise ev.error
            if ev.kind == "done":
                finish = ev.reason
                text = stops.feed(decoder.flush())[0] + stops.flush()
                break
            book.token(track)
            if p.logprobs is not None:
                pending.append(self._logprob(ev))
            text, stopped = stops.feed(decoder.feed(ev.token))
            if stopped:  # the caller leaving the block cancels the ring
                finish = "stop"
                break
            if text:  # logprobs go out with the text of their tokens (held-back text holds them too)
                yield Delta(text, tuple(pending))
                pending = []
        else:  # the channel closed without a done: the ring was cancelled
            raise Failure(FailureKind.CANCELLED, f"request {p.id} was cancelled")
        if text or pending:
            yield Delta(text, tuple(pending))
        self.outcome = ("done", finish)
        yield Finish(finish, len(p.prompt), track.tokens)
