"""Orchestration routes: fan-out, chains, tasks, routing inputs, and OpenAI's files + batches.

- ``POST /v1/p2pinfer/fanout`` (orchestrate/fanout.py), ``POST /v1/p2pinfer/chain`` (chains.py): run
  while the client waits (fan-out may stream SSE); a client that goes away cancels the task.
- ``GET /v1/p2pinfer/tasks``, ``GET /v1/p2pinfer/tasks/{id}``, ``POST /v1/p2pinfer/tasks/{id}/cancel``:
  fan-outs, chains and batches entered here; cancelling one cancels every part's ring. The parts also
  show in ``/v1/requests`` with their ``task`` and ``part``.
- ``GET /v1/p2pinfer/routing?model=NAME``: every candidate peer's routing inputs and the ring each
  policy would elect now.
- ``POST /v1/files`` (multipart, purpose ``batch``), ``GET /v1/files[/{id}[/content]]``,
  ``DELETE /v1/files/{id}``, ``POST /v1/batches``, ``GET /v1/batches[/{id}]``,
  ``POST /v1/batches/{id}/cancel``: OpenAI's shapes, so the official client's calls work.

Uploads are the one non-JSON body the API takes: ``multipart/form-data`` on ``POST /v1/files`` only,
and only with an ``Authorization`` header (a header a cross-site page cannot send without a CORS
preflight, which keeps JsonBodyGuard's reason intact).
"""

from __future__ import annotations

import json
import logging
from contextlib import asynccontextmanager
from email import policy
from email.parser import BytesParser
from pathlib import Path

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from p2pinfer.api.app import openai_error
from p2pinfer.api.openai import failure_response, read_json
from p2pinfer.api.security import JsonBodyGuard
from p2pinfer.cluster.ring import Candidate, ClusterTooSmall
from p2pinfer.cluster.routing import POLICIES, describe_inputs, known_rtt, route
from p2pinfer.orchestrate import batches, chains, fanout
from p2pinfer.orchestrate.measure import Measurements, run_probes
from p2pinfer.orchestrate.runner import AVOID, Runner
from p2pinfer.orchestrate.tasks import TaskRegistry
from p2pinfer.serve.entry import candidates_for
from p2pinfer.serve.failures import Failure, bad_request
from p2pinfer.serve.generate import Generator

log = logging.getLogger("p2pinfer.orchestrate")

UPLOAD_PATH = "/v1/files"


