"""The ASGI app every peer serves: the page, health, the cluster view, metrics, and the OpenAI routes.

Middleware, outermost first: Host allow-list (403), request counting, CORS (only for --cors-origin),
API key (401; the page itself is public, it asks for the key), JSON-only bodies (415).
"""

from __future__ import annotations

import hmac
import time
from typing import Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from p2pinfer import __version__
from p2pinfer.api.metrics import CountRequests, metrics_endpoint
from p2pinfer.api.security import HostGuard
from p2pinfer.serve.metrics import Metrics

PUBLIC_PATHS = {"/", "/favicon.ico"}  # the page asks for the key itself and sends it with every call


class AgentInfo(Protocol):
    peer_id: str
    started_at: float

    def listen_addrs(self) -> list[str]: ...
    def cluster_snapshot(self) -> dict: ...
    def status(self) -> str: ...


def openai_error(
    status: int, message: str, type_: str, code: str | None = None, headers=None, param: str | None = None
) -> JSONResponse:
    """OpenAI's error body shape, so the official clients raise the right exception class."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class ApiKeyMiddleware:
    """Bearer check on every route when a key is set (the agent sets one whenever it binds beyond loopback)."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.api_key is not None and scope["path"] not in PUBLIC_PATHS:
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                resp = openai_error(
                    401,
                    "Invalid or missing API key (send Authorization: Bearer KEY).",
                    "invalid_request_error",
                    "invalid_api_key",
                )
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def page_html() -> bytes:
    from importlib.resources import files

    return files("p2pinfer.api").joinpath("static/index.html").read_bytes()


def build_app(
    agent: AgentInfo,
    api_key: str | None,
    extra_routes: list[BaseRoute] = (),
    *,
    metrics: Metrics | None = None,
    own_hosts=lambda: set(),
    allowed_hosts: list[str] = (),
    cors_origins: list[str] = (),
) -> Starlette:
    metrics = metrics or Metrics()
    page = page_html()

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache", "X-Frame-Options": "DENY",
                                           "Content-Security-Policy": "default-src 'self' 'unsafe-inline'; "
                                           "img-src 'self' data:; frame-ancestors 'none'"})  # fmt: skip

    async def favicon(request: Request) -> Response:
        return Response(status_code=204)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": agent.status(),
                "peer_id": agent.peer_id,
                "version": __version__,
                "uptime": round(time.monotonic() - agent.started_at, 1),
                "listen_addrs": agent.listen_addrs(),
            }
        )

    async def cluster(request: Request) -> JSONResponse:
        snapshot = agent.cluster_snapshot()
        if orchestration is not None:  # what the routing policies see of each peer
            snapshot["routing"] = orchestration.routing_snapshot()
        return JSONResponse(snapshot)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return openai_error(exc.status_code, str(exc.detail), kind)

    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        return openai_error(500, f"internal error: {type(exc).__name__}", "server_error")

    # imported here: it builds on the OpenAI routes, which import this module
    from p2pinfer.api.orchestrate import JsonOrUploadGuard, orchestration_for

    orchestration = orchestration_for(agent)  # fan-out, chains, tasks, files + batches
    routes = [
        Route("/", index),
        Route("/favicon.ico", favicon),
        Route("/metrics", metrics_endpoint(metrics)),
        Route("/health", health),
        Route("/v1/cluster", cluster),
        *extra_routes,
        *(orchestration.routes_list() if orchestration is not None else []),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(HostGuard, own_hosts=own_hosts, allowed=list(allowed_hosts), error=openai_error),
            Middleware(CountRequests, metrics=metrics),
            *([Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                          allow_headers=["Authorization", "Content-Type"], max_age=600)]
              if cors_origins else []),
            Middleware(ApiKeyMiddleware, api_key=api_key),
            Middleware(JsonOrUploadGuard, error=openai_error),  # JsonBodyGuard + batch file uploads
        ],  # fmt: skip
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=orchestration.lifespan if orchestration is not None else None,
    )
