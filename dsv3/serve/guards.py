"""What stands between the network and the app: ASGI middlewares and uvicorn's HTTP protocol, hardened.

Outermost first (`install` adds them in this order):

- `HostCheck`: the `Host` header must be one of `--allowed-hosts` (400 otherwise). The default without an
  API key is `localhost` and IP-address literals only, so a web page cannot reach the server through a
  DNS name it controls (DNS rebinding); with a key, any host.
- `SecurityHeaders`: every response carries a Content-Security-Policy that allows only this origin's
  scripts and styles, `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff` and
  `Referrer-Policy: no-referrer`.
- CORS (Starlette's `CORSMiddleware`) for `--allowed-origins`, when given; none by default.
- `KeyCheck`: with an API key, `/v1/*` requests need `Authorization: Bearer KEY` and get 401 before
  any of the body is read.
- `BodyGuard`: a body over `max_bytes` is a 413 (declared or streamed), and one that has not fully
  arrived `body_timeout` seconds after the request began is a 408 (slow bodies).

`GuardedH11Protocol` (uvicorn's h11 protocol) closes a connection whose request headers have not all
arrived `header_timeout` seconds after the connection opened or the previous response ended (slow
headers, "slowloris"). Every error is an OpenAI error object.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from typing import Any

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-frame-options", b"DENY"),
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
LOCAL_HOSTS = ("localhost", "localhost.")


def error_json(message: str, type_: str = "invalid_request_error", code: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode()


async def send_error(send: Any, status: int, message: str, code: str, type_: str = "invalid_request_error",
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_json(message, type_, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _header(scope: dict, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if key == name:
            return value
    return None


def host_name(host_header: str) -> str:
    """The host of a Host header value, lower case, without the port (`[::1]:8000` -> `::1`)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostCheck:
    """Refuse requests whose Host is not allowed. `allowed`: host names (`*` for any); None: localhost and
    IP-address literals."""

    def __init__(self, app: Any, allowed: list[str] | None) -> None:
        self.app = app
        self.any = allowed is not None and "*" in allowed
        self.allowed = None if allowed is None else {h.lower().strip("[]") for h in allowed}

    def permits(self, host: str) -> bool:
        if self.any:
            return True
        if self.allowed is None:
            return host in LOCAL_HOSTS or is_ip_literal(host)
        return host in self.allowed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            raw = _header(scope, b"host")
            host = host_name(raw.decode("latin-1")) if raw else ""
            if not self.permits(host):
                hint = ("start the server with --allowed-hosts NAME (or an API key) to serve it"
                        if self.allowed is None else "it is not among --allowed-hosts")
                return await send_error(send, 400, f"Host header {host!r} is not allowed: {hint}", "invalid_host")
        return await self.app(scope, receive, send)


class SecurityHeaders:
    """Add the CSP and framing headers to every HTTP response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [h for h in SECURITY_HEADERS if h[0] not in have]
            await send(message)

        return await self.app(scope, receive, with_headers)


class KeyCheck:
    """401 for `/v1/*` without the API key, before the body is read."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
            header = (_header(scope, b"authorization") or b"").decode("latin-1")
            given = header[7:].strip().encode("latin-1") if header[:7].lower() == "bearer " else b""
            if not hmac.compare_digest(given, self.key):
                return await send_error(send, 401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                        "invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


class BodyTooSlow(Exception):
    """The request body did not arrive within the body timeout."""


class BodyGuard:
    """413 for bodies over `max_bytes`; 408 (and the connection closed) for bodies slower than `body_timeout`."""

    def __init__(self, app: Any, max_bytes: int, body_timeout: float, too_big: Any, too_slow: Any) -> None:
        self.app, self.max_bytes, self.body_timeout = app, max_bytes, body_timeout
        self.too_big, self.too_slow = too_big, too_slow  # exception factories the app answers

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await send_error(send, 413, f"request body is larger than the limit of {self.max_bytes} bytes",
                                    "request_too_large", headers=[(b"connection", b"close")])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        seen = 0
        body_done = False

        async def guarded() -> dict:
            nonlocal seen, body_done
            if body_done:  # after the body, receive() waits for a disconnect: no deadline
                return await receive()
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.0))
            except asyncio.TimeoutError:
                raise self.too_slow() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self.too_big()
                body_done = not message.get("more_body", False)
            return message

        return await self.app(scope, guarded, send)


def guarded_protocol(header_timeout: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._requests_started = 0
            self._header_timer: asyncio.TimerHandle | None = None
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late, self._requests_started)

        def _headers_late(self, started: int) -> None:
            if self._requests_started == started and not self.transport.is_closing():
                self.transport.close()  # the headers of the next request never completed

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's headers arrived
                self._requests_started += 1
                if self._header_timer is not None:
                    self._header_timer.cancel()
                    self._header_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request already
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol
