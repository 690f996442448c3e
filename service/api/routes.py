"""The HTTP endpoints: translate (single and batch), models, health, readiness and metrics.

Endpoints stay thin: checks come from ``deps``, body parsing from ``media``, the pipeline from
``inference``; each error is an exception from :mod:`service.errors` turned into JSON by its handler.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import Direction, State, require_api_key, require_metrics_key
from service.api.inference import Options, Translated, outcome, refuse_if_full, translate, unless_disconnected
from service.api.media import RAW_MEDIA_TYPES, Upload, choose_format, read_uploads
from service.api.responses import PacedResponse
from service.errors import ErrorPolicy, NotReady, Overloaded, PayloadTooLarge, QueueFull, describe
from service.generation import ServedDirection
from service.imaging import MEDIA_TYPES, OutputFormat
from service.runtime import file_variant
from service.schemas import (
    BatchItem,
    BatchResponse,
    DirectionInfo,
    ErrorBody,
    HealthResponse,
    InstanceInfo,
    ModelInfo,
    ModelsResponse,
    ReadyResponse,
)
from service.state import AppState, Phase

logger = logging.getLogger(__name__)

_ERROR_DOCS = {
    400: "Corrupt or truncated image (`corrupt_image`), or an unparsable multipart body (`bad_request`)",
    401: "Missing or unknown API key (only when `DCLGAN_API_KEYS` is set)",
    404: "Unknown direction (`unknown_direction`) or version (`unknown_version`); the detail lists the available "
    "ones",
    406: "The `Accept` header names no format the service produces",
    413: "Body over `DCLGAN_MAX_UPLOAD_BYTES`, or an image over `DCLGAN_MAX_PIXELS` or needing more memory than "
    "`DCLGAN_MAX_REQUEST_MEMORY_BYTES` (`image_too_large`)",
    415: "Neither multipart nor an image body (`unsupported_media_type`), "
    "or not a supported image (`unsupported_image`)",
    422: "No image in the expected field, or an invalid parameter",
    429: "Queue full or overloaded, when `DCLGAN_QUEUE_FULL_STATUS=429`; retry after `Retry-After` seconds",
    500: "Inference failed or an unexpected error; the detail carries the request id, never a traceback",
    503: "Not ready (starting, draining, or the direction has no healthy instance), queue full, or overloaded "
    "(in-flight or memory cap); retry after `Retry-After` seconds",
    504: "Still queued at its deadline and dropped without being computed (`deadline_exceeded`), or its batch "
    "ran past `DCLGAN_BATCH_TIMEOUT_S` (`batch_timeout`)",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}
_BINARY = {"type": "string", "format": "binary"}
_RESIZE_POLICY = (
    "Resize policy: the image is decoded (EXIF orientation applied, any mode converted to RGB), scaled down "
    "so that its longer side is at most `max_side` (the working resolution; default: the model's recommended "
    "`working_side` from `/models`, else `DCLGAN_MAX_SIDE`, which also caps it; never scaled up), "
    "reflect-padded to a multiple of 4, translated, cropped and scaled back: **the output always "
    "has exactly the input's width and height**. Larger working resolutions keep more detail but cost time "
    "in proportion to the pixel count."
)


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, all with the ``ErrorBody`` schema."""
    return {
        code: {
            "model": ErrorBody,
            "description": _ERROR_DOCS[code],
            **({"headers": _RETRY_AFTER} if code in (429, 503) else {}),
        }
        for code in codes
    }


def _image_body(field: str, *, many: bool) -> dict[str, Any]:
    image = {**_BINARY, "minLength": 1}  # an empty body or file: 422 (in a batch: that item's own 422)
    multipart = {
        "type": "object",
        "required": [field],
        "properties": {field: {"type": "array", "items": _BINARY, "minItems": 1} if many else image},
    }
    raw = {media: {"schema": image} for media in RAW_MEDIA_TYPES}
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": multipart}, **raw}}
    }


FormatQuery = Annotated[
    OutputFormat | None,
    Query(alias="format", description="output format; overrides `Accept` (default: from `Accept`, else png)"),
]
MaxSideQuery = Annotated[
    int | None, Query(ge=8, description="working resolution for this request, capped at `DCLGAN_MAX_SIDE`")
]
TimeoutHeader = Annotated[
    int | None,
    Header(
        alias="X-Request-Timeout-Ms",
        gt=0,
        description="queue deadline; can only shorten `DCLGAN_REQUEST_TIMEOUT_S`",
    ),
]

translate_router = APIRouter(prefix="/translate", tags=["translate"], dependencies=[Depends(require_api_key)])
router = APIRouter()


def _options(
    state: AppState, served: ServedDirection, fmt: OutputFormat, max_side: int | None, timeout_ms: int | None
) -> Options:
    """The request's options; its working side defaults to the model's recommended one, and no side
    exceeds ``DCLGAN_MAX_SIDE``."""
    settings = state.settings
    timeout_s = (
        settings.request_timeout_s
        if timeout_ms is None
        else min(timeout_ms / 1000, settings.request_timeout_s)
    )
    if max_side is None:
        max_side = served.model.card.input.working_side or settings.max_side
    side = min(max_side, settings.max_side)
    return Options(fmt=fmt, max_side=side, deadline=time.monotonic() + timeout_s)


