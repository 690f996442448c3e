"""The FastAPI app: ``create_app(settings)`` wires config, repository, batchers, workers, metrics and routes.

The lifespan loads the model repository (SHA-256 verified), opens one onnxruntime session per
instance (failing fast when a required GPU is missing) and starts the worker threads, which warm up
before ``/readyz`` says ready. On shutdown it drains: the batchers stop accepting, queued and running
work finishes (up to ``drain_timeout_s``), then the threads end.

This is the only module that wires the parts together; like all of ``service/`` it must never import
torch or ``training`` (a test checks ``sys.modules``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version as package_version
from typing import Any

import numpy as np
from anyio import CapacityLimiter, to_thread
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry

from service.admission import MemoryBudget
from service.api import page, v2
from service.api.handlers import install_error_handlers
from service.api.middleware import BodyLimitMiddleware, RequestContextMiddleware, SecurityHeadersMiddleware
from service.api.routes import router, translate_router
from service.batching import Batcher
from service.config import Settings, get_settings
from service.errors import ErrorPolicy
from service.metrics import build_metrics
from service.repository import InputContract, LoadedModel, ModelRepositoryError, scan_repository
from service.runtime import (
    ProviderUnavailable,
    RunnerConfig,
    default_threads,
    file_variant,
    native_side,
    open_runner,
    threads_per_session,
)
from service.state import AppState, Phase, ServedDirection
from service.workers import DeviceRunner, DirectionPlan, WorkerPool

logger = logging.getLogger(__name__)

RunnerFactory = Callable[[LoadedModel, str, str], DeviceRunner]
"""(model, direction, device) -> a runner for that direction's ONNX file on that device."""

_DESCRIPTION = (
    "Unpaired image-to-image translation with DCLGAN generators exported to ONNX. Every direction of every "
    "model in the repository has a `POST /translate/{direction}` route. Errors are JSON: "
    '`{"error": code, "detail": message}`.'
)


def onnx_runner_factory(settings: Settings, *, cpu_sessions: int) -> RunnerFactory:
    """Runners over the ONNX files, onnxruntime sessions or OpenVINO compiled models as ``settings`` choose
    (:func:`service.runtime.open_runner`).

    ``cpu_sessions``: how many CPU sessions the pool opens; with ``intra_op_threads=0`` they share the
    usable cores out instead of each taking all of them.
    """
    threads = settings.intra_op_threads or threads_per_session(cpu_sessions)

    def open_onnx(model: LoadedModel, direction: str, device: str) -> DeviceRunner:
        config = RunnerConfig(
            device=device,
            engine=settings.engine,
            precision=settings.precision,
            psnr_floor_db=settings.psnr_floor_db,
            intra_op_threads=threads,
            require_gpu=settings.require_gpu,
            conv_algo_search=settings.cudnn_conv_algo_search,
        )
        return open_runner(model, direction, config)

    return open_onnx


def warmup_input(contract: InputContract) -> np.ndarray:
    """A (1, 3, S, S) batch at the training resolution, S rounded up to the model's multiple."""
    side = native_side(contract)
    return np.random.default_rng(0).uniform(-1, 1, (1, 3, side, side)).astype(np.float32)


def start(state: AppState, runner_factory: RunnerFactory | None) -> None:
    """Load the repository, build a batcher per direction and start the worker pool (blocking).

    ``runner_factory``: ``None`` for onnxruntime sessions (:func:`onnx_runner_factory`).
    """
    settings = state.settings
    models = scan_repository(settings.models_dir)
    if not models:
        raise ModelRepositoryError(
            f"no model in {settings.models_dir.resolve()} (expected <name>/model.json)"
        )
    if runner_factory is None:
        per_device = sum(len(m.card.directions) for m in models) * settings.instances_per_device
        runner_factory = onnx_runner_factory(settings, cpu_sessions=per_device * settings.devices.count("cpu"))
    directions: dict[str, ServedDirection] = {}
    plans = []
    for model in models:
        for spec in model.card.directions:
            if spec.name in directions:
                other = directions[spec.name].model.name
                raise ModelRepositoryError(f"direction {spec.name!r} is in both {other!r} and {model.name!r}")
            model.path(spec.name, file_variant(settings.precision))  # fail now if the precision's file is missing
            batcher = Batcher(
                max_batch_size=settings.max_batch_size,
                max_batch_pixels=settings.max_batch_pixels,
                max_delay_s=settings.max_queue_delay_s,
                max_queue_size=settings.max_queue_size,
            )
            directions[spec.name] = ServedDirection(model=model, spec=spec, batcher=batcher)
            plans.append(
                DirectionPlan(
                    name=spec.name,
                    batcher=batcher,
                    open_runner=functools.partial(runner_factory, model, spec.name),
                    warmup_input=warmup_input(model.card.input),
                )
            )
    pool = WorkerPool(
        plans,
        devices=settings.devices,
        instances_per_device=settings.instances_per_device,
        observer=state.metrics,
        batch_timeout_s=settings.batch_timeout_s,
    )
    pool.start()
    _watch(state, directions, pool)
    state.directions, state.pool = directions, pool
    for name, served in directions.items():
        card = served.model.card
        logger.info("serving %s (model %s v%s) at /translate/%s", name, card.name, card.version, name)


