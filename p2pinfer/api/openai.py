"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, and /v1/requests.

Sampling fields a client leaves out take the model's recommended values (GGUF `general.sampling.*`,
generation_config.json), else llama-server's defaults (engine/generation_defaults.py): the official
SDKs send no temperature at all, and a small model sampled raw at temperature 1 rambles.

Requests are validated here and turned into a Generation for the entry service; tokens come back
as they are sampled and go out as SSE chunks (or one JSON body). Generation runs inside the
handler's own task, watching for the client going away, so a disconnect cancels the ring.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from p2pinfer.api.app import openai_error
from p2pinfer.api.metrics import Metrics
from p2pinfer.cluster.routing import POLICIES
from p2pinfer.engine import EngineError, ModelCatalog, Tokenizer, UnknownModelError
from p2pinfer.engine.generation_defaults import model_recommended, sampling_defaults
from p2pinfer.engine.sampling import MAX_TOP_LOGPROBS
from p2pinfer.serve.entry import EntryService, Generation, RequestError

DEFAULT_MAX_TOKENS = 1024
MAX_STOP_SEQUENCES = 4
RECENT_REQUESTS = 20  # finished requests /v1/requests keeps (the page shows them)


log = logging.getLogger("p2pinfer.api")


class RequestCancelled(RequestError):
    def __init__(self, message: str) -> None:
        super().__init__(409, message)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def _error_response(e: Exception) -> JSONResponse:
    if isinstance(e, BadRequest):
        return openai_error(400, str(e), "invalid_request_error", e.code)
    if isinstance(e, UnknownModelError):
        return openai_error(404, str(e), "invalid_request_error", "model_not_found")
    if isinstance(e, RequestError):
        kind = {429: "rate_limit_error", 401: "authentication_error"}.get(
            e.status, "invalid_request_error" if e.status < 500 else "server_error"
        )
        headers = {"Retry-After": str(int(e.retry_after))} if e.retry_after else None
        return openai_error(e.status, str(e), kind, headers=headers)
    return openai_error(500, f"internal error: {type(e).__name__}: {e}", "server_error")


class StopMatcher:
    """Cuts the text at the first stop string, holding back any tail that could still begin one."""

    def __init__(self, stops: list[str]) -> None:
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


@dataclass
class Parsed:
    model: str
    prompt: list[int]
    max_new: int
    sampling: dict
    stops: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None = None  # None: no logprobs; n: the chosen token's and the n most likely
    routing: str = "memory"  # the ring's routing policy (cluster/routing.py)


@dataclass
class Tracked:
    """One request entered here, as /v1/requests and the page show it."""

    id: str
    model: str
    prompt_tokens: int
    started: float = field(default_factory=time.monotonic)
    created: float = field(default_factory=time.time)
    ring: list = field(default_factory=list)
    replays: int = 0
    tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    state: str = "waiting"  # waiting (electing, loading), generating, done, error, cancelled
    finish: str | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # DELETE /v1/requests/{id} cancels it

    def to_dict(self) -> dict:
        ttft = self.first_token_at - self.started if self.first_token_at else None
        tps = None
        if (
            self.first_token_at
            and self.last_token_at
            and self.tokens > 1
            and self.last_token_at > self.first_token_at
        ):
            tps = (self.tokens - 1) / (self.last_token_at - self.first_token_at)
        end = (
            self.last_token_at
            if self.state in ("done", "error", "cancelled") and self.last_token_at
            else None
        )
        return {"id": self.id, "model": self.model, "created": int(self.created), "state": self.state,
                "finish": self.finish, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.tokens,
                "ring": self.ring, "replays": self.replays,
                "ttft": round(ttft, 3) if ttft is not None else None,
                "tokens_per_second": round(tps, 2) if tps is not None else None,
                "elapsed": round((end or time.monotonic()) - self.started, 2)}  # fmt: skip


def _number(body: dict, name: str, lo: float, hi: float, default, integer: bool = False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or (integer and not isinstance(v, int)):
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}", name)
    if not lo <= v <= hi:
        raise BadRequest(f"'{name}' must be between {lo} and {hi}, got {v}", name)
    return v


