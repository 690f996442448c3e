"""The try-it page in a real headless browser: Debian's chromium, driven by Playwright, over the real server.

Playwright's pip wheel carries only its driver; the browser is the system's ``chromium`` (never one that
``playwright install`` downloads). The server is ``python -m service`` over the tiny exported model, and
every request the page makes to anywhere else is aborted and fails the test: the page works offline.
Skipped, with the reason printed, only when chromium or playwright is missing, and then only outside CI
(``tests/requires.py``).

``DCLGAN_UPDATE_SCREENSHOT=1`` also copies the screenshot of a translation to ``docs/try-it.png``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from service.repository import ModelCard
from tests.e2e.conftest import Server, run_server
from tests.requires import require_module, unavailable
from tests.service.conftest import TINY_MODEL, ImageFactory

CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    unavailable("chromium not installed (Debian: apt-get install chromium; .ci/run installs it)", True)
playwright = require_module("playwright.sync_api", "pip install -e '.[dev]' (never `playwright install`)", True)

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
# Headless, no sandbox (CI runs as root), and none of the background traffic a fresh profile starts.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
WAIT_MS = 30_000  # the bound on every wait for the page
SIZE = (40, 28)
FILE_INPUT = re.compile(r"\bchoose\b", re.IGNORECASE)  # the drop zone is the file input's label


WORKING_SIDE = 32  # the card's recommended side: below the server's max_side, so the page must say it


@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The server over a copy of the tiny model whose card recommends a working side."""
    folder = tmp_path_factory.mktemp("try-it")
    shutil.copytree(tiny_repo, folder / "models")
    card = ModelCard.load(folder / "models" / TINY_MODEL)
    card.model_copy(update={"input": card.input.model_copy(update={"working_side": WORKING_SIDE})}).write(
        folder / "models" / TINY_MODEL
    )
    with run_server(folder / "models", folder / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def browser() -> Iterator[playwright.Browser]:
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: playwright.Browser, server: Server) -> Iterator[playwright.Page]:
    """A fresh tab on the try-it page; a script error or a request to another site fails the test."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    elsewhere: list[str] = []
    script_errors: list[str] = []

    def only_the_server(route: playwright.Route) -> None:
        if route.request.url.startswith(server.url + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_server)
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    tab.on("pageerror", lambda exc: script_errors.append(str(exc)))
    tab.goto(server.url + "/")
    try:
        yield tab
    finally:
        context.close()
    assert not elsewhere, f"the page requested other sites: {elsewhere}"
    assert not script_errors, f"script errors: {script_errors}"


def test_an_uploaded_image_is_translated_shown_and_downloadable(
    page: playwright.Page, image_factory: ImageFactory, tmp_path: Path
) -> None:
    picture = image_factory.write("horse.png", SIZE)
    page.get_by_label("Direction").select_option("a2b")
    page.get_by_label(FILE_INPUT).set_input_files(picture)
    page.get_by_role("button", name="Translate").click()

    output = page.get_by_role("img", name="horse.png translated a2b")
    playwright.expect(output).to_be_visible()
    assert output.evaluate("img => [img.naturalWidth, img.naturalHeight]") == list(SIZE)
    playwright.expect(page.locator("#output-size")).to_have_text("40×28")
    playwright.expect(page.locator("#input-size")).to_have_text("40×28")
    playwright.expect(page.get_by_role("img", name="Input: horse.png")).to_be_visible()
    playwright.expect(page.get_by_role("status")).to_contain_text("Done in")

    with page.expect_download() as download:
        page.get_by_role("link", name="Download").click()
    assert download.value.suggested_filename == "horse-a2b.png"
    saved = Image.open(io.BytesIO(Path(download.value.path()).read_bytes()))
    assert (saved.format, saved.size) == ("PNG", SIZE)

    screenshot = tmp_path / "try-it.png"
    page.screenshot(path=screenshot, full_page=True)
    assert Image.open(screenshot).size[0] > 0
    if os.environ.get("DCLGAN_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(screenshot, REPO_ROOT / "docs" / "try-it.png")


def test_the_page_states_the_side_the_server_works_at(page: playwright.Page, server: Server) -> None:
    catalog = server.get("/models").json()
    assert catalog["models"][0]["working_side"] == WORKING_SIDE < catalog["max_side"]
    page.get_by_label("Direction").select_option("b2a")
    playwright.expect(page.locator("#limits")).to_have_text(
        f"Images with a side over {WORKING_SIDE} px are translated at {WORKING_SIDE} px "
        "and scaled back to their own size."
    )


def test_an_api_error_is_shown_in_words(page: playwright.Page, server: Server, tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_bytes(b"plain text, not a picture")
    expected = server.post("/translate/b2a", files={"image": ("notes.png", fake.read_bytes(), "image/png")})
    assert expected.status_code == 415
    body = expected.json()

    page.get_by_label("Direction").select_option("b2a")
    page.get_by_label(FILE_INPUT).set_input_files(fake)
    page.get_by_role("button", name="Translate").click()

    alert = page.get_by_role("alert")
    playwright.expect(alert).to_have_text(f"Unsupported image: {body['detail']}")
    assert body["error"] == "unsupported_image"
    playwright.expect(page.locator("#output-figure")).to_be_hidden()
    page.screenshot(path=tmp_path / "try-it-error.png", full_page=True)


def test_the_api_key_is_sent_as_a_bearer_token_and_kept_for_the_tab(page: playwright.Page) -> None:
    key = page.get_by_label("API key")
    key.fill("k-123")
    with page.expect_request(lambda r: r.url.endswith("/models")) as listing:
        key.press("Enter")  # commits the field (a change event) without a mouse
    assert listing.value.headers["authorization"] == "Bearer k-123"

    page.reload()
    playwright.expect(page.get_by_label("API key")).to_have_value("k-123")