def _body_memory(request: Request, state: AppState) -> AbstractContextManager[None]:
    """Reserve the request body's memory before reading it: twice its declared length (chunks, then the
    joined body), or twice the upload cap when the length is not declared."""
    cap = state.settings.max_upload_bytes
    declared = request.headers.get("content-length", "")
    size = min(int(declared), cap) if declared.isdigit() else cap
    return state.budget.hold(2 * size, PayloadTooLarge(f"request bodies are limited to {cap} bytes"))


@contextmanager
def _admitted(request: Request, served: ServedDirection, state: AppState) -> Iterator[None]:
    """Hold a translate request's place for as long as it runs: counted in flight, its body's memory reserved,
    and room checked in its direction's queue, all before the upload is read (a refused 10 MiB upload costs
    microseconds). A refusal here (503 ``not_ready``, ``overloaded``, or ``queue_full``) is counted once in
    ``dclgan_images_total``: the body is never read, so its images are never known one by one."""
    with ExitStack() as stack:
        try:
            stack.enter_context(state.admit())
            stack.enter_context(_body_memory(request, state))
            refuse_if_full(served)
        except (NotReady, Overloaded, QueueFull) as exc:
            state.metrics.images.labels(served.name, outcome(exc)).inc()
            raise
        yield


def _record_timings(request: Request, outputs: list[Translated]) -> str:
    """Put each stage's time and the batch size in the access log, and the images for trace spans (when tracing
    is on: ``service.api.spans``); return the times as a ``Server-Timing`` header. For several images each
    figure is the slowest image's (their stages overlap)."""
    if not outputs:
        return ""
    stages = {stage.name: max(out.seconds(stage.name) for out in outputs) for stage in outputs[0].stages}
    for stage, seconds in stages.items():
        setattr(request.state, f"{stage}_ms", seconds * 1000)
    request.state.batch_size = batch = max(out.result.batch_size for out in outputs)
    request.state.translated = outputs
    return ", ".join(
        f"{stage};dur={seconds * 1000:.1f}" + (f';desc="batch of {batch}"' if stage == "compute" else "")
        for stage, seconds in stages.items()
    )


@translate_router.post(
    "/{direction}",
    summary="Translate one image",
    description="Send the image as multipart field `image` or as a raw `image/*` body. " + _RESIZE_POLICY,
    response_class=Response,
    responses={
        200: {
            "description": "The translated image, exactly the input's size",
            "content": {media: {"schema": _BINARY} for media in MEDIA_TYPES.values()},
            "headers": {
                "X-Model-Version": {"description": "the model version that computed it", "schema": {"type": "string"}}
            },
        },
        **error_responses(400, 401, 404, 406, 413, 415, 422, 429, 500, 503, 504),
    },
    openapi_extra=_image_body("image", many=False),
)
async def translate_image(
    request: Request,
    state: State,
    served: Direction,
    fmt: FormatQuery = None,
    max_side: MaxSideQuery = None,
    timeout_ms: TimeoutHeader = None,
) -> Response:
    output_format = choose_format(fmt, request.headers.get("accept"))
    with _admitted(request, served, state):
        (upload,) = await read_uploads(request, field="image", max_files=1)
        options = _options(state, served, output_format, max_side, timeout_ms)
        out: Translated = await unless_disconnected(request, translate(upload.data, served, options, state))
    headers = {
        "X-Model-Version": served.model.card.version,
        "Server-Timing": _record_timings(request, [out]),
    }
    return PacedResponse(
        out.content,
        media_type=out.media_type,
        headers=headers,
        budget=state.budget,
        timeout_s=state.settings.body_timeout_s,
    )


@translate_router.post(
    "/{direction}/batch",
    summary="Translate several images in one request",
    description=(
        "Send the images as repeated multipart field `images`. Each result has its own status, so one bad "
        "image does not fail the others; images are base64-encoded in the JSON. " + _RESIZE_POLICY
    ),
    response_model=BatchResponse,
    responses=error_responses(400, 401, 404, 413, 415, 422, 429, 500, 503),
    openapi_extra=_image_body("images", many=True),
)
async def translate_batch(
    request: Request,
    state: State,
    served: Direction,
    fmt: FormatQuery = None,
    max_side: MaxSideQuery = None,
    timeout_ms: TimeoutHeader = None,
) -> Response:
    with _admitted(request, served, state):  # as for one image: no room, no reading 16 files
        uploads = await read_uploads(request, field="images", max_files=state.settings.max_batch_items)
        options = _options(state, served, fmt or "png", max_side, timeout_ms)
        jobs = asyncio.gather(
            *(translate(u.data, served, options, state) for u in uploads), return_exceptions=True
        )
        outcomes = await unless_disconnected(request, jobs)
        _record_timings(request, [o for o in outcomes if isinstance(o, Translated)])
        # The base64 and JSON of 16 images are tens of MB, a third of a second of CPU: built off the event
        # loop, and still in flight (a drain waits for it).
        body = await state.in_pool(
            _batch_body, served, uploads, outcomes, state.policy, str(request.state.request_id)
        )
    return PacedResponse(
        body, media_type="application/json", budget=state.budget, timeout_s=state.settings.body_timeout_s
    )


