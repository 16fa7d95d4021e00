"""GET /metrics in Prometheus text format, and the middleware counting every HTTP answer."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from p2pinfer.serve.metrics import Metrics

KNOWN_ROUTES = {"/", "/health", "/metrics", "/v1/cluster", "/v1/requests", "/v1/models", "/v1/chat/completions",
                "/v1/completions"}  # fmt: skip


def metrics_endpoint(metrics: Metrics):
    async def endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return endpoint


class CountRequests:
    """Counts every HTTP answer by route (unknown paths as "other") and status code."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in KNOWN_ROUTES else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
