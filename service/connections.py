"""The HTTP connection layer: uvicorn's h11 protocol with the limits uvicorn lacks.

Uvicorn's options cover the idle keep-alive timeout (``timeout_keep_alive``) and the header size
(``h11_max_incomplete_event_size``), and both are set by :mod:`service.serve`. Three limits need
the connection itself, below the ASGI app, which only sees a request once its headers are complete:

* **a header timeout**: uvicorn starts no timer until a first response was sent, so a client that
  sends half a request line holds its socket (and a file descriptor) forever; 3,000 such clients
  made a server with 1,024 descriptors unreachable. Here a request's headers must arrive within
  ``header_timeout_s`` of its first byte (or of the connection, for the first request).
* **a connection cap**: uvicorn's ``limit_concurrency`` answers over the cap with a plain-text
  503 after reading the request; here a connection over ``max_connections`` is closed as soon as
  it is accepted, which is what protects the descriptors.
* **JSON for malformed requests**: uvicorn's own 400 for an unparsable request is plain text; here
  it is the service's ``{"error": "bad_request", ...}`` body like every other error.
* **an abort for an abandoned response**: closing a connection whose response was cut off drops the
  unsent rest instead of waiting for a client that does not read (``_AbortIfIncomplete``).

The body timeout lives in the app (``BodyLimitMiddleware``), where the body is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

BAD_REQUEST_BODY = json.dumps(
    {"error": "bad_request", "detail": "the request is not valid HTTP/1.1"}, separators=(",", ":")
).encode()


class GuardedH11Protocol(H11Protocol):
    """``H11Protocol`` plus a header timeout, a connection cap and a JSON 400 (see the module doc).

    Configure it with :func:`guarded_protocol`, which sets the two class attributes.
    """

    header_timeout_s: float = 10.0
    max_connections: int = 512

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_AbortIfIncomplete(transport, self))  # type: ignore[arg-type]
        if len(self.connections) > self.max_connections:
            logger.warning("closing a new connection: %d are open, the cap", len(self.connections) - 1)
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._arm_header_timer()  # the first bytes of a next request on a kept-alive connection
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm_header_timer()  # its headers are complete: the app has the request now

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        for event in (
            h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
            h11.Data(data=BAD_REQUEST_BODY),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            logger.info("closing a connection whose request headers took over %.1f s", self.header_timeout_s)
            self.transport.close()


class _AbortIfIncomplete:
    """The connection's transport, except that closing it while a response is incomplete aborts it.

    asyncio's ``close()`` first waits for the write buffer to drain, and a client that does not read never
    lets it: uvicorn closes the connection of a response the app gave up on (a client that stopped reading,
    see :mod:`service.api.responses`), and the socket, its descriptor and its place under ``max_connections``
    stayed held for as long as the client liked. The unsent rest of a response nobody can use is dropped.
    """

    def __init__(self, transport: asyncio.Transport, protocol: H11Protocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        cycle = self._protocol.cycle
        if cycle is not None and not cycle.response_complete and self._transport.get_write_buffer_size():
            self._transport.abort()
        else:
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def guarded_protocol(*, header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` subclass with these limits (uvicorn instantiates the class itself)."""
    return type(
        "ConfiguredH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": header_timeout_s, "max_connections": max_connections},
    )