def _watch(state: AppState, directions: dict[str, ServedDirection], pool: WorkerPool) -> None:
    """Point the state gauges at their sources and publish what runs where."""
    metrics = state.metrics
    for name, served in directions.items():
        metrics.watch(metrics.queue_depth, served.batcher.depth, name)
    for device in pool.devices:
        metrics.watch(metrics.busy_instances, functools.partial(pool.busy_count, device), device)
        metrics.watch(metrics.instances, functools.partial(pool.instance_count, device), device)
    metrics.watch(metrics.inflight_requests, lambda: state.inflight)
    metrics.watch(metrics.request_memory_bytes, lambda: state.budget.used)
    metrics.watch(metrics.ready, lambda: float(state.phase is Phase.READY))
    for inst in pool.instances:
        card = directions[inst.direction.name].model.card
        runner = inst.runner
        psnr = "" if runner.psnr_db is None else f"{runner.psnr_db:.1f}"
        metrics.model.labels(card.name, inst.direction.name, inst.device).info(
            {
                "version": card.version,
                "provider": runner.provider,
                "engine": runner.engine,
                "precision": runner.precision,
                "psnr_db": psnr,
            }
        )


def stop(state: AppState) -> None:
    """Drain: refuse new work, let queued and running work finish (bounded), stop the threads."""
    state.begin_drain()
    if state.pool is not None:
        # After a cut-off (second signal) nobody waits for the results: do not wait for the workers either.
        state.pool.stop(timeout_s=0 if state.cut_off_reason else state.drain_timeout_left())


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
    * bearer authentication is declared only when keys are configured;
    * every operation documents the statuses the layers under the routes can send (JSON bodies).
    """
    generate = app.openapi
    secured = bool(state.settings.api_keys)

    def openapi() -> dict[str, Any]:
        schema = generate()  # cached by FastAPI; the edits below are idempotent
        for path, item in schema.get("paths", {}).items():
            for operation in item.values():
                _document_operation(operation, path, state, secured)
        if not secured:
            schema.get("components", {}).pop("securitySchemes", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _document_operation(operation: dict[str, Any], path: str, state: AppState, secured: bool) -> None:
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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.io_limiter = CapacityLimiter(settings.io_threads or default_threads())
        try:
            await to_thread.run_sync(start, state, runner_factory)
        except ProviderUnavailable as exc:
            logger.error("startup failed: %s. Set DCLGAN_REQUIRE_GPU=false to allow the CPU fallback.", exc)
            raise
        except Exception as exc:
            logger.error("startup failed: %s", exc)
            raise
        try:
            yield
        finally:
            await to_thread.run_sync(stop, state)

    # FastAPIOffline serves Swagger UI, ReDoc and their favicon from the package: /docs works offline.
    app = FastAPIOffline(
        title="dclgan-serve", version=package_version("dclgan-serve"), description=_DESCRIPTION, lifespan=lifespan
    )
    app.state.service = state
    # No 307 from /translate/x/ to /translate/x: its Location would echo the client's Host header.
    app.router.redirect_slashes = False
    install_error_handlers(app, policy)
    app.add_middleware(
        BodyLimitMiddleware, max_bytes=settings.max_upload_bytes, policy=policy, timeout_s=settings.body_timeout_s
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "Accept", "X-Request-ID", "X-Request-Timeout-Ms"],
            expose_headers=["X-Request-ID", "X-Model-Version", "Retry-After", "Server-Timing"],
        )
    # FastAPIOffline serves its pages itself (its docs_url/redoc_url attributes are None): these are its paths.
    app.add_middleware(SecurityHeadersMiddleware, docs_paths=("/docs", "/redoc"))
    app.add_middleware(
        RequestContextMiddleware, metrics=state.metrics, policy=policy
    )  # outermost: sees every response
    app.include_router(translate_router)
    app.include_router(router)
    app.include_router(v2.router)  # KServe v2 health and metadata
    app.include_router(page.router)  # the try-it page at /
    _customise_openapi(app, state)
    return app
