"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Requests are validated here and turned into a Generation for the entry service; tokens come back
as they are sampled and go out as SSE chunks (or one JSON body). Generation runs inside the
handler's own task, watching for the client going away, so a disconnect cancels the ring.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from p2pinfer.api.app import openai_error
from p2pinfer.engine import EngineError, ModelCatalog, Tokenizer, UnknownModelError
from p2pinfer.serve.entry import EntryService, Generation, RequestError

DEFAULT_MAX_TOKENS = 1024
MAX_STOP_SEQUENCES = 4


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
                 served_models: Callable[[], list[str]]) -> None:  # fmt: skip
        self.catalog = catalog
        self.entry = entry
        self.default_model = default_model
        self.served_models = served_models
        self._tokenizers: dict[str, Tokenizer] = {}
        self._tokenizer_lock = trio.Lock()

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
        ]

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
        names = sorted(set(self.served_models()))
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "p2pinfer"} for n in names
        ]})  # fmt: skip

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    async def _parse_common(self, body: dict, prompt_of: Callable[[Tokenizer], list[int]]) -> Parsed:
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
        sampling = {
            "temperature": float(_number(body, "temperature", 0, 2, 1.0)),
            "top_p": float(_number(body, "top_p", 0, 1, 1.0)),
            "top_k": int(_number(body, "top_k", 0, 10**6, 0, integer=True)),
            "seed": _number(body, "seed", -(2**63), 2**63 - 1, None, integer=True),
        }
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
        return Parsed(model, prompt, max_new, sampling, stops, stream, bool(opts.get("include_usage")))

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
            parsed = await self._parse_common(body, lambda tok: tok.render_chat(msgs))
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
                parsed = await self._parse_common(body, lambda tok: ids)
                if any(not 0 <= t < self.catalog.get(parsed.model).vocab_size for t in ids):
                    raise BadRequest("prompt token id out of range", "prompt")
            elif isinstance(prompt, str):
                parsed = await self._parse_common(body, lambda tok: tok.encode(prompt))
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

    def _chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        p = self.p
        tokenizer = await self.routes.tokenizer(p.model)
        eos = tuple(tokenizer.eos_token_ids)
        gen = Generation(p.model, p.prompt, p.max_new, p.sampling, eos)
        decoder, stops = tokenizer.decoder(), StopMatcher(p.stops)
        started = False
        text_parts: list[str] = []
        n_tokens, finish, stopped = 0, "stop", False

        async def out(text: str) -> None:
            if not text:
                return
            if p.stream:
                await _sse(send, self._chunk(text, None))
            else:
                text_parts.append(text)

        async def start_stream() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})  # fmt: skip
            if self.chat:
                await _sse(send, self._chunk(None, None, first=True))

        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel()  # the client is gone: stop the ring

            nursery.start_soon(watch_disconnect)
            try:
                failure = None
                async with self.routes.entry.generate(gen) as events:
                    async for ev in events:
                        if ev.kind == "error":
                            failure = ev.error  # raised below, outside generate(): no exception group
                            break
                        if ev.kind == "done":
                            finish = ev.reason
                            break
                        if not started and p.stream:
                            await start_stream()
                            started = True
                        n_tokens += 1
                        text, stopped = stops.feed(decoder.feed(ev.token))
                        await out(text)
                        if stopped:  # leaving the block cancels the ring
                            finish = "stop"
                            break
                if failure is not None:
                    raise failure
                if not stopped:
                    await out(stops.feed(decoder.flush())[0] + stops.flush())
            except Exception as e:
                while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
                    e = e.exceptions[0]
                with trio.move_on_after(5):
                    if started:  # headers are out: report in-band, as OpenAI does mid-stream
                        await _sse(send, {"error": {"message": str(e), "type": "server_error",
                                                    "code": getattr(e, "status", 500)}})  # fmt: skip
                        await _sse_done(send)
                    else:
                        await _error_response(e)(scope, receive, send)
                nursery.cancel_scope.cancel()
                return
            if p.stream:
                if not started:
                    await start_stream()
                await _sse(send, self._chunk(None, finish))
                if p.include_usage:
                    await _sse(send, {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                                      "created": self.created, "model": p.model, "choices": [],
                                      "usage": self._usage(n_tokens)})  # fmt: skip
                await _sse_done(send)
            else:
                text = "".join(text_parts)
                if self.chat:
                    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                              "finish_reason": finish}  # fmt: skip
                    obj = "chat.completion"
                else:
                    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                    obj = "text_completion"
                body = {"id": self.id, "object": obj, "created": self.created, "model": p.model,
                        "choices": [choice], "usage": self._usage(n_tokens)}  # fmt: skip
                await JSONResponse(body)(scope, receive, send)
            nursery.cancel_scope.cancel()


async def _sse(send: Send, obj: dict) -> None:
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _sse_done(send: Send) -> None:
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
