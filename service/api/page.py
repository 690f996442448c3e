"""The try-it page: ``GET /`` and its assets under ``/static/``, plain files from ``service/static``.

The page is a client of the public API like any other (``GET /models``, ``POST /translate/{direction}``),
so nothing here touches the app state. Assets are a fixed list with explicit media types, rather than a
``StaticFiles`` mount, so the ``Content-Type`` never depends on the host's ``/etc/mime.types``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from starlette.exceptions import HTTPException

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
ASSET_MEDIA_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
# Only this origin's scripts, styles and fetches; images may also be the blob: URLs of results.
# It documents (and enforces) that the page works offline: nothing may load from elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/")
async def page() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type="text/html; charset=utf-8",
        headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY},
    )


@router.get("/static/{name}")
async def asset(name: str) -> FileResponse:
    media_type = ASSET_MEDIA_TYPES.get(name)
    if media_type is None:
        raise HTTPException(404, f"no static asset {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=media_type)
