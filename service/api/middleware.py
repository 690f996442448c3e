"""Pure ASGI middleware: request ids, access log and request metrics; the request body size cap.

Pure ASGI (not ``BaseHTTPMiddleware``) so nothing buffers bodies or hides client disconnects from
the routes. Per-request facts travel in ``scope["state"]`` (what ``request.state`` reads and writes):
``request_id`` set here; ``direction``, the stage times (``decode_ms``, ``queue_ms``, ``compute_ms``,
``encode_ms``) and ``batch_size`` set by the translate routes; ``trace_id`` set by :mod:`service.api.spans`
when tracing is on.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.handlers import json_response
from service.errors import ErrorPolicy, MalformedRequest, PayloadTooLarge, RequestTimeout, describe
from service.metrics import ServiceMetrics

access_log = logging.getLogger("service.access")
logger = logging.getLogger(__name__)

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id_from(headers: Headers) -> str:
    """The client's ``X-Request-ID`` if it is safe to log and echo, else a fresh one."""
    given = headers.get("x-request-id", "")
    return given if _CLIENT_REQUEST_ID.match(given) else uuid.uuid4().hex


class RequestContextMiddleware:
    """Give every response an ``X-Request-ID``, count it in the metrics and write one access-log line.

    Metrics are recorded just before the last body chunk goes out, so a client that reads
    ``/metrics`` right after its response always sees its own request counted. An exception no
    handler took becomes a JSON 500 here (traceback logged, never sent), so even that response
    carries the request id and is counted.
    """

    def __init__(
        self, app: ASGIApp, metrics: ServiceMetrics, policy: ErrorPolicy, routes: Sequence[BaseRoute] = ()
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.policy = policy
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = rid = request_id_from(Headers(scope=scope))
        status = 500
        started = recorded = False

        def record() -> None:
            nonlocal recorded
            recorded = True
            self._record(scope, state, status, time.perf_counter() - start)

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                MutableHeaders(scope=message).append("X-Request-ID", rid)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            logger.exception("unhandled error in %s %s (request id %s)", scope["method"], scope["path"], rid)
            if started:
                raise
            await json_response(describe(exc, self.policy, rid))(scope, receive, send_wrapper)
        finally:
            if not recorded:  # the app never finished a response
                # A client that stopped reading its response is the client's doing (499), not a server error.
                status = 499 if state.get("client_stalled") else 500 if status < 400 else status
                record()

    def _record(self, scope: Scope, state: dict[str, Any], status: int, seconds: float) -> None:
        route = self._route(scope)
        direction = str(state.get("direction", ""))
        self.metrics.requests.labels(route, direction, str(status)).inc()
        self.metrics.request_seconds.labels(route, direction).observe(seconds)
        access_log.info(
            '%s "%s %s" %d %.1fms queue=%sms compute=%sms rid=%s',
            _client(scope),
            scope["method"],
            scope["path"],
            status,
            seconds * 1000,
            _ms(state.get("queue_ms")),
            _ms(state.get("compute_ms")),
            state["request_id"],
            extra=_access_fields(scope, state, route, status, seconds),
        )

    def _route(self, scope: Scope) -> str:
        """The route template that served the request. A request that middleware answered before routing (a
        declared body over the cap: 413) is matched against ``routes`` here, so that it is counted under its
        route rather than ``unmatched``; only the template is used, never the raw path (a bounded label)."""
        route_obj = scope.get("route")
        if route_obj is None:
            route_obj = next((r for r in self.routes if r.matches(scope)[0] is Match.FULL), None)
        return getattr(route_obj, "path", "unmatched")


# Per-request facts the translate routes (and tracing) leave in the request state, logged as JSON fields when present.
_REQUEST_FACTS = ("direction", "decode_ms", "queue_ms", "compute_ms", "encode_ms", "batch_size", "trace_id")


def _access_fields(scope: Scope, state: dict[str, Any], route: str, status: int, seconds: float) -> dict[str, Any]:
    """The access line's facts as separate fields (the JSON log's keys; the text format shows only the message)."""
    fields: dict[str, Any] = {
        "request_id": state["request_id"],
        "client": _client(scope),
        "method": scope["method"],
        "path": scope["path"],
        "route": route,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
    }
    for name in _REQUEST_FACTS:
        value = state.get(name)
        if value is not None:
            fields[name] = round(value, 2) if isinstance(value, float) else value
    return fields


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "-"


def _ms(value: object) -> str:
    return f"{value:.1f}" if isinstance(value, float) else "-"


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, without reading them, and bodies slower than
    ``timeout_s`` with 408.

    A declared ``Content-Length`` over the limit is refused before a byte of the body is read;
    a chunked or lying body is counted as it streams in, and the read that crosses the limit raises
    ``PayloadTooLarge`` into whichever route is reading (Starlette and uvicorn have no cap of their own).
    The whole body must arrive within ``timeout_s`` of the request's start: a body trickled in a byte
    at a time would otherwise hold its memory, its in-flight place and its connection indefinitely.
    This is the layer for it because it is where the body is read, and uvicorn has no body timeout.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, policy: ErrorPolicy, timeout_s: float = 60.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.policy = policy
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send, f"the body declares {declared} bytes")
            return
        received = 0
        complete = False
        deadline = time.monotonic() + self.timeout_s

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # after the body, receive() only reports a disconnect: no deadline on that
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body did not arrive within {self.timeout_s:g} s ({received} bytes did)"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise PayloadTooLarge(self._detail(f"the body exceeded it after {received} bytes"))
            return message

        await self.app(scope, limited_receive, send)

    def _detail(self, what: str) -> str:
        return f"request bodies are limited to {self.max_bytes} bytes; {what}"

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        response = json_response(describe(PayloadTooLarge(self._detail(what)), self.policy))
        # The unread body makes the connection unusable for another request: tell the client to close it.
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class SecurityHeadersMiddleware:
    """``X-Content-Type-Options: nosniff`` on every response, and a Content-Security-Policy on the docs.

    The docs pages (``/docs``, ``/redoc``) are HTML with one inline script (Swagger UI's start-up), so their
    CSP allows the app's own assets plus exactly that script, by hash, computed from the page as sent;
    styles may be inline (both UIs inject ``<style>`` elements at run time), images may be ``data:`` URIs
    (Swagger UI's icons) and ReDoc's search runs in a ``blob:`` worker.
    """

    def __init__(self, app: ASGIApp, docs_paths: tuple[str, ...]) -> None:
        self.app = app
        self.docs_paths = docs_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        docs = scope["path"] in self.docs_paths
        held: list[Message] = []

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Content-Type-Options", "nosniff")
                if docs:
                    held.append(message)  # the CSP depends on the body
                    return
            elif docs and held and message["type"] == "http.response.body":
                start = held.pop()
                MutableHeaders(scope=start).append("Content-Security-Policy", docs_policy(message.get("body", b"")))
                await send(start)
            await send(message)

        await self.app(scope, receive, send_wrapper)


_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def docs_policy(html: bytes) -> str:
    """The CSP of a docs page: its inline scripts allowed by SHA-256, everything else from this origin."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware, with its refused preflights (400, plain text "Disallowed CORS origin")
    answered as the service's JSON error body, ``bad_request``, like every other error."""

    def __init__(self, app: ASGIApp, policy: ErrorPolicy, **options: Any) -> None:
        super().__init__(app, **options)
        self.policy = policy

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        refused = json_response(describe(MalformedRequest(bytes(response.body).decode()), self.policy))
        for name, value in response.headers.items():
            if name == "vary" or name.startswith("access-control-"):
                refused.headers[name] = value
        return refused
