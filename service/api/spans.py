"""Our part of a traced request: the stage spans under its server span, and its trace id for the access log.

Imported only when tracing is on (:func:`service.tracing.install_tracing`), as it imports OpenTelemetry.

The stage spans (``decode``, ``queue``, ``compute``, ``encode``, one set per translated image) are made once the
request is over, from the wall-clock times the translate pipeline records for each image
(:class:`service.api.inference.Stage`, left in the request state by the routes). So the pipeline and its worker
threads run no tracing code, and a batch that serves several requests needs no span of its own: each request's
``compute`` span covers its batch's inference call and carries the batch size.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Tracer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class StageSpansMiddleware:
    """Inside the server span: the trace id into the request state (the access log's ``trace_id`` field), and,
    when the request is over, its request id, direction and model version on the server span and on its stage
    spans, which each image's size and the compute span's batch size join.

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
        model_version: str | None = None
        recorded = False

        def record() -> None:
            nonlocal recorded
            recorded = True
            self._record(server, state, model_version)

        async def send_wrapper(message: Message) -> None:
            nonlocal model_version
            if message["type"] == "http.response.start":
                model_version = Headers(raw=message["headers"]).get("x-model-version")
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                record()  # now: the server span ends as this last chunk goes out
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            if not recorded:  # no complete response: the server span ends when this returns
                record()

    def _record(self, server: Span, state: dict[str, Any], model_version: str | None) -> None:
        facts = (
            ("dclgan.request_id", state.get("request_id")),
            ("dclgan.direction", state.get("direction")),
            ("dclgan.model.version", model_version),
        )
        attributes: dict[str, Any] = {key: value for key, value in facts if value is not None}
        server.set_attributes(attributes)
        outputs = state.get("translated", [])
        parent = trace.set_span_in_context(server)
        for index, out in enumerate(outputs):
            image = {**attributes, "dclgan.image.width": out.width, "dclgan.image.height": out.height}
            if len(outputs) > 1:
                image["dclgan.image.index"] = index
            for stage in out.stages:
                extra = {"dclgan.batch.size": out.result.batch_size} if stage.name == "compute" else {}
                span = self.tracer.start_span(
                    stage.name, parent, attributes={**image, **extra}, start_time=stage.start_ns
                )
                span.end(end_time=stage.end_ns)
