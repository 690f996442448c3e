"""The try-it page in process: ``/`` and every asset it references are served, offline and consistent.

The page's behaviour in a real browser is tested in ``tests/e2e/test_try_it_browser.py``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest
from service_fakes import Fakes, running_app, write_fake_repo

from service.api.page import STATIC_DIR
from service.config import Settings

pytestmark = pytest.mark.anyio
URL = re.compile(r"https?://")
EXPECTED_MEDIA = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    # API keys are on: the page itself must stay public (its API calls carry the key the user types).
    settings = Settings(models_dir=write_fake_repo(tmp_path / "models"), api_keys=["secret"])
    async with running_app(settings, Fakes().factory) as (_, c):
        yield c


class _Page(HTMLParser):
    """The ``src``/``href`` references and the element ids of an HTML page."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.references: list[str] = []
        self.ids: set[str] = set()
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value and value != "#":
                self.references.append(value)
            elif name == "id" and value:
                self.ids.add(value)


async def test_the_page_is_html_that_loads_nothing_from_elsewhere(client: httpx.AsyncClient) -> None:
    r = await client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert not URL.search(r.text)
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "/" not in (await client.get("/openapi.json")).json()["paths"]


async def test_every_asset_the_page_references_is_served_with_its_media_type(
    client: httpx.AsyncClient,
) -> None:
    references = _Page((await client.get("/")).text).references
    assets = [ref for ref in references if Path(ref).suffix in EXPECTED_MEDIA]
    assert {Path(a).suffix for a in assets} == set(EXPECTED_MEDIA), references
    for ref in references:
        r = await client.get(urljoin("http://test/", ref))
        assert r.status_code == 200, ref
        media = r.headers["content-type"].split(";")[0]
        assert media == EXPECTED_MEDIA.get(Path(ref).suffix, "text/html"), ref
        if Path(ref).suffix in (".js", ".css"):
            assert not URL.search(r.text), f"{ref} refers to another site"


async def test_an_unknown_asset_is_a_json_404(client: httpx.AsyncClient) -> None:
    for path in ("/static/missing.js", "/static/index.html", "/static/..%2Fpage.py"):
        r = await client.get(path)
        assert (r.status_code, r.json()["error"]) == (404, "not_found"), path


def test_every_element_the_script_uses_is_on_the_page() -> None:
    script = (STATIC_DIR / "app.js").read_text()
    used = set(re.findall(r'byId\("([^"]+)"\)', script))
    assert used, "app.js no longer looks elements up with byId()"
    assert used <= _Page((STATIC_DIR / "index.html").read_text()).ids
