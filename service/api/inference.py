"""The translate pipeline of one image, on the event loop side of the batcher.

probe the header, reserve the image's memory, decode + prepare (one pool hop) -> ``Batcher.submit``
-> await the future with a deadline -> crop, resize back + encode (pool) -> release the memory. The
event loop only ever waits; decoding, inference and encoding run in threads, and "pool" is the
bounded decode/encode pool (``io_threads``), not the event loop's default one (40 threads, which let
40 decodes of huge images run at once). Cancelling the awaiting task (the client left) cancels the
queued item, which the worker then skips; a deadline that passes while the item is still queued drops it (504).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request

from service.admission import Claim
from service.batching import InferenceResult
from service.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    InferenceFailed,
    MissingImage,
    NotReady,
    Overloaded,
    QueueFull,
)
from service.generation import ServedDirection
from service.imaging import (
    MEDIA_TYPES,
    ImageError,
    ImageTooLarge,
    OutputFormat,
    Prepared,
    decode_image,
    encode_image,
    from_output,
    probe_image,
    to_input,
    working_size,
)
from service.state import AppState

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Options:
    """Per-request choices: output format, working resolution and the deadline (``time.monotonic``)."""

    fmt: OutputFormat
    max_side: int
    deadline: float


@dataclass(frozen=True)
class Stage:
    """When one stage of one image's trip ran, in wall-clock nanoseconds (``time.time_ns``, what trace spans
    take): ``decode`` (decoding and preparing the input), ``queue``, ``compute`` (its batch's inference call),
    ``encode`` (cropping, resizing back and encoding). Decode and encode are timed inside the pool, so waiting
    for a pool thread is not counted."""

    name: str
    start_ns: int
    end_ns: int

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


@dataclass(frozen=True)
class Translated:
    """An encoded output image (exactly the input's size) and how it was computed: ``stages`` in order."""

    content: bytes
    media_type: str
    width: int
    height: int
    result: InferenceResult
    stages: tuple[Stage, ...]

    def seconds(self, stage: str) -> float:
        """How long ``stage`` took."""
        return next(s.seconds for s in self.stages if s.name == stage)


def outcome(exc: BaseException) -> str:
    """The ``dclgan_images_total`` outcome label of a failure."""
    for kind, label in (
        (ImageError, "bad_image"),
        (MissingImage, "bad_image"),
        (QueueFull, "queue_full"),
        (DeadlineExceeded, "deadline"),
        (NotReady, "not_ready"),
        (Overloaded, "overloaded"),
        (asyncio.CancelledError, "cancelled"),
    ):
        if isinstance(exc, kind):
            return label
    return "failed"


async def translate(data: bytes, served: ServedDirection, options: Options, state: AppState) -> Translated:
    """Translate one encoded image; every attempt is counted in ``dclgan_images_total`` by outcome."""
    images = state.metrics.images
    try:
        translated = await _translate(data, served, options, state)
    except BaseException as exc:
        images.labels(served.name, outcome(exc)).inc()
        raise
    images.labels(served.name, "ok").inc()
    return translated


def refuse_if_full(served: ServedDirection) -> None:
    """Refuse before the upload is even read: 503 ``not_ready`` while the direction has no healthy instance
    (its runners hang past the batch limit; other directions are still served), ``QueueFull`` when its queue
    is full."""
    if not served.healthy:
        raise NotReady(f"direction {served.name} has no healthy model instance right now")
    served.batcher.ensure_room()


async def _translate(data: bytes, served: ServedDirection, options: Options, state: AppState) -> Translated:
    if not data:  # an empty file in a multipart field: say so, rather than "not a supported image"
        raise MissingImage("the uploaded file is empty")
    contract = served.model.card.input
    max_pixels = state.settings.max_pixels
    served.batcher.ensure_room()  # an overload is refused in microseconds, not after a decode
    claim = Claim(state.budget)

    def prepare() -> tuple[Prepared, Stage]:
        # One pool hop for header, reservation and decode: the header probe alone is microseconds of
        # work, less than a hand-off costs, and it must not run on the event loop (a JPEG can make
        # Pillow walk thousands of markers before its size).
        start = time.time_ns()
        with claim.in_thread():
            probe = probe_image(data, max_pixels=max_pixels)
            work_w, work_h = working_size(probe.width, probe.height, max_side=options.max_side)
            need = probe.decode_bytes(work_w * work_h)
            too_large = ImageTooLarge(
                f"a {probe.width}x{probe.height} {probe.mode} image needs about {need} bytes to translate; "
                f"the server's limit is {state.budget.capacity}"
            )
            claim.take(need, too_large)
            img = decode_image(data, max_pixels=max_pixels)
            prepared = to_input(
                img, max_side=options.max_side, multiple_of=contract.multiple_of, min_size=contract.min_size
            )
        return prepared, Stage("decode", start, time.time_ns())

    try:
        prepared, decode = await state.in_pool(prepare)
        remaining = options.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the image could be queued")
        submitted = time.time_ns()
        future = served.batcher.submit(prepared.array, timeout_s=remaining)
        result = await await_result(future, options.deadline)

        def finish() -> tuple[bytes, Stage]:
            start = time.time_ns()
            with claim.in_thread():
                try:
                    image = from_output(result.output, prepared)
                except ValueError as exc:  # wrong shape or NaN: the model is broken, not the request
                    raise InferenceFailed("the model returned an unusable output") from exc
                content = encode_image(image, options.fmt)
            return content, Stage("encode", start, time.time_ns())

        content, encode = await state.in_pool(finish)
    finally:
        claim.close()
    width, height = prepared.orig_size
    started = submitted + round(result.queue_s * 1e9)  # the worker times the queue and the call from submission
    queue = Stage("queue", submitted, started)
    compute = Stage("compute", started, started + round(result.compute_s * 1e9))
    stages = (decode, queue, compute, encode)
    return Translated(content, MEDIA_TYPES[options.fmt], width, height, result, stages)


async def await_result(future: Future[InferenceResult], deadline: float) -> InferenceResult:
    """Wait for a queued item; at ``deadline`` drop it if it is still queued (504), else keep waiting.

    Once running an item cannot be recalled, so its result is awaited past the deadline. If the
    awaiting task is cancelled, the item is cancelled too, so the worker never computes it.
    """
    waiter = asyncio.wrap_future(future)
    # Consume the outcome even if nobody awaits it any more (no "exception was never retrieved" noise).
    waiter.add_done_callback(lambda f: f.cancelled() or f.exception())
    try:
        done, _ = await asyncio.wait({waiter}, timeout=max(0.0, deadline - time.monotonic()))
        if not done and future.cancel():
            raise DeadlineExceeded("still queued at its deadline; dropped without being computed")
        return await waiter
    except asyncio.CancelledError:
        future.cancel()
        raise


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` (after the request body has been read), cancelling it if the client disconnects.

    Starlette does not cancel a handler when its client goes away, so this listens for the ASGI
    ``http.disconnect`` message itself.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        logger.info("client disconnected; its queued work was dropped")
        raise ClientDisconnected("the client disconnected before the result was ready")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
