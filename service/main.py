"""The FastAPI app: ``create_app(settings)`` wires config, the model lifecycle, metrics and routes.

The lifespan has :class:`~service.lifecycle.ModelLifecycle` load the model repository (SHA-256 verified),
open one session per instance (failing fast when a required GPU is missing) and start the worker
threads, which warm up before ``/readyz`` says ready; with ``reload_poll_s`` it also polls the repository
for changes. On shutdown it drains: the batchers stop accepting, queued and running work finishes (up to
``drain_timeout_s``), then the threads end.

This is the only module that wires the parts together; like all of ``service/`` it must never import
torch or ``training`` (a test checks ``sys.modules``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version as package_version
from typing import Any

from anyio import CapacityLimiter, to_thread
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry

from service.admission import MemoryBudget
from service.api import admin, page, v2
from service.api.deps import is_loopback
from service.api.handlers import install_error_handlers
from service.api.middleware import (
    BodyLimitMiddleware,
    JsonCORSMiddleware,
    RequestContextMiddleware,
    SecurityHeadersMiddleware,
)
from service.api.routes import router, translate_router
from service.config import Settings, get_settings
from service.errors import ErrorPolicy
from service.generation import RunnerFactory
from service.lifecycle import ModelLifecycle
from service.metrics import build_metrics
from service.runtime import ProviderUnavailable, default_threads
from service.state import AppState
from service.tracing import install_tracing, tracer_provider

logger = logging.getLogger(__name__)

_DESCRIPTION = (
    "Unpaired image-to-image translation with DCLGAN generators exported to ONNX. Every direction of every "
    "model in the repository has a `POST /translate/{direction}` route. Errors are JSON: "
    '`{"error": code, "detail": message}`.'
)


# Statuses any route can answer, from the layers under the routes: malformed HTTP (the connection
# layer), a body over the cap or too slow (BodyLimitMiddleware), anything unexpected.
_ANY_ROUTE = {
    400: "The request is not valid HTTP, or its body cannot be parsed",
    408: "The request body did not arrive within `DCLGAN_BODY_TIMEOUT_S`",
    413: "The request body is over `DCLGAN_MAX_UPLOAD_BYTES`",
    500: "Unexpected error; the detail carries the request id, never a traceback",
}


def _customise_openapi(app: FastAPI, state: AppState) -> None:
    """Make ``/openapi.json`` say exactly what this server does.

    * the ``direction`` parameter lists the served directions (a drop-down in /docs);
    * optional parameters are typed as what they accept (an integer), not as "integer or null";
    * bearer authentication is declared only when keys are configured, and the admin routes' 403 (no keys, a
      server listening beyond this machine) only when it can happen;
    * every operation documents the statuses the layers under the routes can send (JSON bodies).
    """
    generate = app.openapi
    secured = bool(state.settings.api_keys)
    refused = not secured and not is_loopback(state.settings.host)

    def openapi() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI; the edits below are idempotent
        for path, item in schema.get("paths", {}).items():
            for operation in item.values():
                _document_operation(operation, path, state, secured, refused)
        if not secured:
            schema.get("components", {}).pop("securitySchemes", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_operation(
    operation: dict[str, Any], path: str, state: AppState, secured: bool, refused: bool
) -> None:
    for param in operation.get("parameters", []):
        schema = param["schema"]
        if "anyOf" in schema:  # `int | None = None`: the client sends an integer or nothing, never null
            kinds = [k for k in schema.pop("anyOf") if k.get("type") != "null"]
            schema.update(kinds[0] if len(kinds) == 1 else {"anyOf": kinds})
        if param["name"] == "direction" and path.startswith("/translate/") and state.directions:
            schema["enum"] = sorted(state.directions)
    responses = operation.setdefault("responses", {})
    if not secured:
        operation.pop("security", None)
        responses.pop("401", None)
    if not refused:
        responses.pop("403", None)
    body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    for code, description in _ANY_ROUTE.items():
        responses.setdefault(str(code), {"description": description, "content": body})


def create_app(settings: Settings | None = None, *, runner_factory: RunnerFactory | None = None) -> FastAPI:
    """Build the app; nothing is loaded until its lifespan starts.

    Args:
        settings: defaults to :func:`get_settings` (the environment).
        runner_factory: how runners are made; defaults to onnxruntime sessions (tests pass fakes).
    """
    settings = settings or get_settings()
    policy = ErrorPolicy(queue_full_status=settings.queue_full_status, retry_after_s=settings.retry_after_s)
    state = AppState(
        settings=settings,
        metrics=build_metrics(CollectorRegistry()),
        policy=policy,
        budget=MemoryBudget(settings.max_request_memory_bytes),
    )
    lifecycle = ModelLifecycle(state, runner_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.io_limiter = CapacityLimiter(settings.io_threads or default_threads())
        try:
            await to_thread.run_sync(lifecycle.start)
        except ProviderUnavailable as exc:
            logger.error("startup failed: %s. Set DCLGAN_REQUIRE_GPU=false to allow the CPU fallback.", exc)
            raise
        except Exception as exc:
            logger.error("startup failed: %s", exc)
            raise
        if settings.reload_poll_s:
            lifecycle.poll_in_background(settings.reload_poll_s)
        try:
            yield
        finally:
            await lifecycle.stop()

    # FastAPIOffline serves Swagger UI, ReDoc and their favicon from the package: /docs works offline.
    app = FastAPIOffline(
        title="dclgan-serve", version=package_version("dclgan-serve"), description=_DESCRIPTION, lifespan=lifespan
    )
    app.state.service = state
    app.state.lifecycle = lifecycle
    # No 307 from /translate/x/ to /translate/x: its Location would echo the client's Host header.
    app.router.redirect_slashes = False
    install_error_handlers(app, policy)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_upload_bytes, policy=policy, timeout_s=settings.body_timeout_s
    )
    if settings.cors_origins:
        app.add_middleware(
            JsonCORSMiddleware,
            policy=policy,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept", "X-Request-ID", "X-Request-Timeout-Ms"],
            expose_headers=["X-Request-ID", "X-Model-Version", "Retry-After", "Server-Timing"],
        )
    # FastAPIOffline serves its pages itself (its docs_url/redoc_url attributes are None): these are its paths.
    app.add_middleware(SecurityHeadersMiddleware, docs_paths=("/docs", "/redoc"))
    # The translate routes, the rest, KServe v2 health and metadata, reload, the try-it page at /.
    routers = (translate_router, router, v2.router, admin.router, page.router)
    app.add_middleware(  # outermost: sees every response
        RequestContextMiddleware, metrics=state.metrics, policy=policy, routes=[r for rs in routers for r in rs.routes]
    )
    for each in routers:
        app.include_router(each)
    _customise_openapi(app, state)
    # OpenTelemetry traces when the OTEL_* variables name an OTLP endpoint (service/tracing.py); off, nothing runs.
    if (provider := tracer_provider()) is not None:
        install_tracing(app, provider)
    return app
