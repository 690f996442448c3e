"""Responses sent at the pace the client reads them, counted in the memory budget until they are sent.

A translated image leaves the route as bytes, after the request's in-flight place and its memory
reservations are released. Sent in one piece, the server's transport takes the whole body into its
buffer at once, whether or not the client reads: 30 clients that never read their 7.6 MB responses held
1.36 GB beyond the budget, and kept their connections open past the keep-alive. Sent in chunks, each
send waits while the transport's buffer is full, so an unread response costs its bytes and one buffer,
and those bytes stay counted in the budget (admission refuses new work while they are held). A client
that reads nothing for ``timeout_s`` is cut off, and counted as 499 (it went away), not as a server error.
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.admission import MemoryBudget

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024  # asyncio's default write buffer high-water mark

CUT_OFF: ContextVar[bool] = ContextVar("dclgan_client_cut_off", default=False)
"""Set in the request's task when its client was cut off: uvicorn, which runs the app in that task, then
logs the unfinished response at ERROR, and :class:`service.serve.QuietCutOffs` drops that line."""


class PacedResponse(Response):
    """A complete body (with its ``Content-Length``) sent in chunks, within ``timeout_s``, counted in ``budget``."""

    def __init__(
        self,
        content: bytes,
        *,
        media_type: str,
        budget: MemoryBudget,
        timeout_s: float,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self.budget = budget
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        size = len(self.body)
        self.budget.count(size)
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for start in range(0, max(size, 1), CHUNK_BYTES):
                chunk = self.body[start : start + CHUNK_BYTES]  # the body itself when it is one chunk: no copy
                # A stall limit, as a web server's send timeout: a slow link that keeps reading is served.
                async with asyncio.timeout(self.timeout_s):
                    await send({"type": "http.response.body", "body": chunk, "more_body": start + CHUNK_BYTES < size})
        except TimeoutError:
            # The server then aborts the connection (service.connections): the client is cut off.
            scope.setdefault("state", {})["client_stalled"] = True
            CUT_OFF.set(True)
            logger.warning(
                "the client read nothing of its %d-byte response for %.0f s; closing the connection",
                size,
                self.timeout_s,
            )
        finally:
            self.budget.release(size)
