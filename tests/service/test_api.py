"""The HTTP API in process (httpx ASGI transport, lifespan running) over fake runners and the tiny model.

Fake runners negate their input, so a translated PNG is exactly the inverted input: every response
can be checked to carry its own image. Runners can be held at a gate to build queues on demand.
"""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from service_fakes import (
    FAKE_PROVIDER,
    BrokenRunner,
    Fakes,
    eventually,
    png,
    raw,
    running_app,
    sample,
    state_of,
)

import service.api.inference
from service.config import Settings
from service.imaging import decode_image, from_output, to_input
from service.repository import load_model_dir
from service.runtime import OnnxRunner

pytestmark = pytest.mark.anyio
REPO_ROOT = Path(__file__).resolve().parents[2]


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def multipart(data: bytes, field: str = "image", name: str = "x.png") -> dict[str, Any]:
    return {"files": {field: (name, data, "image/png")}}


@pytest.fixture
async def client(repo: Path, fakes: Fakes) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (_, c):
        yield c


def post_scope(path: str, headers: list[tuple[bytes, bytes]], client_port: int) -> dict[str, Any]:
    """A raw ASGI HTTP scope for a POST, for tests that drive the app message by message."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", client_port),
        "server": ("test", 80),
        "root_path": "",
        "state": {},
    }


# --- translating -------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [multipart, raw], ids=["multipart", "raw"])
async def test_translate_returns_exactly_the_requests_own_image(client: httpx.AsyncClient, body: Any) -> None:
    data = png(seed=3)
    r = await client.post("/translate/a2b", **body(data))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png" and r.headers["x-model-version"] == "7"
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    np.testing.assert_array_equal(pixels(r.content), 255 - pixels(data))  # the fake runner negates


@pytest.mark.parametrize("size", [(250, 250), (257, 263), (16, 16), (5, 7), (1500, 40)])
async def test_output_has_exactly_the_input_size(client: httpx.AsyncClient, size: tuple[int, int]) -> None:
    r = await client.post("/translate/b2a", **raw(png(size)))
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == size


async def test_max_side_sets_the_working_resolution(client: httpx.AsyncClient, fakes: Fakes) -> None:
    r = await client.post("/translate/a2b?max_side=20", **raw(png((100, 50))))
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (100, 50)
    assert fakes.batches[-1][1].shape == (1, 3, 12, 20)  # 100x50 -> 20x10, padded to multiples of 4 (min 8)


@pytest.mark.parametrize(
    ("query", "accept", "media_type"),
    [
        ("", None, "image/png"),
        ("?format=jpeg", None, "image/jpeg"),
        ("", "image/webp", "image/webp"),
        ("", "image/webp;q=0.5, image/jpeg", "image/jpeg"),
        ("", "text/html, */*;q=0.8", "image/png"),
        ("?format=png", "image/jpeg", "image/png"),
    ],
)
async def test_output_format_from_query_or_accept(
    client: httpx.AsyncClient, query: str, accept: str | None, media_type: str
) -> None:
    headers = {"content-type": "image/png", **({"accept": accept} if accept else {})}
    r = await client.post(f"/translate/a2b{query}", content=png(), headers=headers)
    assert r.status_code == 200 and r.headers["content-type"] == media_type
    assert Image.open(io.BytesIO(r.content)).format == media_type.split("/")[1].upper()


# --- bad input ---------------------------------------------------------------------------------------

BAD_REQUESTS = {
    "not an image": ("/translate/a2b", raw(b"hello world"), 415, "unsupported_image"),
    "truncated": ("/translate/a2b", raw(png((64, 64))[:300]), 400, "corrupt_image"),
    "wrong content type": ("/translate/a2b", raw(png(), "text/plain"), 415, "unsupported_media_type"),
    "no content type": ("/translate/a2b", {"content": png()}, 415, "unsupported_media_type"),
    "missing field": ("/translate/a2b", multipart(png(), field="picture"), 422, "validation_error"),
    "text in field": (
        "/translate/a2b",
        {"data": {"image": "not a file"}, "files": {"x": ("x", b"1")}},
        422,
        "validation_error",
    ),
    "empty body": ("/translate/a2b", raw(b""), 422, "validation_error"),
    "empty file": ("/translate/a2b", multipart(b""), 422, "validation_error"),
    "unknown direction": ("/translate/c2d", raw(png()), 404, "unknown_direction"),
    "bad format": ("/translate/a2b?format=gif", raw(png()), 422, "validation_error"),
    "bad max_side": ("/translate/a2b?max_side=2", raw(png()), 422, "validation_error"),
    "bad timeout": (
        "/translate/a2b",
        {**raw(png()), "headers": {"content-type": "image/png", "x-request-timeout-ms": "0"}},
        422,
        "validation_error",
    ),
    "two files": (
        "/translate/a2b",
        {"files": [("image", ("a", png())), ("image", ("b", png()))]},
        400,
        "bad_request",
    ),
    "unacceptable": (
        "/translate/a2b",
        {**raw(png()), "headers": {"content-type": "image/png", "accept": "application/json"}},
        406,
        "not_acceptable",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_requests_get_json_errors_with_the_right_status(client: httpx.AsyncClient, case: str) -> None:
    path, kwargs, status, error = BAD_REQUESTS[case]
    r = await client.post(path, **kwargs)
    assert (r.status_code, r.json()["error"]) == (status, error), r.text
    assert set(r.json()) == {"error", "detail"} and "Traceback" not in r.text


async def test_unknown_direction_names_the_available_ones(client: httpx.AsyncClient) -> None:
    r = await client.post("/translate/c2d", **raw(png()))
    assert "a2b, b2a" in r.json()["detail"]


async def test_framework_errors_are_json_too(client: httpx.AsyncClient) -> None:
    assert (await client.get("/translate/a2b")).json()["error"] == "method_not_allowed"
    assert (await client.get("/nowhere")).json() == {"error": "not_found", "detail": "Not Found"}


async def test_more_pixels_than_the_limit_is_413(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo, max_pixels=1000), fakes.factory) as (_, c):
        r = await c.post("/translate/a2b", **raw(png((40, 30))))
    assert (r.status_code, r.json()["error"]) == (413, "image_too_large")
    assert fakes.batches == []


async def test_a_declared_body_over_the_limit_is_413_before_reading(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo, max_upload_bytes=1000), fakes.factory) as (_, c):
        r = await c.post("/translate/a2b", **raw(b"\0" * 1001))
        text = (await c.get("/metrics")).text
    assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")
    assert "1001" in r.json()["detail"] and r.headers["connection"] == "close"
    # Answered before routing, but counted under its route (not "unmatched"), so per-route 413 rates see it.
    assert sample(text, "dclgan_requests_total", route="/translate/{direction}", direction="", code="413") == 1


async def test_a_streamed_body_over_the_limit_is_refused_without_reading_it_all(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo, max_upload_bytes=1000), fakes.factory) as (app, _):
        chunks_read = 0

        async def endless_body() -> dict[str, Any]:  # chunked: no Content-Length, never ends
            nonlocal chunks_read
            chunks_read += 1
            return {"type": "http.request", "body": b"\0" * 100, "more_body": True}

        messages: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            messages.append(message)

        scope = post_scope(
            "/translate/a2b", [(b"content-type", b"image/png"), (b"transfer-encoding", b"chunked")], client_port=1
        )
        await asyncio.wait_for(app(scope, endless_body, send), 10)
    assert messages[0]["status"] == 413
    assert chunks_read == 11  # 1,100 bytes: the read that crossed 1,000 was the last


async def test_batch_reports_a_status_per_image(client: httpx.AsyncClient) -> None:
    images = [png((20, 10), seed=1), b"junk", png((9, 13), seed=2), b""]
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    r = await client.post("/translate/a2b/batch?format=png", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["direction"]) == ("tiny", "7", "a2b")
    assert (body["succeeded"], body["failed"]) == (2, 2)
    assert [item["status"] for item in body["results"]] == [200, 415, 200, 422]
    assert body["results"][1]["error"] == "unsupported_image" and body["results"][1]["image"] is None
    assert body["results"][3]["detail"] == "the uploaded file is empty"
    for item, data in zip(body["results"][:3:2], images[:3:2], strict=True):
        import base64

        out = base64.b64decode(item["image"])
        assert (item["width"], item["height"]) == Image.open(io.BytesIO(data)).size
        np.testing.assert_array_equal(pixels(out), 255 - pixels(data))


async def test_batch_refuses_more_items_than_allowed(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo, max_batch_items=2), fakes.factory) as (_, c):
        files = [("images", (f"{i}.png", png(), "image/png")) for i in range(3)]
        r = await c.post("/translate/a2b/batch", files=files)
    assert (r.status_code, r.json()["error"]) == (400, "bad_request")


async def test_an_unexpected_error_is_a_json_500_without_internals(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> bytes:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(service.api.inference, "encode_image", broken)
    r = await client.post("/translate/a2b", content=png(), headers={"content-type": "image/png", "x-request-id": "r-1"})
    assert r.status_code == 500 and r.json() == {
        "error": "internal_error",
        "detail": "internal server error (request id r-1)",
    }
    assert r.headers["x-request-id"] == "r-1"


async def test_inference_failure_is_a_500_inference_failed(client: httpx.AsyncClient, fakes: Fakes) -> None:
    fakes.fail = RuntimeError("device lost")
    r = await client.post("/translate/a2b", **raw(png()))
    assert (r.status_code, r.json()["error"]) == (500, "inference_failed")


# --- auth, CORS, request ids -------------------------------------------------------------------------


async def test_api_keys_guard_translate_and_models_but_not_health(repo: Path, fakes: Fakes) -> None:
    settings = Settings(models_dir=repo, api_keys=["k1", "k2"])
    async with running_app(settings, fakes.factory) as (_, c):
        for path in ("/translate/a2b", "/models"):
            method = c.post if path.startswith("/translate") else c.get
            kwargs = raw(png()) if path.startswith("/translate") else {"headers": {}}
            headers = kwargs.pop("headers")
            no_key = await method(path, headers=headers, **kwargs)
            assert no_key.status_code == 401 and no_key.headers["www-authenticate"] == "Bearer"
            assert no_key.json()["error"] == "unauthorized"
            wrong = await method(path, headers={**headers, "authorization": "Bearer nope"}, **kwargs)
            assert wrong.status_code == 401
            right = await method(path, headers={**headers, "authorization": "Bearer k2"}, **kwargs)
            assert right.status_code == 200
        for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
            assert (await c.get(path)).status_code == 200, path


async def test_metrics_can_require_a_key(repo: Path, fakes: Fakes) -> None:
    settings = Settings(models_dir=repo, api_keys=["k1"], metrics_require_auth=True)
    async with running_app(settings, fakes.factory) as (_, c):
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers={"authorization": "Bearer k1"})).status_code == 200


async def test_cors_origins_are_configurable(repo: Path, fakes: Fakes) -> None:
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    async with running_app(Settings(models_dir=repo, cors_origins=["https://app.example"]), fakes.factory) as (_, c):
        r = await c.options("/translate/a2b", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        # A refused preflight is a JSON error like every other, not Starlette's plain text.
        r = await c.options("/translate/a2b", headers={**preflight, "origin": "https://evil.example"})
        assert (r.status_code, r.json()) == (400, {"error": "bad_request", "detail": "Disallowed CORS origin"})
        assert "access-control-allow-origin" not in r.headers
        r = await c.options("/translate/a2b", headers={**preflight, "access-control-request-method": "PUT"})
        assert (r.status_code, r.json()) == (400, {"error": "bad_request", "detail": "Disallowed CORS method"})
    async with running_app(Settings(models_dir=repo), fakes.factory) as (_, c):
        r = await c.options("/translate/a2b", headers=preflight)
        assert "access-control-allow-origin" not in r.headers


async def test_request_id_is_echoed_when_safe_and_generated_otherwise(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz", headers={"x-request-id": "abc-123"})).headers["x-request-id"] == "abc-123"
    generated = (await client.get("/healthz", headers={"x-request-id": "bad id\nwith newline"})).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)


# --- lifecycle ---------------------------------------------------------------------------------------


async def test_not_ready_until_every_instance_is_warm(repo: Path, fakes: Fakes) -> None:
    fakes.warmup_gate.clear()
    async with running_app(Settings(models_dir=repo), fakes.factory, wait_ready=False) as (_, c):
        assert (await c.get("/healthz")).status_code == 200
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "starting" and r.headers["retry-after"] == "1"
        r = await c.post("/translate/a2b", **raw(png()))
        assert (r.status_code, r.json()["error"]) == (503, "not_ready") and "retry-after" in r.headers
        fakes.warmup_gate.set()
        for _ in range(2000):
            if (await c.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.005)
        assert (await c.get("/readyz")).json() == {
            "status": "ready",
            "ready": True,
            "warm_instances": 2,
            "instances": 2,
        }


async def test_a_failed_warm_up_fails_liveness(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), lambda m, d, dev: BrokenRunner(dev), wait_ready=False) as (
        _,
        c,
    ):
        await eventually(lambda: True)
        for _ in range(2000):
            if (await c.get("/healthz")).status_code == 503:
                break
            await asyncio.sleep(0.005)
        assert (await c.get("/healthz")).json()["status"] == "failed"
        assert (await c.get("/readyz")).json()["status"] == "failed"


async def test_draining_refuses_new_work_and_readiness(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (app, c):
        state_of(app).begin_drain()
        r = await c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "draining"
        r = await c.post("/translate/a2b", **raw(png()))
        assert (r.status_code, r.json()["error"]) == (503, "not_ready")
        assert (await c.get("/healthz")).status_code == 200
        text = (await c.get("/metrics")).text
    assert sample(text, "dclgan_images_total", direction="a2b", outcome="not_ready") == 1


async def test_startup_fails_on_an_empty_repository(tmp_path: Path, fakes: Fakes) -> None:
    with pytest.raises(Exception, match="no model"):
        async with running_app(Settings(models_dir=tmp_path), fakes.factory):
            pass


# --- backpressure, deadlines, disconnects ------------------------------------------------------------


async def occupy(app: Any, c: httpx.AsyncClient, fakes: Fakes, queued: int = 0) -> list[asyncio.Task[httpx.Response]]:
    """Hold the a2b instance with one request and queue ``queued`` more (all 30x20)."""
    fakes.gate.clear()
    tasks = [asyncio.ensure_future(c.post("/translate/a2b", **raw(png(seed=9))))]
    await eventually(lambda: len(fakes.batches) == 1, what="the first request to run")
    batcher = state_of(app).directions["a2b"].batcher
    for n in range(queued):
        tasks.append(asyncio.ensure_future(c.post("/translate/a2b", **raw(png(seed=10 + n)))))
        await eventually(lambda n=n: batcher.depth() == n + 1, what="the request to be queued")
    return tasks


@pytest.mark.parametrize("status", [503, 429])
async def test_a_full_queue_is_rejected_at_once_with_retry_after(repo: Path, fakes: Fakes, status: int) -> None:
    settings = Settings(models_dir=repo, max_queue_size=1, max_batch_size=1, queue_full_status=status, retry_after_s=2)
    async with running_app(settings, fakes.factory) as (app, c):
        held = await occupy(app, c, fakes, queued=1)
        r = await c.post("/translate/a2b", **raw(png()))
        assert (r.status_code, r.json()["error"], r.headers["retry-after"]) == (status, "queue_full", "2")
        fakes.gate.set()
        assert [t.status_code for t in await asyncio.gather(*held)] == [200, 200]
        text = (await c.get("/metrics")).text
    assert sample(text, "dclgan_images_total", direction="a2b", outcome="queue_full") == 1


async def test_a_request_queued_past_its_deadline_is_dropped_uncomputed_with_504(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (app, c):
        held = await occupy(app, c, fakes)
        late = png(seed=42)
        r = await c.post(
            "/translate/a2b",
            content=late,
            headers={"content-type": "image/png", "x-request-timeout-ms": "50"},
        )
        assert (r.status_code, r.json()["error"]) == (504, "deadline_exceeded")
        fakes.gate.set()
        assert (await held[0]).status_code == 200
        text = (await c.get("/metrics")).text
    assert fakes.sizes() == [1]  # only the held request ever reached the runner
    assert sample(text, "dclgan_images_total", direction="a2b", outcome="deadline") == 1
    assert sample(text, "dclgan_requests_total", route="/translate/{direction}", direction="a2b", code="504") == 1


async def test_a_client_that_disconnects_has_its_queued_work_dropped(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (app, c):
        held = await occupy(app, c, fakes)
        body = png(seed=5)
        gone = asyncio.Event()
        sent_body = False

        async def receive() -> dict[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        scope = post_scope(
            "/translate/a2b",
            [(b"content-type", b"image/png"), (b"content-length", str(len(body)).encode())],
            client_port=2,
        )
        call = asyncio.ensure_future(app(scope, receive, send))
        batcher = state_of(app).directions["a2b"].batcher
        await eventually(lambda: batcher.depth() == 1, what="the request to be queued")
        gone.set()
        await asyncio.wait_for(call, 10)
        fakes.gate.set()
        assert (await held[0]).status_code == 200
        await eventually(lambda: batcher.depth() == 0)
        text = (await c.get("/metrics")).text
    assert fakes.sizes() == [1]
    assert sample(text, "dclgan_images_total", direction="a2b", outcome="cancelled") == 1
    assert sample(text, "dclgan_requests_total", route="/translate/{direction}", direction="a2b", code="499") == 1


# --- metrics, models, docs ---------------------------------------------------------------------------


async def test_counters_add_up_exactly_after_a_known_sequence(client: httpx.AsyncClient) -> None:
    for seed in range(3):
        assert (await client.post("/translate/a2b", **raw(png(seed=seed)))).status_code == 200
    assert (await client.post("/translate/b2a", **multipart(png()))).status_code == 200
    assert (await client.post("/translate/a2b", **raw(b"junk"))).status_code == 415
    assert (await client.post("/translate/nope", **raw(png()))).status_code == 404
    files = [("images", ("a", png(seed=7))), ("images", ("b", b"junk")), ("images", ("c", png(seed=8)))]
    assert (await client.post("/translate/a2b/batch", files=files)).status_code == 200
    text = (await client.get("/metrics")).text

    def requests(route: str, direction: str, code: str) -> float:
        return sample(text, "dclgan_requests_total", route=route, direction=direction, code=code)

    single, batch = "/translate/{direction}", "/translate/{direction}/batch"
    assert requests(single, "a2b", "200") == 3 and requests(single, "b2a", "200") == 1
    assert requests(single, "a2b", "415") == 1 and requests(single, "", "404") == 1
    assert requests(batch, "a2b", "200") == 1
    assert sample(text, "dclgan_request_duration_seconds_count", route=single, direction="a2b") == 4
    assert sample(text, "dclgan_images_total", direction="a2b", outcome="ok") == 5
    assert sample(text, "dclgan_images_total", direction="a2b", outcome="bad_image") == 2
    assert sample(text, "dclgan_images_total", direction="b2a", outcome="ok") == 1
    # Every computed image is in exactly one executed batch, and waited in the queue exactly once.
    assert sample(text, "dclgan_batch_size_sum", direction="a2b") == 5
    assert sample(text, "dclgan_queue_wait_seconds_count", direction="a2b") == 5
    assert sample(text, "dclgan_inference_seconds_count", direction="a2b", device="cpu") == sample(
        text, "dclgan_batch_size_count", direction="a2b"
    )
    assert (
        sample(
            text,
            "dclgan_model_info",
            model="tiny",
            direction="a2b",
            device="cpu",
            version="7",
            provider=FAKE_PROVIDER,
            engine="fake",
            precision="float32",
            psnr_db="",
        )
        == 1
    )
    assert sample(text, "dclgan_instances", device="cpu") == 2 and sample(text, "dclgan_ready") == 1
    assert sample(text, "dclgan_queue_depth", direction="a2b") == 0
    assert sample(text, "dclgan_inflight_requests") == 0 and sample(text, "dclgan_busy_instances", device="cpu") == 0


async def test_models_lists_directions_versions_and_where_they_run(client: httpx.AsyncClient) -> None:
    body = (await client.get("/models")).json()
    (model,) = body["models"]
    assert (model["name"], model["version"], model["domains"]) == ("tiny", "7", ["a", "b"])
    assert [(d["name"], d["source"], d["target"], d["route"]) for d in model["directions"]] == [
        ("a2b", "a", "b", "/translate/a2b"),
        ("b2a", "b", "a", "/translate/b2a"),
    ]
    (instance,) = model["directions"][0]["instances"]
    assert instance == {
        "device": "cpu",
        "provider": FAKE_PROVIDER,
        "engine": "fake",
        "precision": "float32",
        "psnr_db": None,
        "probe_ms": None,
        "warm": True,
    }


async def test_openapi_documents_bodies_parameters_and_every_error(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert "ErrorBody" in spec["components"]["schemas"]
    for path, field in (("/translate/{direction}", "image"), ("/translate/{direction}/batch", "images")):
        op = spec["paths"][path]["post"]
        content = op["requestBody"]["content"]
        assert {"multipart/form-data", "image/png", "image/jpeg", "image/webp"} <= set(content)
        assert content["multipart/form-data"]["schema"]["required"] == [field]
        params = {p["name"]: p for p in op["parameters"]}
        assert {"direction", "format", "max_side", "X-Request-Timeout-Ms"} <= set(params)
        assert params["direction"]["schema"]["enum"] == ["a2b", "b2a"]
        for code in ("400", "404", "413", "415", "422", "500", "503"):
            schema = op["responses"][code]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, code)
    single = spec["paths"]["/translate/{direction}"]["post"]["responses"]
    assert {"image/png", "image/jpeg", "image/webp"} <= set(single["200"]["content"])
    assert {"406", "504"} <= set(single) and "Retry-After" in single["503"]["headers"]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_docs_pages_work_offline(client: httpx.AsyncClient, page: str) -> None:
    html = (await client.get(page)).text
    assert not re.search(r"https?://", html), "the page must not reference any absolute URL (CDN)"
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any("favicon" in a for a in assets) and any(a.endswith(".js") for a in assets)
    for asset in assets:
        assert (await client.get(asset)).status_code == 200, asset


def test_importing_the_service_never_imports_torch_or_training() -> None:
    code = (
        "import sys, service.main, service.serve; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'training')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the real tiny model -----------------------------------------------------------------------------


async def test_real_model_batched_outputs_equal_each_image_translated_alone(tiny_repo: Path) -> None:
    settings = Settings(models_dir=tiny_repo, max_batch_size=4, max_queue_delay_ms=5000, intra_op_threads=1)
    images = [png((24, 16), seed=s) for s in range(4)]
    async with running_app(settings) as (_, c):
        responses = await asyncio.gather(*(c.post("/translate/a2b", **raw(data)) for data in images))
    assert all('desc="batch of 4"' in r.headers["server-timing"] for r in responses)
    model = load_model_dir(tiny_repo / "tiny")
    runner = OnnxRunner.open(model.path("a2b"), intra_op_threads=1)
    for data, response in zip(images, responses, strict=True):
        prepared = to_input(decode_image(data, max_pixels=10**6), max_side=1024)
        alone = from_output(runner.run(prepared.array[None])[0], prepared)
        assert np.abs(pixels(response.content) - np.asarray(alone, dtype=np.int16)).max() <= 1


async def test_a_batch_is_in_flight_until_its_response_body_is_built(
    repo: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain waits for in-flight requests: a /batch whose JSON is still being built (in the pool) counts."""
    import threading

    import service.api.routes as routes

    building, release = threading.Event(), threading.Event()
    real = routes._batch_body

    def slow_body(*args: Any) -> bytes:
        building.set()
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(routes, "_batch_body", slow_body)
    async with running_app(Settings(models_dir=repo), fakes.factory) as (app, c):
        job = asyncio.ensure_future(c.post("/translate/a2b/batch", files=[("images", ("a.png", png(), "image/png"))]))
        await eventually(building.is_set, what="the body to be built")
        assert state_of(app).inflight == 1
        release.set()
        assert (await job).status_code == 200
        assert state_of(app).inflight == 0