def _batch_body(
    served: ServedDirection,
    uploads: list[Upload],
    outcomes: list[Translated | BaseException],
    policy: ErrorPolicy,
    request_id: str,
) -> bytes:
    items = [
        _batch_item(index, upload, outcome, policy, request_id)
        for index, (upload, outcome) in enumerate(zip(uploads, outcomes, strict=True))
    ]
    card = served.model.card
    ok = sum(item.status == 200 for item in items)
    response = BatchResponse(
        model=card.name,
        version=card.version,
        direction=served.name,
        succeeded=ok,
        failed=len(items) - ok,
        results=items,
    )
    return response.model_dump_json().encode()


def _batch_item(
    index: int, upload: Upload, outcome: Translated | BaseException, policy: ErrorPolicy, request_id: str
) -> BatchItem:
    if isinstance(outcome, Translated):
        return BatchItem(
            index=index,
            filename=upload.filename,
            status=200,
            media_type=outcome.media_type,
            width=outcome.width,
            height=outcome.height,
            image=base64.b64encode(outcome.content).decode("ascii"),
        )
    info = describe(outcome, policy, request_id)
    if info.status == 500:
        logger.error("batch item %d failed", index, exc_info=outcome)
    return BatchItem(
        index=index, filename=upload.filename, status=info.status, error=info.error, detail=info.detail
    )


@router.get(
    "/models",
    tags=["models"],
    summary="Served models (one entry per version, the default first), their directions and where each runs",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(401),
)
async def list_models(state: State) -> ModelsResponse:
    generation = state.generation
    served_all = list(generation.served()) if generation is not None else []
    defaults = state.directions
    models: dict[tuple[str, str], ModelInfo] = {}
    for served in sorted(served_all, key=lambda s: s.model.name):  # stable: each model's newest version first
        card = served.model.card
        info = models.setdefault(
            (card.name, card.version),
            ModelInfo(
                name=card.name,
                version=card.version,
                default=defaults[served.name] is served,
                description=card.description,
                domains=card.domains,
                precision=file_variant(state.settings.precision),
                native_size=card.input.native_size,
                working_side=card.input.working_side,
                multiple_of=card.input.multiple_of,
                directions=[],
                provenance=card.provenance.model_dump(),
            ),
        )
        info.directions.append(
            DirectionInfo(
                name=served.name,
                source=served.spec.source,
                target=served.spec.target,
                route=f"/translate/{served.name}",
                queue_depth=served.batcher.depth(),
                instances=[
                    InstanceInfo(
                        device=inst.device,
                        provider=inst.runner.provider,
                        engine=inst.runner.engine,
                        precision=inst.runner.precision,
                        psnr_db=inst.runner.psnr_db,
                        probe_ms=inst.runner.probe_ms,
                        warm=inst.warm.is_set(),
                    )
                    for inst in served.pool.instances
                    if inst.direction.batcher is served.batcher
                ],
            )
        )
    return ModelsResponse(
        models=list(models.values()),
        max_side=state.settings.max_side,
        max_batch_size=state.settings.max_batch_size,
    )


@router.get(
    "/healthz",
    tags=["operations"],
    summary="Liveness: 200 while the process can serve, 503 once a model instance failed",
    responses={503: {"model": HealthResponse, "description": "A model instance failed to warm up"}},
)
async def healthz(state: State, response: Response) -> HealthResponse:
    failure = state.pool.failure if state.pool is not None else None
    if failure is not None:
        response.status_code = 503
        return HealthResponse(status="failed", detail=failure)
    return HealthResponse(status="alive")


@router.get(
    "/readyz",
    tags=["operations"],
    summary="Readiness: 200 once every model is loaded and warmed up, 503 while starting or draining",
    responses={503: {"model": ReadyResponse, "description": "Starting, draining or failed"}},
)
async def readyz(state: State, response: Response) -> ReadyResponse:
    phase = state.phase
    instances = state.pool.instances if state.pool is not None else []
    if phase is not Phase.READY:
        response.status_code = 503
        response.headers["Retry-After"] = str(state.policy.retry_after_s)
    return ReadyResponse(
        status=phase.value,
        ready=phase is Phase.READY,
        warm_instances=sum(inst.warm.is_set() for inst in instances),
        instances=len(instances),
    )


@router.get(
    "/metrics",
    tags=["operations"],
    summary="Prometheus metrics",
    response_class=Response,
    dependencies=[Depends(require_metrics_key)],
    responses={
        200: {"description": "Prometheus text exposition format", "content": {"text/plain": {}}},
        **error_responses(401),
    },
)
async def metrics(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
