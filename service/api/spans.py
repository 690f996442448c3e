"""Our part of a traced request: the stage spans under its server span, and its trace id for the access log.

Imported only when tracing is on (:func:`service.tracing.install_tracing`), as it imports OpenTelemetry.

The stage spans (``decode``, ``queue``, ``compute``, ``encode``) are made once the request is over, from the
times that the translate routes record for the access log and ``Server-Timing`` (``decode_ms`` and the others in
the request state). So the pipeline and its worker threads run no tracing code, and a batch that serves several
requests needs no span of its own. The spans' durations are the measured ones; their places are not measured:
they are laid end to end, the last ending when the response starts, so a wait between two stages (an event-loop
hop, a wait for a decode thread) shows before ``decode`` rather than where it happened. For a request of several
images each figure is the slowest image's, as in ``Server-Timing``, and no stage starts before the request.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Tracer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

STAGES = ("decode", "queue", "compute", "encode")
"""The translate pipeline's stages, in order; each is a span and a ``<stage>_ms`` request-state entry."""


class StageSpansMiddleware:
    """Inside the server span: the trace id into the request state (the access log's ``trace_id`` field), and,
    when the request is over, its request id, direction and model version on the server span and on its stage
    spans, which the compute span's batch size joins.

    Requests that are not traced (an excluded URL) pass straight through; an unsampled one (the caller's
    ``traceparent`` says so) still logs its trace id, but records nothing.
    """

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = trace.get_current_span()
        context = server.get_span_context()
        if scope["type"] != "http" or not context.is_valid:
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        state["trace_id"] = trace.format_trace_id(context.trace_id)
        if not server.is_recording():
            await self.app(scope, receive, send)
            return
        entered_ns = time.time_ns()
        responded_ns = 0
        model_version: str | None = None
        recorded = False

        def record() -> None:
            nonlocal recorded
            recorded = True
            self._record(server, state, model_version, entered_ns, responded_ns or time.time_ns())

        async def send_wrapper(message: Message) -> None:
            nonlocal responded_ns, model_version
            if message["type"] == "http.response.start":
                responded_ns = time.time_ns()
                model_version = Headers(raw=message["headers"]).get("x-model-version")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()  # now: the server span ends as this last chunk goes out
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not recorded:  # no complete response: the server span ends when this returns
                record()

    def _record(
        self, server: Span, state: dict[str, Any], model_version: str | None, entered_ns: int, responded_ns: int
    ) -> None:
        facts = (
            ("dclgan.request_id", state.get("request_id")),
            ("dclgan.direction", state.get("direction")),
            ("dclgan.model.version", model_version),
        )
        attributes: dict[str, Any] = {key: value for key, value in facts if value is not None}
        server.set_attributes(attributes)
        if any(f"{stage}_ms" not in state for stage in STAGES):
            return  # not a translation, or none of its images was translated
        parent = trace.set_span_in_context(server)
        end_ns = responded_ns
        for stage in reversed(STAGES):
            start_ns = max(entered_ns, end_ns - round(state[f"{stage}_ms"] * 1e6))
            stage_attributes = (
                {**attributes, "dclgan.batch.size": state["batch_size"]} if stage == "compute" else attributes
            )
            span = self.tracer.start_span(stage, parent, attributes=stage_attributes, start_time=start_ns)
            span.end(end_time=end_ns)
            end_ns = start_ns
