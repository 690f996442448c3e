"""Tracing switch: OpenTelemetry spans of each request, sent over OTLP, when the environment names an endpoint.

On when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, unless
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER`` names another exporter than ``otlp`` (``none`` included).
Off, this module imports nothing of OpenTelemetry and adds nothing to the request path. (FastAPI itself imports
``opentelemetry-api`` from 0.16x on, for a native telemetry that stays idle while no global provider is set;
nothing here sets one.)

The ``OTEL_*`` variables belong to the OpenTelemetry SDK, which reads them itself (endpoint, headers, timeout,
sampler, propagators, resource attributes). This module reads only the few that decide whether tracing is on,
so they are not :class:`~service.config.Settings` fields: two readers of one variable could disagree.

Export is OTLP over HTTP/protobuf (``opentelemetry-exporter-otlp-proto-http``, the ``otel`` extra): it needs
``requests`` and ``protobuf``, where the gRPC exporter brings ``grpcio``'s native wheel. Spans leave through a
``BatchSpanProcessor``, on its own thread, so a slow collector never delays a response; the provider flushes it
at interpreter exit (its ``atexit`` hook), after uvicorn's graceful shutdown.

The server span comes from ``opentelemetry-instrumentation-fastapi``, which continues a caller's trace from its
``traceparent`` header (W3C Trace Context, the default of ``OTEL_PROPAGATORS``); :mod:`service.api.spans` adds
the stage spans under it and the trace id to the access log.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from importlib.metadata import version
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

logger = logging.getLogger(__name__)

SERVICE_NAME = "dclgan-serve"
_HTTP_PROTOBUF = "http/protobuf"


def otlp_endpoint(environ: Mapping[str, str]) -> str | None:
    """The OTLP endpoint that ``environ`` sends spans to, or ``None`` when it leaves tracing off.

    An endpoint for another OTLP protocol (gRPC) is refused with a warning, not followed: the installed
    exporter speaks HTTP/protobuf only, and each of its requests would fail.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if (environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp") != "otlp":
        return None
    endpoint = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        or _HTTP_PROTOBUF
    )
    if endpoint and protocol != _HTTP_PROTOBUF:
        logger.warning("tracing off: OTLP protocol %s is not supported, only %s", protocol, _HTTP_PROTOBUF)
        return None
    return endpoint or None


def tracer_provider() -> TracerProvider | None:
    """A provider that batches spans to the configured OTLP endpoint; ``None`` when tracing is off.

    With an endpoint configured but the ``otel`` extra missing, tracing stays off with a warning rather than
    stopping the service: platforms often set ``OTEL_EXPORTER_OTLP_ENDPOINT`` for every container they run.
    """
    endpoint = otlp_endpoint(os.environ)
    if endpoint is None:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        logger.warning("tracing off: an OTLP endpoint is set but the otel extra is not installed (%s)", exc)
        return None
    # Our name and version are defaults: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override them.
    defaults = Resource.create({"service.name": SERVICE_NAME, "service.version": version("dclgan-serve")})
    provider = TracerProvider(resource=defaults.merge(OTELResourceDetector().detect()))
    # No arguments: the exporter reads its endpoint (adding /v1/traces to a base one), headers and timeout itself.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    logger.info("tracing on: spans go to %s (OTLP, %s)", endpoint, _HTTP_PROTOBUF)
    return provider


def install_tracing(app: FastAPI, provider: TracerProvider) -> None:
    """Trace ``app``'s HTTP requests with ``provider``: a server span each, our stage spans under it.

    Call before the app serves: its middleware stack is built on the first request or lifespan event. The
    provider is passed, never made global, so each app (and each test) has its own, and FastAPI's native
    telemetry, which follows the global provider, stays idle instead of making a second server span.
    OpenTelemetry's metrics are left off (a no-op meter): ``/metrics`` already has the request metrics.
    """
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.metrics import NoOpMeterProvider

    from service.api.spans import StageSpansMiddleware

    app.add_middleware(StageSpansMiddleware, tracer=provider.get_tracer(__name__, version("dclgan-serve")))
    # No spans for each ASGI receive and send message: two more per request that say nothing new.
    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=provider, meter_provider=NoOpMeterProvider(), exclude_spans=["receive", "send"]
    )