class JsonOrUploadGuard(JsonBodyGuard):
    """JsonBodyGuard, but a multipart upload to /v1/files with an Authorization header passes."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == UPLOAD_PATH:
            headers = dict(scope["headers"])
            media = headers.get(b"content-type", b"").decode("latin-1").split(";", 1)[0].strip().lower()
            if media == "multipart/form-data" and headers.get(b"authorization"):
                await self.app(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _not_found(msg: str) -> JSONResponse:
    return openai_error(404, msg, "invalid_request_error", "not_found")


class TaskResponse(Response):
    """Runs `work(emit)` while answering: SSE events as `emit` is called, or one JSON body at the end.
    The client going away cancels the task."""

    def __init__(self, task, work, stream: bool) -> None:
        self.task, self.work, self.stream = task, work, stream
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def emit(event: dict) -> None:
            nonlocal started
            if not self.stream:
                return
            if not started:
                started = True
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})  # fmt: skip
            data = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                self.task.scope.cancel()
                if self.task.state == "running":
                    self.task.state = "cancelled"
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_disconnect)
            try:
                result = await self.work(emit)
            except Exception as e:
                log.exception("task %s failed", self.task.id)
                self.task.state = "error"
                if started:
                    await emit({"type": "error", "error": {"message": str(e), "type": "server_error"}})
                    await send(
                        {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}
                    )
                else:
                    await failure_response(e)(scope, receive, send)
                nursery.cancel_scope.cancel()
                return
            if self.stream:
                await emit({"type": "result", **result})
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            else:
                await JSONResponse(result)(scope, receive, send)
            nursery.cancel_scope.cancel()


def parse_multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """{field name: (filename, bytes)} of a multipart/form-data body."""
    msg = BytesParser(policy=policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body
    )
    if not msg.is_multipart():
        raise bad_request("the upload is not multipart/form-data")
    out = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name:
            out[str(name)] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return out


class Orchestration:
    def __init__(self, generator: Generator, data_dir: Path, *, records=None, keeper=None,
                 announcer=None) -> None:  # fmt: skip
        self.generator = generator
        self.entry = generator.entry
        self.runner = Runner(generator)
        self.tasks = TaskRegistry()
        self.records = records or self.entry.records
        self.keeper, self.announcer = keeper, announcer  # net/keeper.py: connected peers, RTT pings
        self.measure = Measurements(self.entry.self_id)
        self.entry.routing_inputs = self.routing_inputs
        concurrency = max(1, min(4, self.entry.max_requests // 2))
        self.batches = batches.BatchService(batches.BatchStore(Path(data_dir) / "batches"), self.runner, self.tasks,
                                            concurrency)  # fmt: skip

    def routing_inputs(self):
        pending: dict[str, int] = {}
        for ring in list(self.entry.rings.values()):
            for m in ring:
                pending[m.peer_id] = pending.get(m.peer_id, 0) + 1
        return self.measure.inputs(self.records(), pending, AVOID.get())

    def routing_snapshot(self) -> dict:
        """Per peer, the routing policies' inputs (model-independent: warm shards are per model, see
        /v1/p2pinfer/routing?model=NAME)."""
        inputs = self.routing_inputs()
        cands = [Candidate(r.peer_id, r.memory_free, r.active_requests, r.compute)
                 for r in self.records() if r.can_compute and not r.leave]  # fmt: skip
        speeds = inputs.speeds(cands)
        peers = []
        for c in sorted(cands, key=lambda c: c.peer_id):
            peers.append({"peer_id": c.peer_id, "load": c.load, "pending": inputs.pending.get(c.peer_id, 0),
                          "compute": c.compute, "rtt_ms": known_rtt(inputs, c.peer_id),
                          "observed_tps": inputs.tps.get(c.peer_id), "expected_tps": round(speeds[c.peer_id], 3)})  # fmt: skip
        return {"default": self.generator.default_routing, "policies": list(POLICIES), "peers": peers}

    @asynccontextmanager
    async def lifespan(self, app):
        async with trio.open_nursery() as nursery:
            await nursery.start(self.batches.run)
            if self.keeper is not None:
                nursery.start_soon(run_probes, self.measure, self.keeper.rtt_ms, self._probe_targets,
                                   lambda: list(self.generator.book.recent), self._publish)  # fmt: skip
            yield
            nursery.cancel_scope.cancel()

    def _probe_targets(self) -> list[str]:
        connected = self.keeper.connected_peers()
        return [
            r.peer_id for r in self.records() if r.peer_id != self.entry.self_id and r.peer_id in connected
        ]

    def _publish(self, extra: dict) -> None:
        if self.announcer is not None:
            self.announcer.extra = extra

    def routes_list(self) -> list[Route]:
        return [
            Route("/v1/p2pinfer/fanout", self.fanout, methods=["POST"]),
            Route("/v1/p2pinfer/chain", self.chain, methods=["POST"]),
            Route("/v1/p2pinfer/tasks", self.list_tasks, methods=["GET"]),
            Route("/v1/p2pinfer/tasks/{id}", self.get_task, methods=["GET"]),
            Route("/v1/p2pinfer/tasks/{id}/cancel", self.cancel_task, methods=["POST"]),
            Route("/v1/p2pinfer/routing", self.routing, methods=["GET"]),
            Route("/v1/files", self.upload, methods=["POST"]),
            Route("/v1/files", self.list_files, methods=["GET"]),
            Route("/v1/files/{id}", self.get_file, methods=["GET"]),
            Route("/v1/files/{id}", self.delete_file, methods=["DELETE"]),
            Route("/v1/files/{id}/content", self.file_content, methods=["GET"]),
            Route("/v1/batches", self.create_batch, methods=["POST"]),
            Route("/v1/batches", self.list_batches, methods=["GET"]),
            Route("/v1/batches/{id}", self.get_batch, methods=["GET"]),
            Route("/v1/batches/{id}/cancel", self.cancel_batch, methods=["POST"]),
        ]

    async def _json(self, request: Request) -> dict:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise bad_request("request body must be a JSON object")
        return body

    # --- fan-out and chains ---------------------------------------------------------------------
    async def fanout(self, request: Request) -> Response:
        try:
            body = await self._json(request)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise bad_request("'stream' must be a boolean", "stream")
            aggregate, chat, bodies, parsed = await fanout.prepare(self.runner, body)
        except Exception as e:
            return failure_response(e)
        task = self.tasks.new("fanout", fanout.new_id())
        task.detail = {"aggregate": aggregate, "branches": len(bodies)}

        async def work(emit):
            return await fanout.run_fanout(self.runner, task, aggregate, chat, bodies, parsed,
                                           emit if stream else None)  # fmt: skip

        return TaskResponse(task, work, stream)

    async def chain(self, request: Request) -> Response:
        try:
            body = await self._json(request)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise bad_request("'stream' must be a boolean", "stream")
            steps, deps, output, chain_input = await chains.prepare(self.runner, body)
        except Exception as e:
            return failure_response(e)
        task = self.tasks.new("chain", chains.new_id())
        task.detail = {"steps": [s["name"] for s in steps]}

        async def work(emit):
            return await chains.run_chain(self.runner, task, body, steps, deps, output, chain_input,
                                          emit if stream else None)  # fmt: skip

        return TaskResponse(task, work, stream)

    # --- tasks and routing ----------------------------------------------------------------------
    async def list_tasks(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": self.tasks.list()})

    async def get_task(self, request: Request) -> JSONResponse:
        t = self.tasks.get(request.path_params["id"])
        return JSONResponse(t.to_dict()) if t else _not_found(f"no task {request.path_params['id']!r}")

    async def cancel_task(self, request: Request) -> JSONResponse:
        tid = request.path_params["id"]
        t = self.tasks.get(tid)
        if t is None:
            return _not_found(f"no task {tid!r}")
        if t.kind == "batch":
            self.batches.cancel(tid)
        else:
            self.tasks.cancel(tid)
        return JSONResponse(t.to_dict())

    async def routing(self, request: Request) -> JSONResponse:
        try:
            entry = self.generator.model(request.query_params.get("model"))
        except Failure as e:
            return failure_response(e)
        cands, needs, inputs = (
            candidates_for(self.records(), entry),
            self.entry.needs(entry),
            self.routing_inputs(),
        )
        rings = {}
        for p in POLICIES:
            try:
                rings[p] = [[m.peer_id, m.start, m.end] for m in route(p, cands, needs, inputs=inputs)]
            except ClusterTooSmall as e:
                rings[p] = str(e)
        return JSONResponse({"model": entry.name, "self": self.entry.self_id, "default": self.generator.default_routing,
                             "peers": describe_inputs(cands, needs, inputs), "rings": rings})  # fmt: skip

    # --- files ----------------------------------------------------------------------------------
    async def upload(self, request: Request) -> Response:
        try:
            ctype = request.headers.get("content-type", "")
            data = b""
            async for chunk in request.stream():
                data += chunk
                if len(data) > batches.MAX_FILE_BYTES + 64 * 1024:
                    return openai_error(413, f"files are limited to {batches.MAX_FILE_BYTES} bytes",
                                        "invalid_request_error", "file_too_large")  # fmt: skip
            fields = parse_multipart(ctype, data)
            purpose = fields.get("purpose", (None, b""))[1].decode("utf-8", "replace").strip()
            if purpose != "batch":
                raise bad_request("only purpose 'batch' is supported", "purpose")
            if "file" not in fields:
                raise bad_request("the upload has no 'file' field", "file")
            filename, content = fields["file"]
            if len(content) > batches.MAX_FILE_BYTES:
                return openai_error(413, f"files are limited to {batches.MAX_FILE_BYTES} bytes",
                                    "invalid_request_error", "file_too_large")  # fmt: skip
            obj = self.batches.store.add_file(content, filename or "upload.jsonl", purpose)
        except Exception as e:
            return failure_response(e)
        return JSONResponse(obj)

    async def list_files(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": self.batches.store.files(), "has_more": False})

    async def get_file(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse(self.batches.store.file(request.path_params["id"]))
        except batches.NotFound as e:
            return _not_found(str(e))

    async def delete_file(self, request: Request) -> JSONResponse:
        fid = request.path_params["id"]
        try:
            self.batches.store.delete_file(fid)
        except batches.NotFound as e:
            return _not_found(str(e))
        return JSONResponse({"id": fid, "object": "file", "deleted": True})

    async def file_content(self, request: Request) -> Response:
        try:
            data = self.batches.store.file_bytes(request.path_params["id"])
        except batches.NotFound as e:
            return _not_found(str(e))
        return Response(data, media_type="application/jsonl")

    # --- batches --------------------------------------------------------------------------------
    async def create_batch(self, request: Request) -> Response:
        try:
            return JSONResponse(self.batches.create(await self._json(request)))
        except Exception as e:
            return failure_response(e)

    async def list_batches(self, request: Request) -> JSONResponse:
        data = self.batches.store.batches()
        return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None, "has_more": False})  # fmt: skip

    async def get_batch(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse(self.batches.store.batch(request.path_params["id"]))
        except batches.NotFound as e:
            return _not_found(str(e))

    async def cancel_batch(self, request: Request) -> JSONResponse:
        try:
            return JSONResponse(self.batches.cancel(request.path_params["id"]))
        except batches.NotFound as e:
            return _not_found(str(e))


def orchestration_for(agent) -> Orchestration | None:
    """The orchestration of a running Agent (None for an app built without the request path)."""
    generator = getattr(agent, "generator", None)
    settings = getattr(agent, "settings", None)
    if generator is None or settings is None:
        return None
    membership = getattr(agent, "membership", None)
    return Orchestration(
        generator,
        settings.data_dir,
        keeper=getattr(agent, "keeper", None),
        announcer=membership.announcer if membership is not None else None,
    )
