"""Several versions of a model side by side (``<name>/<version>/`` folders): the newest is the default, a
request may pick one by ``?version=``, and every listing shows them all."""

from __future__ import annotations

import base64
import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from service_fakes import Stamps, png, raw, running_app, stamped_pixel, state_of, write_fake_repo

from service.config import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """Versions 9 and 10 of ``tiny``: 10 is the newest in natural order, though "10" < "9" as text."""
    root = write_fake_repo(tmp_path / "models", version="9", versioned=True)
    write_fake_repo(root, version="10", versioned=True)
    async with running_app(Settings(models_dir=root), Stamps().factory) as (_, c):
        yield c


def computed_by(content: bytes) -> str:
    """The version whose runner computed an image, read from its pixels."""
    pixels = np.asarray(Image.open(io.BytesIO(content)))
    (version,) = [v for v in ("9", "10") if (pixels == stamped_pixel(v)).all()]
    return version


@pytest.mark.parametrize(
    ("query", "version"), [("", "10"), ("?version=", "10"), ("?version=9", "9"), ("?version=10", "10")]
)
async def test_a_request_gets_the_newest_version_or_the_one_it_names(
    client: httpx.AsyncClient, query: str, version: str
) -> None:
    r = await client.post(f"/translate/a2b{query}", **raw(png((16, 12))))
    assert r.status_code == 200, r.text
    assert (r.headers["x-model-version"], computed_by(r.content)) == (version, version)


async def test_batch_requests_pick_a_version_too(client: httpx.AsyncClient) -> None:
    files = [("images", (f"{i}.png", png((16, 12), i), "image/png")) for i in range(2)]
    r = await client.post("/translate/a2b/batch?version=9", files=files)
    assert (r.status_code, r.json()["version"]) == (200, "9")
    assert [computed_by(base64.b64decode(item["image"])) for item in r.json()["results"]] == ["9", "9"]


async def test_an_unknown_version_is_404_listing_the_available_ones(client: httpx.AsyncClient) -> None:
    r = await client.post("/translate/a2b?version=3", **raw(png((16, 12))))
    assert r.status_code == 404
    assert r.json() == {"error": "unknown_version", "detail": "direction 'a2b' has no version '3'; available: 10, 9"}


async def test_models_lists_every_version_and_marks_the_default(client: httpx.AsyncClient) -> None:
    models = (await client.get("/models")).json()["models"]
    assert [(m["name"], m["version"], m["default"]) for m in models] == [("tiny", "10", True), ("tiny", "9", False)]
    for model in models:
        assert [len(d["instances"]) for d in model["directions"]] == [1, 1]


async def test_v2_lists_versions_and_answers_for_each(client: httpx.AsyncClient) -> None:
    metadata = await client.get("/v2/models/tiny")
    assert metadata.json()["versions"] == ["10", "9"]
    one = await client.get("/v2/models/tiny/versions/9")
    assert (one.status_code, one.json()["versions"]) == (200, ["9"])
    ready = [(await client.get(f"/v2/models/tiny/versions/{v}/ready")).status_code for v in ("9", "10", "3")]
    assert ready == [200, 200, 404]
    unknown = await client.get("/v2/models/tiny/versions/3")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "not_found")
    assert unknown.json()["detail"] == "model 'tiny' has no version '3'; available: 10, 9"


async def test_readiness_follows_the_default_versions_only(tmp_path: Path) -> None:
    """Version 9's instances stuck (a batch past the limit): requests pinned to 9 get 503, /readyz stays 200."""
    root = write_fake_repo(tmp_path / "models", version="9", versioned=True)
    write_fake_repo(root, version="10", versioned=True)
    async with running_app(Settings(models_dir=root), Stamps().factory) as (app, c):
        pool = state_of(app).pool
        assert pool is not None
        for inst in pool.instances:
            inst.stuck = inst.direction.version == "9"
        ready = await c.get("/readyz")
        pinned = await c.post("/translate/a2b?version=9", **raw(png((16, 12))))
        default = await c.post("/translate/a2b", **raw(png((16, 12))))
        for inst in pool.instances:
            inst.stuck = inst.direction.version == "10"
        not_ready = await c.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert (pinned.status_code, pinned.json()["error"]) == (503, "not_ready")
    assert (default.status_code, computed_by(default.content)) == (200, "10")
    assert not_ready.status_code == 503
