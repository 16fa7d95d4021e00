"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, and /v1/requests.

HTTP only: a body is validated (api/bodies.py), handed to serve's Generator, and what comes back
(text deltas, a finish, or a Failure) is shaped as OpenAI does: SSE chunks or one JSON body. Failure
kinds map to HTTP in one table, FAILURE_HTTP. A stream's headers go out only once its ring is
elected, so "no ring fits" is a 503 with Retry-After; a failure after that arrives in-band, as an
error event, as OpenAI's own streams report one.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from p2pinfer.api.app import openai_error
from p2pinfer.api.bodies import ChatBody, CompletionBody, parse_body
from p2pinfer.engine.generation_defaults import model_recommended
from p2pinfer.serve.failures import Failure, FailureKind, bad_request
from p2pinfer.serve.generate import Delta, Finish, Generator, Prepared, TokenLogprob
from p2pinfer.tasks import open_nursery

log = logging.getLogger("p2pinfer.api")

K = FailureKind
# kind -> (HTTP status, OpenAI error type, OpenAI error code)
FAILURE_HTTP: dict[FailureKind, tuple[int, str, str | None]] = {
    K.BAD_REQUEST: (400, "invalid_request_error", None),
    K.CONTEXT_EXCEEDED: (400, "invalid_request_error", "context_length_exceeded"),
    K.UNKNOWN_MODEL: (404, "invalid_request_error", "model_not_found"),
    K.NOT_FOUND: (404, "invalid_request_error", "not_found"),
    K.CONFLICT: (409, "invalid_request_error", None),
    K.CANCELLED: (409, "invalid_request_error", "cancelled"),
    K.BUSY: (429, "rate_limit_error", None),
    K.UNAVAILABLE: (503, "server_error", None),
    K.TIMEOUT: (504, "server_error", None),
    K.INTERNAL: (500, "server_error", None),
}


def http_status(kind: FailureKind) -> int:
    return FAILURE_HTTP[kind][0]


def failure_response(e: Exception) -> JSONResponse:
    if not isinstance(e, Failure):
        log.exception("internal error answering a request", exc_info=e)
        return openai_error(500, f"internal error: {type(e).__name__}: {e}", "server_error")
    status, kind, code = FAILURE_HTTP[e.kind]
    headers = {"Retry-After": str(max(1, round(e.retry_after)))} if e.retry_after else None
    return openai_error(status, str(e), kind, code, headers=headers, param=e.param)


def failure_event(e: Failure) -> dict:
    """The in-band error of a stream that already began."""
    status, kind, code = FAILURE_HTTP[e.kind]
    return {"error": {"message": str(e), "type": kind, "code": code or status}}


async def read_json(request: Request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}") from e


def sse(obj: dict | str) -> bytes:
    return b"data: " + (obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))).encode() + b"\n\n"


