"""Every error the service reports, and the one JSON body they all share: ``{"error": ..., "detail": ...}``.

Exception tree (``status`` is the HTTP code, ``error`` the stable machine-readable code)::

    ServiceError                     500 internal_error
     +-- MalformedRequest            400 bad_request            unparsable multipart, too many files
     +-- Unauthorized                401 unauthorized           missing or wrong bearer key
     +-- Forbidden                   403 forbidden              an admin route with no keys set, served beyond loopback
     +-- UnknownDirection            404 unknown_direction      names the available directions
     +-- UnknownVersion              404 unknown_version        names the direction's available versions
     +-- ReloadFailed                409 reload_failed          the new models could not be loaded; the old serve
     +-- ReloadInProgress            409 reload_in_progress     another reload is running
     +-- NotAcceptable               406 not_acceptable         Accept names no format we produce
     +-- PayloadTooLarge             413 payload_too_large      body over max_upload_bytes
     +-- UnsupportedMediaType        415 unsupported_media_type neither multipart nor image/*
     +-- MissingImage                422 validation_error       no file in the expected form field
     +-- RequestTimeout              408 request_timeout        the body did not arrive in time
     +-- Unavailable                 503 (+ Retry-After)
     |    +-- NotReady               503 not_ready              starting, draining, failed or cut off by the drain
     |    +-- QueueFull              503 or 429 queue_full      bounded queue full (``queue_full_status``)
     |    +-- Overloaded             503 or 429 overloaded      in-flight or decoded-memory cap reached
     +-- ClientDisconnected          499 client_closed_request  the client left; its queued work was dropped
     +-- DeadlineExceeded            504 deadline_exceeded      still queued at its deadline, never computed
     |    +-- BatchTimedOut          504 batch_timeout          its batch ran past ``batch_timeout_s``
     +-- InferenceFailed             500 inference_failed       the runner raised or returned a wrong batch

Image errors from :mod:`service.imaging` map to 415 ``unsupported_image``, 400 ``corrupt_image`` and
413 ``image_too_large``. Anything else is a 500 ``internal_error`` whose body carries the request id,
never a traceback (the traceback goes to the log). Details are the service's own sentences: library
messages and exception text stay in the log.

Pure Python (no FastAPI/Starlette): the batcher and the workers raise these too;
:mod:`service.api.handlers` turns them into responses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from service.imaging import CorruptImage, ImageError, ImageTooLarge, UnsupportedImage

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of the service's own errors; ``str(exc)`` is the ``detail`` of the JSON body."""

    status: int = 500
    error: str = "internal_error"


class MalformedRequest(ServiceError):
    status, error = 400, "bad_request"


class Unauthorized(ServiceError):
    status, error = 401, "unauthorized"


class Forbidden(ServiceError):
    status, error = 403, "forbidden"


class UnknownDirection(ServiceError):
    status, error = 404, "unknown_direction"


class UnknownVersion(ServiceError):
    status, error = 404, "unknown_version"


class ReloadFailed(ServiceError):
    """The repository's new state could not be loaded or warmed up; the versions served before still are."""

    status, error = 409, "reload_failed"


class ReloadInProgress(ServiceError):
    status, error = 409, "reload_in_progress"


class NotAcceptable(ServiceError):
    status, error = 406, "not_acceptable"


class PayloadTooLarge(ServiceError):
    status, error = 413, "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status, error = 415, "unsupported_media_type"


class MissingImage(ServiceError):
    status, error = 422, "validation_error"


class RequestTimeout(ServiceError):
    status, error = 408, "request_timeout"


class Unavailable(ServiceError):
    """Try again later: always sent with ``Retry-After``."""

    status, error = 503, "unavailable"


class NotReady(Unavailable):
    error = "not_ready"


class QueueFull(Unavailable):
    error = "queue_full"


class Overloaded(Unavailable):
    """Too many requests in flight, or not enough of the decoded-memory budget left for this image."""

    error = "overloaded"


class ClientDisconnected(ServiceError):
    """Nobody reads this response; 499 (nginx's code) only labels it in the metrics and the access log."""

    status, error = 499, "client_closed_request"


class DeadlineExceeded(ServiceError):
    status, error = 504, "deadline_exceeded"


class BatchTimedOut(DeadlineExceeded):
    error = "batch_timeout"


class InferenceFailed(ServiceError):
    status, error = 500, "inference_failed"


_IMAGE_ERRORS: dict[type[ImageError], tuple[int, str]] = {
    UnsupportedImage: (415, "unsupported_image"),
    CorruptImage: (400, "corrupt_image"),
    ImageTooLarge: (413, "image_too_large"),
}


@dataclass(frozen=True)
class ErrorPolicy:
    """The configurable part of error reporting (from ``Settings``)."""

    queue_full_status: int = 503
    retry_after_s: int = 1


@dataclass(frozen=True)
class ErrorInfo:
    """What a client is told about one failure: status, JSON body and extra headers."""

    status: int
    error: str
    detail: Any
    headers: dict[str, str]

    def body(self) -> dict[str, Any]:
        return {"error": self.error, "detail": self.detail}


def describe(exc: BaseException, policy: ErrorPolicy, request_id: str = "") -> ErrorInfo:
    """Map any exception to what the client sees; shared by the handlers and the per-item batch results."""
    if isinstance(exc, ServiceError):
        status = policy.queue_full_status if isinstance(exc, QueueFull | Overloaded) else exc.status
        headers = {"Retry-After": str(policy.retry_after_s)} if isinstance(exc, Unavailable) else {}
        if isinstance(exc, Unauthorized):
            headers["WWW-Authenticate"] = "Bearer"
        if isinstance(exc, RequestTimeout | PayloadTooLarge):
            headers["Connection"] = "close"  # the rest of the body is never read: the connection is spent
        return ErrorInfo(status, exc.error, str(exc), headers)
    for kind, (status, error) in _IMAGE_ERRORS.items():
        if isinstance(exc, kind):
            return ErrorInfo(status, error, str(exc), {})
    suffix = f" (request id {request_id})" if request_id else ""
    return ErrorInfo(500, "internal_error", f"internal server error{suffix}", {})
