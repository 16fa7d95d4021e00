"""What keeps the local endpoint for local clients: a Host allow-list, JSON-only bodies, opt-in CORS.

- Host allow-list (DNS rebinding): a web page on evil.example can point its own name at 127.0.0.1
  and then read our answers as same-origin. The browser still sends `Host: evil.example`, so only
  names we know are answered: loopback names, this peer's own addresses and --allowed-host; others
  get 403. `--allowed-host '*'` turns the check off (behind a reverse proxy that checks it).
- JSON-only bodies: a page on any origin may make the browser POST `text/plain` or a form without
  a preflight; requiring `application/json` forces a preflight, which only --cors-origin passes.
- CORS: off unless --cors-origin names origins; `*` only together with an API key (config.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
BODY_METHODS = {"POST", "PUT", "PATCH"}


def host_name(header: str) -> str:
    """The name part of a Host header: no port, no IPv6 brackets, lower case, no trailing dot."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostGuard:
    """403 for a Host header naming something other than this peer (requests without one pass:
    HTTP/1.0 tools send none, and browsers always send one)."""

    def __init__(self, app: ASGIApp, own_hosts: Callable[[], set[str]], allowed: list[str], error) -> None:
        self.app = app
        self.own_hosts = own_hosts
        self.allowed = {host_name(h) for h in allowed}
        self.any = "*" in allowed
        self.error = error

    def allows(self, name: str) -> bool:
        if self.any or is_loopback_name(name) or name in self.allowed:
            return True
        return name in {host_name(h) for h in self.own_hosts()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            raw = dict(scope["headers"]).get(b"host")
            if raw is not None:
                name = host_name(raw.decode("latin-1"))
                if not self.allows(name):
                    resp = self.error(
                        403,
                        f"Host {name!r} is not one of this peer's names (a DNS rebinding guard); "
                        f"start the agent with --allowed-host {name} to allow it",
                        "invalid_request_error",
                        "host_not_allowed",
                    )
                    await resp(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class JsonBodyGuard:
    """415 for a request with a body (POST, PUT, PATCH) whose Content-Type is not application/json."""

    def __init__(self, app: ASGIApp, error) -> None:
        self.app = app
        self.error = error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in BODY_METHODS:
            ctype = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            media = ctype.split(";", 1)[0].strip().lower()
            if media != "application/json":
                resp = self.error(
                    415,
                    f"request bodies must be sent as Content-Type: application/json, not {media or 'none'!r}",
                    "invalid_request_error",
                    "unsupported_media_type",
                )
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