class Shape:
    """OpenAI's shapes for one chat or text completion: chunks, the whole body, logprobs."""

    def __init__(self, chat: bool, model: str, rid: str) -> None:
        self.chat, self.model, self.id = chat, model, rid
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self._offset = 0  # text offset of the next token (legacy completions logprobs)

    def _wrap(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}  # fmt: skip

    def chunk(self, text: str | None, finish: str | None = None, lps=(), first: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            logprobs = {"content": [self._chat_lp(x) for x in lps], "refusal": None} if lps else None
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return self._wrap("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": self._text_lps(lps) if lps else None,
                  "finish_reason": finish}  # fmt: skip
        return self._wrap("text_completion", [choice])

    def usage_chunk(self, f: Finish) -> dict:
        return self._wrap("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage(f))

    def body(self, text: str, f: Finish, lps: list[TokenLogprob] | None) -> dict:
        if self.chat:
            lp = {"content": [self._chat_lp(x) for x in lps], "refusal": None} if lps is not None else None
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp,
                      "finish_reason": f.reason}  # fmt: skip
        else:
            lp = self._text_lps(lps) if lps is not None else None
            choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": f.reason}
        return self._wrap(self.object, [choice], usage=usage(f))

    @staticmethod
    def _chat_lp(x: TokenLogprob) -> dict:
        def one(text: str, b: bytes, lp: float) -> dict:
            return {"token": text, "logprob": lp, "bytes": list(b)}

        return {**one(x.token, x.bytes, x.logprob), "top_logprobs": [one(*t) for t in x.top]}

    def _text_lps(self, lps) -> dict:
        offsets = []
        for x in lps:
            offsets.append(self._offset)
            self._offset += len(x.token)
        return {"tokens": [x.token for x in lps], "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [{t: lp for t, _, lp in x.top} for x in lps], "text_offset": offsets}  # fmt: skip


def usage(f: Finish) -> dict:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens}  # fmt: skip


class EventStream:
    """The SSE answer of one generation (an ASGI app, as Starlette routes may return). Entering the
    generation, which admits the request and elects its ring, happens before any header goes out."""

    def __init__(self, generator: Generator, prepared: Prepared, shape: Shape, include_usage: bool) -> None:
        self.generator, self.prepared, self.shape, self.include_usage = generator, prepared, shape, include_usage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with self.generator.generate(self.prepared) as stream:
                response = StreamingResponse(self._events(stream), media_type="text/event-stream",
                                             headers={"cache-control": "no-cache"})  # fmt: skip
                await response(scope, receive, send)  # a client that leaves cancels it, and so the ring
        except Failure as e:  # before the stream began (after, _events reports failures in-band)
            await failure_response(e)(scope, receive, send)

    async def _events(self, stream: AsyncIterator[Delta | Finish]) -> AsyncIterator[bytes]:
        shape = self.shape
        if shape.chat:
            yield sse(shape.chunk(None, first=True))
        try:
            async for item in stream:
                if isinstance(item, Delta):
                    yield sse(shape.chunk(item.text, lps=item.logprobs))
                else:
                    yield sse(shape.chunk(None, item.reason))
                    if self.include_usage:
                        yield sse(shape.usage_chunk(item))
        except Failure as e:
            yield sse(failure_event(e))
        yield sse("[DONE]")


async def _cancel_on_disconnect(request: Request, scope: trio.CancelScope) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


class OpenAIRoutes:
    def __init__(self, generator: Generator, served_models: Callable[[], list[str]]) -> None:
        self.generator = generator
        self.served_models = served_models

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/requests", self.requests, methods=["GET"]),
            Route("/v1/requests/{rid}", self.one_request, methods=["GET", "DELETE"]),
        ]

    async def chat(self, request: Request):
        return await self._answer(request, chat=True)

    async def completions(self, request: Request):
        return await self._answer(request, chat=False)

    async def _answer(self, request: Request, chat: bool):
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            body = parse_body(await read_json(request), chat)
            prepared = await self.generator.prepare(body.to_request(rid))
        except Failure as e:
            return failure_response(e)
        shape = Shape(chat, prepared.model.name, rid)
        if body.stream:
            return EventStream(self.generator, prepared, shape, body.include_usage)
        return await self._whole(request, prepared, shape, body)

    async def _whole(self, request: Request, p: Prepared, shape: Shape, body: ChatBody | CompletionBody) -> Response:
        """Generate to the end, then one JSON body; a client that leaves cancels the ring."""
        response: Response = Response(status_code=499)  # nobody is left to read it
        async with open_nursery() as nursery:
            nursery.start_soon(_cancel_on_disconnect, request, nursery.cancel_scope)
            texts: list[str] = []
            lps: list[TokenLogprob] | None = [] if p.logprobs is not None else None
            try:
                async with self.generator.generate(p) as stream:
                    async for item in stream:
                        if isinstance(item, Delta):
                            texts.append(item.text)
                            if lps is not None:
                                lps.extend(item.logprobs)
                        else:
                            response = JSONResponse(shape.body("".join(texts), item, lps))
            except Failure as e:
                response = failure_response(e)
            nursery.cancel_scope.cancel()
        return response

    async def models(self, request: Request) -> JSONResponse:
        """Every model some peer serves; for those this peer knows, context length and sampling defaults."""
        data = []
        for n in sorted(set(self.served_models())):
            item = {"id": n, "object": "model", "created": 0, "owned_by": "p2pinfer"}
            try:
                e = self.generator.model(n)
            except Failure:
                pass
            else:
                item.update(context_length=self.generator.context_limit(e), model_context_length=e.context_length,
                            n_layers=e.n_layers, format=e.format, arch=e.arch,
                            layer_bytes=e.layer_bytes, embed_bytes=e.embed_bytes, head_bytes=e.head_bytes,
                            embed_reuses_head=e.embed_reuses_head,
                            sampling_defaults=self.generator.defaults_for(e),
                            sampling_defaults_from_model=sorted(model_recommended(e.path, e.format)))  # fmt: skip
            data.append(item)
        return JSONResponse({"object": "list", "data": data})

    async def requests(self, request: Request) -> JSONResponse:
        """Requests entered at this peer: in flight, then the last finished ones (newest first)."""
        return JSONResponse({"object": "list", "data": [t.to_dict() for t in self.generator.book.all()]})

    async def one_request(self, request: Request) -> JSONResponse:
        """GET: one request entered here; DELETE: cancel it (the ring stops, every member frees its KV,
        the client's stream ends with an error event, a whole answer is a 409)."""
        rid = request.path_params["rid"]
        try:
            if request.method == "DELETE":
                track = self.generator.cancel(rid)
                log.info("request %s: cancelled by DELETE /v1/requests", rid)
                return JSONResponse({**track.to_dict(), "state": "cancelled"})
            return JSONResponse(self.generator.book.get(rid).to_dict())
        except Failure as e:
            return failure_response(e)