def _message_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text is understood
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise BadRequest("only text content parts are supported", "messages")
            parts.append(p["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise BadRequest("message content must be a string or a list of text parts", "messages")


class OpenAIRoutes:
    def __init__(self, catalog: ModelCatalog, entry: EntryService, default_model: str,
                 served_models: Callable[[], list[str]], metrics: Metrics | None = None) -> None:  # fmt: skip
        self.catalog = catalog
        self.entry = entry
        self.default_model = default_model
        self.served_models = served_models
        self.metrics = metrics or Metrics()
        self._tokenizers: dict[str, Tokenizer] = {}
        self._tokenizer_lock = trio.Lock()
        self.active: dict[str, Tracked] = {}
        self.recent: deque[Tracked] = deque(maxlen=RECENT_REQUESTS)
        self.default_routing = "memory"  # --routing
        entry.on_ring = self._on_ring

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/requests", self.requests, methods=["GET"]),
            Route("/v1/requests/{rid}", self.one_request, methods=["GET", "DELETE"]),
        ]

    def _on_ring(self, rid: str, ring, attempt: int) -> None:
        self.metrics.ring_size.observe(len(ring))
        if attempt:
            self.metrics.replays.inc()
        t = self.active.get(rid)
        if t is not None:
            t.ring = [[m.peer_id, m.start, m.end] for m in ring]
            t.replays = attempt

    async def requests(self, request: Request) -> JSONResponse:
        """Requests entered at this peer: in flight, then the last finished ones (newest first)."""
        items = [t.to_dict() for t in self.active.values()] + [t.to_dict() for t in reversed(self.recent)]
        return JSONResponse({"object": "list", "data": items})

    def token_arrived(self, track: Tracked) -> None:
        """Bookkeeping for one generated token of a request entered here (TTFT, tok/s, counts)."""
        now = time.monotonic()
        if track.first_token_at is None:
            track.first_token_at, track.state = now, "generating"
            self.metrics.ttft.labels(track.model).observe(now - track.started)
        track.last_token_at, track.tokens = now, track.tokens + 1

    def retire(self, track: Tracked) -> None:
        """A request entered here has ended, however it ended: move it to the recent list, count it."""
        metrics = self.metrics
        if track.state in ("waiting", "generating"):
            track.state = "cancelled"
        self.active.pop(track.id, None)
        self.recent.append(track)
        metrics.active.dec()
        metrics.tokens.labels(track.model, "completion").inc(track.tokens)
        metrics.completions.labels(track.model, track.finish or track.state).inc()
        if track.tokens > 1 and track.last_token_at > track.first_token_at:
            metrics.tps.labels(track.model).observe(
                (track.tokens - 1) / (track.last_token_at - track.first_token_at)
            )

    async def one_request(self, request: Request) -> JSONResponse:
        """GET: one request entered here; DELETE: cancel it (the ring stops, every member frees its KV,
        the client's stream ends with an error event)."""
        rid = request.path_params["rid"]
        track = self.active.get(rid)
        if track is None:
            done = next((t for t in self.recent if t.id == rid), None)
            if done is None:
                return openai_error(
                    404, f"no request {rid} entered at this peer", "invalid_request_error", "not_found"
                )
            if request.method == "DELETE":
                return openai_error(
                    409, f"request {rid} already ended ({done.state})", "invalid_request_error"
                )
            return JSONResponse(done.to_dict())
        if request.method == "DELETE":
            track.scope.cancel()
            log.info("request %s: cancelled by DELETE /v1/requests", rid)
            return JSONResponse({**track.to_dict(), "state": "cancelled"})
        return JSONResponse(track.to_dict())

    def defaults_for(self, model: str) -> dict:
        entry = self.catalog.get(model)
        return sampling_defaults(entry.path, entry.format)

    async def tokenizer(self, model: str) -> Tokenizer:
        """Built once per model, in a thread: building one takes seconds, which would stall gossip."""
        async with self._tokenizer_lock:
            if model not in self._tokenizers:
                entry = self.catalog.get(model)
                self._tokenizers[model] = await trio.to_thread.run_sync(Tokenizer.from_entry, entry)
            return self._tokenizers[model]

    async def warm(self, model: str) -> None:
        try:
            await self.tokenizer(model)
        except EngineError:
            pass  # reported when a request asks for it

    async def models(self, request: Request) -> JSONResponse:
        """Every model some peer serves; for those this peer knows, context length and sampling defaults."""
        data = []
        for n in sorted(set(self.served_models())):
            item = {"id": n, "object": "model", "created": 0, "owned_by": "p2pinfer"}
            try:
                e = self.catalog.get(n)
            except UnknownModelError:
                pass
            else:
                item.update(context_length=e.context_length, n_layers=e.n_layers, format=e.format, arch=e.arch,
                            sampling_defaults=sampling_defaults(e.path, e.format),
                            sampling_defaults_from_model=sorted(model_recommended(e.path, e.format)))  # fmt: skip
            data.append(item)
        return JSONResponse({"object": "list", "data": data})

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    async def _parse_common(
        self, body: dict, prompt_of: Callable[[Tokenizer], list[int]], chat: bool
    ) -> Parsed:
        model = body.get("model") or self.default_model
        if not isinstance(model, str):
            raise BadRequest("'model' must be a string", "model")
        entry = self.catalog.get(model)  # UnknownModelError -> 404
        tokenizer = await self.tokenizer(model)
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported", "n")
        stop = body.get("stop") or []
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or not all(isinstance(s, str) for s in stops)
            or len(stops) > MAX_STOP_SEQUENCES
        ):
            raise BadRequest(
                f"'stop' must be a string or a list of at most {MAX_STOP_SEQUENCES} strings", "stop"
            )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be a boolean", "stream")
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            raise BadRequest("'stream_options' must be an object", "stream_options")
        ctx = entry.context_length
        max_new = _number(body, "max_completion_tokens", 1, 10**9, None, integer=True)
        max_new = _number(body, "max_tokens", 1, 10**9, max_new, integer=True)
        d = sampling_defaults(entry.path, entry.format)
        sampling = {
            "temperature": float(_number(body, "temperature", 0, 2, d["temperature"])),
            "top_p": float(_number(body, "top_p", 0, 1, d["top_p"])),
            "top_k": int(_number(body, "top_k", 0, 10**6, d["top_k"], integer=True)),
            "min_p": float(_number(body, "min_p", 0, 1, d["min_p"])),
            "repetition_penalty": float(_number(body, "repetition_penalty", 0, 10, d["repetition_penalty"])),
            "frequency_penalty": float(_number(body, "frequency_penalty", -2, 2, d["frequency_penalty"])),
            "presence_penalty": float(_number(body, "presence_penalty", -2, 2, d["presence_penalty"])),
            "seed": _number(body, "seed", -(2**63), 2**63 - 1, None, integer=True),
        }
        if sampling["repetition_penalty"] <= 0:
            raise BadRequest("'repetition_penalty' must be greater than 0", "repetition_penalty")
        logprobs = None
        if chat:
            want = body.get("logprobs")
            if want is not None and not isinstance(want, bool):
                raise BadRequest("'logprobs' must be a boolean", "logprobs")
            top = _number(body, "top_logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
            if top is not None and not want:
                raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            logprobs = (top or 0) if want else None
        else:
            logprobs = _number(body, "logprobs", 0, MAX_TOP_LOGPROBS, None, integer=True)
        sampling["logprobs"] = logprobs
        if sampling["top_p"] == 0:
            sampling["top_p"], sampling["temperature"] = 1.0, 0.0  # top_p 0 means "only the best token"
        if sampling["seed"] is not None and sampling["seed"] < 0:
            sampling["seed"] &= 2**64 - 1
        try:
            prompt = prompt_of(tokenizer)
        except EngineError as e:
            raise BadRequest(f"cannot tokenize the prompt: {e}") from e
        if not prompt:
            raise BadRequest("the prompt is empty", "prompt")
        if len(prompt) >= ctx:
            raise BadRequest(f"the prompt is {len(prompt)} tokens; {model}'s context is {ctx}",
                             "messages", "context_length_exceeded")  # fmt: skip
        room = ctx - len(prompt)
        if max_new is None:
            max_new = min(DEFAULT_MAX_TOKENS, room)
        elif max_new > room:
            raise BadRequest(f"prompt ({len(prompt)} tokens) + max_tokens ({max_new}) exceed {model}'s context of {ctx}",
                             "max_tokens", "context_length_exceeded")  # fmt: skip
        return Parsed(model, prompt, max_new, sampling, stops, stream, bool(opts.get("include_usage")), logprobs,
                      self._routing(body))  # fmt: skip

    def _routing(self, body: dict) -> str:
        """The body's `"p2pinfer": {"routing": POLICY}` extension, else --routing."""
        ext = body.get("p2pinfer")
        if ext is None:
            return self.default_routing
        if not isinstance(ext, dict):
            raise BadRequest("'p2pinfer' must be an object", "p2pinfer")
        routing = ext.get("routing", self.default_routing)
        if routing not in POLICIES:
            raise BadRequest(f"'p2pinfer.routing' must be one of {', '.join(POLICIES)}", "p2pinfer.routing")
        return routing

    async def chat(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty list", "messages")
            msgs = []
            for m in messages:
                if not isinstance(m, dict) or m.get("role") not in (
                    "system",
                    "user",
                    "assistant",
                    "developer",
                    "tool",
                ):
                    raise BadRequest(
                        "each message needs a role of system, user, assistant, developer or tool", "messages"
                    )
                role = "system" if m["role"] == "developer" else m["role"]
                msgs.append({"role": role, "content": _message_text(m.get("content"))})
            parsed = await self._parse_common(body, lambda tok: tok.render_chat(msgs), chat=True)
        except Exception as e:
            return _error_response(e)
        return Completion(self, parsed, chat=True)

    async def completions(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if (
                isinstance(prompt, list)
                and prompt
                and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
            ):
                ids = list(prompt)
                parsed = await self._parse_common(body, lambda tok: ids, chat=False)
                if any(not 0 <= t < self.catalog.get(parsed.model).vocab_size for t in ids):
                    raise BadRequest("prompt token id out of range", "prompt")
            elif isinstance(prompt, str):
                parsed = await self._parse_common(body, lambda tok: tok.encode(prompt), chat=False)
            else:
                raise BadRequest("'prompt' must be a string or a list of token ids", "prompt")
        except Exception as e:
            return _error_response(e)
        return Completion(self, parsed, chat=False)


class Completion(Response):
    """Runs the generation while answering: SSE chunks, or one JSON body at the end."""

    def __init__(self, routes: OpenAIRoutes, parsed: Parsed, chat: bool) -> None:
        self.routes, self.p, self.chat = routes, parsed, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.background = None

    def _chunk(
        self, text: str | None, finish: str | None, first: bool = False, lps: list | None = None
    ) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            logprobs = {"content": lps, "refusal": None} if lps else None
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": self._completion_logprobs(lps) if lps else None,
                      "finish_reason": finish}  # fmt: skip
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.p.model,
            "choices": [choice],
        }

    def _usage(self, n: int) -> dict:
        return {
            "prompt_tokens": len(self.p.prompt),
            "completion_tokens": n,
            "total_tokens": len(self.p.prompt) + n,
        }

    def _logprob_entry(self, tokenizer: Tokenizer, ev) -> dict:
        """OpenAI's chat shape for one token: token, logprob, bytes, top_logprobs."""

        def one(tid: int, lp: float) -> dict:
            b = tokenizer.token_bytes(tid)
            return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}

        entry = one(ev.token, float(ev.logprob if ev.logprob is not None else 0.0))
        entry["top_logprobs"] = [one(int(t), float(lp)) for t, lp in (ev.top or [])]
        return entry

    def _completion_logprobs(self, lps: list[dict]) -> dict:
        """The legacy completions shape, from chat-shaped entries."""
        offsets, pos = [], self._text_offset
        for e in lps:
            offsets.append(pos)
            pos += len(e["token"])
        self._text_offset = pos
        return {"tokens": [e["token"] for e in lps], "token_logprobs": [e["logprob"] for e in lps],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in lps],
                "text_offset": offsets}  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        p, routes, metrics = self.p, self.routes, self.routes.metrics
        tokenizer = await routes.tokenizer(p.model)
        eos = tuple(tokenizer.eos_token_ids)
        gen = Generation(p.model, p.prompt, p.max_new, p.sampling, eos, request_id=self.id, routing=p.routing)
        decoder, stops = tokenizer.decoder(), StopMatcher(p.stops)
        started = False
        text_parts: list[str] = []
        lp_pending: list[dict] = []  # logprob entries not yet sent with a chunk
        lp_all: list[dict] = []
        self._text_offset = 0
        n_tokens, finish, stopped = 0, "stop", False
        track = Tracked(self.id, p.model, len(p.prompt))
        routes.active[self.id] = track
        metrics.active.inc()
        metrics.tokens.labels(p.model, "prompt").inc(len(p.prompt))

        async def out(text: str) -> None:
            if not text:
                return
            if p.stream:
                lps, lp_pending[:] = list(lp_pending), []
                await _sse(send, self._chunk(text, None, lps=lps))
            else:
                text_parts.append(text)

        async def start_stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})  # fmt: skip
            if self.chat:
                await _sse(send, self._chunk(None, None, first=True))

        try:
            async with trio.open_nursery() as nursery:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    if track.state in ("waiting", "generating"):
                        track.state = "cancelled"
                    nursery.cancel_scope.cancel()  # the client is gone: stop the ring

                nursery.start_soon(watch_disconnect)
                try:
                    failure = None
                    with track.scope:
                        async with routes.entry.generate(gen) as events:
                            async for ev in events:
                                if ev.kind == "error":
                                    failure = ev.error  # raised below, outside generate(): no exception group
                                    break
                                if ev.kind == "done":
                                    finish = ev.reason
                                    break
                                routes.token_arrived(track)
                                if not started and p.stream:
                                    await start_stream()
                                    started = True
                                n_tokens += 1
                                if p.logprobs is not None:
                                    entry = self._logprob_entry(tokenizer, ev)
                                    lp_pending.append(entry)
                                    lp_all.append(entry)
                                text, stopped = stops.feed(decoder.feed(ev.token))
                                await out(text)
                                if stopped:  # leaving the block cancels the ring
                                    finish = "stop"
                                    break
                    if track.scope.cancelled_caught:
                        raise RequestCancelled(
                            f"request {self.id} was cancelled (DELETE /v1/requests/{self.id})"
                        )
                    if failure is not None:
                        raise failure
                    if not stopped:
                        await out(stops.feed(decoder.flush())[0] + stops.flush())
                except Exception as e:
                    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
                        e = e.exceptions[0]
                    cancelled = isinstance(e, RequestCancelled)
                    track.state, track.finish = (
                        ("cancelled", "cancelled") if cancelled else ("error", "error")
                    )
                    with trio.move_on_after(5):
                        if started:  # headers are out: report in-band, as OpenAI does mid-stream
                            await _sse(send, {"error": {"message": str(e), "type": "server_error",
                                                        "code": getattr(e, "status", 500)}})  # fmt: skip
                            await _sse_done(send)
                        else:
                            await _error_response(e)(scope, receive, send)
                    nursery.cancel_scope.cancel()
                    return
                track.state, track.finish = "done", finish
                if p.stream:
                    if not started:
                        await start_stream()
                    if lp_pending:  # logprobs of tokens whose text was held back or empty
                        await _sse(send, self._chunk(None, None, lps=list(lp_pending)))
                    await _sse(send, self._chunk(None, finish))
                    if p.include_usage:
                        await _sse(send, {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                                          "created": self.created, "model": p.model, "choices": [],
                                          "usage": self._usage(n_tokens)})  # fmt: skip
                    await _sse_done(send)
                else:
                    text = "".join(text_parts)
                    if self.chat:
                        lp = {"content": lp_all, "refusal": None} if p.logprobs is not None else None
                        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                                  "finish_reason": finish}  # fmt: skip
                        obj = "chat.completion"
                    else:
                        lp = self._completion_logprobs(lp_all) if p.logprobs is not None else None
                        choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}
                        obj = "text_completion"
                    body = {"id": self.id, "object": obj, "created": self.created, "model": p.model,
                            "choices": [choice], "usage": self._usage(n_tokens)}  # fmt: skip
                    await JSONResponse(body)(scope, receive, send)
                nursery.cancel_scope.cancel()
        finally:
            routes.retire(track)


async def _sse(send: Send, obj: dict) -> None:
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _sse_done(send: Send) -> None:
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
