"""Request and response media: reading images from multipart or raw bodies, choosing the output format.

Two request forms are accepted, because curl users and browsers send multipart while scripts and
other services send raw bytes (the top complaint against Triton and KServe):

* ``multipart/form-data`` with the image file(s) in a named field (``image``, or ``images`` for batch);
* a raw body with ``Content-Type: image/*`` (or ``application/octet-stream``); Pillow sniffs the format.

The body size cap is enforced underneath, by ``BodyLimitMiddleware``, while these functions read.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request

from service.errors import ClientDisconnected, MalformedRequest, MissingImage, NotAcceptable, UnsupportedMediaType
from service.imaging import MEDIA_TYPES, OutputFormat

RAW_MEDIA_TYPES = (
    "image/png",
    "image/jpeg",
    "image/webp",
    "image/bmp",
    "image/tiff",
    "application/octet-stream",
)
_FORMAT_OF_MEDIA: dict[str, OutputFormat] = {media: fmt for fmt, media in MEDIA_TYPES.items()}


@dataclass(frozen=True)
class Upload:
    """One uploaded image: the client's file name (multipart only) and the encoded bytes."""

    filename: str | None
    data: bytes


async def read_uploads(request: Request, *, field: str, max_files: int) -> list[Upload]:
    """The image files of a request: every file in multipart ``field``, or the raw body.

    Raises:
        UnsupportedMediaType: neither multipart nor an image/octet-stream body.
        MalformedRequest: a multipart body that cannot be parsed, or more than ``max_files`` files.
        MissingImage: no file in ``field``, a non-file value there, or an empty raw body.
    """
    try:
        return await _read_body(request, field, max_files)
    except ClientDisconnect as exc:  # an aborted upload is the client's doing, not a server error
        raise ClientDisconnected("the client closed the connection during the upload") from exc


async def _read_body(request: Request, field: str, max_files: int) -> list[Upload]:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media == "multipart/form-data":
        return await _read_multipart(request, field, max_files)
    if media.startswith("image/") or media == "application/octet-stream":
        body = await request.body()
        if not body:
            raise MissingImage("the request body is empty")
        return [Upload(filename=None, data=body)]
    raise UnsupportedMediaType(
        f"Content-Type {media or '(none)'!r} is not accepted: send multipart/form-data with the image in "
        f"field {field!r}, or the raw image (JPEG, PNG, WebP, BMP or TIFF) with Content-Type image/* or "
        "application/octet-stream"
    )


async def _read_multipart(request: Request, field: str, max_files: int) -> list[Upload]:
    try:
        form = await request.form(max_files=max_files)
    except HTTPException as exc:  # Starlette turns multipart parse errors and its file limit into these
        if "files" in str(exc.detail).lower():
            raise MalformedRequest(f"too many files: at most {max_files} per request") from exc
        raise MalformedRequest("the multipart body cannot be parsed") from exc
    try:
        values = form.getlist(field)
        if not values:
            raise MissingImage(
                f"no file in multipart field {field!r} (fields sent: {sorted(set(form.keys()))})"
            )
        if not all(isinstance(value, UploadFile) for value in values):
            raise MissingImage(f"multipart field {field!r} must hold a file, not text")
        return [
            Upload(filename=value.filename, data=await value.read())
            for value in values
            if isinstance(value, UploadFile)
        ]
    finally:
        await form.close()


def choose_format(requested: OutputFormat | None, accept: str | None) -> OutputFormat:
    """The output format: ``?format=`` if given, else the best match of the ``Accept`` header, else PNG.

    Raises:
        NotAcceptable: ``Accept`` lists only types we cannot produce (and no ``*/*`` or ``image/*``).
    """
    if requested is not None:
        return requested
    if not accept:
        return "png"
    for media in _ranked_media(accept):
        if media in ("*/*", "image/*"):
            return "png"
        if media in _FORMAT_OF_MEDIA:
            return _FORMAT_OF_MEDIA[media]
    raise NotAcceptable(f"cannot produce any of {accept!r}; available: {', '.join(MEDIA_TYPES.values())}")


def _ranked_media(accept: str) -> list[str]:
    """Media types of an ``Accept`` header by decreasing q (stable for ties), without q=0 ones."""
    ranked: list[tuple[float, int, str]] = []
    for position, part in enumerate(accept.split(",")):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media and quality > 0:
            ranked.append((-quality, position, media.lower()))
    return [media for _, _, media in sorted(ranked)]
