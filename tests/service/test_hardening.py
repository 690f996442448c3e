"""Hostile clients and sick workers, in process: bounded memory and concurrency, timeouts, supervision,
and what the OpenAPI document promises. Runners are fakes held at a gate, so every queue is built on
purpose; no assertion depends on timing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from service_fakes import Fakes, eventually, png, raw, running_app, sample

import service.config
from service.config import Settings
from service.imaging import encode_image, probe_image

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


async def started(client: httpx.AsyncClient, fakes: Fakes, count: int = 1) -> asyncio.Task[httpx.Response]:
    """One request sent in the background; returns once the runner holds ``count`` batches."""
    task = asyncio.ensure_future(client.post("/translate/a2b", **raw(png())))
    await eventually(lambda: len(fakes.batches) == count, what="the batch to reach the runner")
    return task


# --- bounded resources -------------------------------------------------------------------------------


async def test_requests_over_the_in_flight_cap_get_503_at_once(repo: Path, fakes: Fakes) -> None:
    settings = Settings(models_dir=repo, max_inflight_requests=1)
    async with running_app(settings, fakes.factory) as (_, client):
        fakes.gate.clear()
        first = await started(client, fakes)
        refused = await client.post("/translate/a2b", **raw(png()))
        assert (refused.status_code, refused.json()["error"]) == (503, "overloaded")
        assert refused.headers["retry-after"] == "1"
        fakes.gate.set()
        assert (await first).status_code == 200
        text = (await client.get("/metrics")).text
    # Refused before its body was read: counted once, as queue_full is, so the images counter sees every refusal.
    assert sample(text, "dclgan_images_total", direction="a2b", outcome="overloaded") == 1
    assert sample(text, "dclgan_requests_total", route="/translate/{direction}", direction="a2b", code="503") == 1


def _budget_for(data: bytes, max_side: int) -> int:
    """What the service reserves for translating ``data`` (body counted twice, then the image)."""
    probe = probe_image(data, max_pixels=10**8)
    side = max(probe.width, probe.height)
    scale = min(1.0, max_side / side)
    work = round(probe.width * scale) * round(probe.height * scale)
    return 2 * len(data) + probe.decode_bytes(work)


async def test_an_image_that_can_never_fit_the_memory_budget_is_413_naming_the_limit(
    repo: Path, fakes: Fakes
) -> None:
    big = encode_image(Image.new("RGB", (1000, 1000), (9, 99, 199)), "png")  # small file, many pixels
    settings = Settings(
        models_dir=repo, max_request_memory_bytes=8 * MiB, max_pixels=100_000, max_upload_bytes=MiB, max_side=64
    )
    assert _budget_for(big, 64) > 8 * MiB
    async with running_app(settings.model_copy(update={"max_pixels": 10**6}), fakes.factory) as (_, client):
        r = await client.post("/translate/a2b", **raw(big))
    assert (r.status_code, r.json()["error"]) == (413, "image_too_large")
    assert str(8 * MiB) in r.json()["detail"]
    assert fakes.batches == []  # never decoded, never run


async def test_memory_held_by_requests_in_flight_refuses_the_next_one_with_503(repo: Path, fakes: Fakes) -> None:
    """Two images that each fit the budget but not together: the second is refused while the first is held,
    and accepted once it is done. This is what kept 8 concurrent pixel bombs from taking 5 GB."""
    image = png((400, 400))
    need = _budget_for(image, 1024)
    settings = Settings(
        models_dir=repo, max_request_memory_bytes=need + need // 2, max_pixels=200_000, max_upload_bytes=MiB
    )
    async with running_app(settings, fakes.factory) as (_, client):
        fakes.gate.clear()
        first = asyncio.ensure_future(client.post("/translate/a2b", **raw(image)))
        await eventually(lambda: len(fakes.batches) == 1, what="the first image to run")
        second = await client.post("/translate/a2b", **raw(png((400, 400), seed=1)))
        assert (second.status_code, second.json()["error"]) == (503, "overloaded")
        fakes.gate.set()
        assert (await first).status_code == 200
        assert (await client.post("/translate/a2b", **raw(png((400, 400), seed=2)))).status_code == 200
        text = (await client.get("/metrics")).text
    assert sample(text, "dclgan_request_memory_bytes") == 0  # every reservation was given back


async def test_batch_checks_for_room_before_reading_its_files(repo: Path, fakes: Fakes) -> None:
    settings = Settings(models_dir=repo, max_queue_size=1, max_batch_size=1)
    async with running_app(settings, fakes.factory) as (_, client):
        fakes.gate.clear()
        running = await started(client, fakes)
        queued = asyncio.ensure_future(client.post("/translate/a2b", **raw(png(seed=1))))
        await eventually(lambda: (client_depth := _depth(client)) is not None and client_depth, what="a queued one")
        pulled = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal pulled
            pulled += 1
            yield b"--x\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\n\r\n"

        r = await client.post(
            "/translate/a2b/batch", content=body(), headers={"content-type": "multipart/form-data; boundary=x"}
        )
        assert (r.status_code, r.json()["error"]) == (503, "queue_full")
        assert pulled == 0  # not a byte of the upload was read
        fakes.gate.set()
        assert [(await t).status_code for t in (running, queued)] == [200, 200]


def _depth(client: httpx.AsyncClient) -> bool:
    app = client._transport.app  # type: ignore[attr-defined]
    return bool(app.state.service.directions["a2b"].batcher.depth())


async def test_a_body_slower_than_the_body_timeout_gets_408(repo: Path, fakes: Fakes) -> None:
    never = asyncio.Event()

    async def trickle() -> AsyncIterator[bytes]:
        yield png()[:10]
        # The rest never comes (a ceiling, not a timing: without the body timeout the server would get a
        # complete 10-byte body after 30 s and answer 400, and the test fails instead of hanging).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(never.wait(), 30)

    async with running_app(Settings(models_dir=repo, body_timeout_s=0.2), fakes.factory) as (_, client):
        r = await client.post("/translate/a2b", content=trickle(), headers={"content-type": "image/png"})
        never.set()
    assert (r.status_code, r.json()["error"]) == (408, "request_timeout")
    assert r.headers["connection"] == "close" and "10 bytes" in r.json()["detail"]


# --- sick workers ------------------------------------------------------------------------------------


async def test_a_batch_over_the_time_limit_is_504_and_readiness_turns_503(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo, batch_timeout_s=0.05), fakes.factory) as (_, client):
        fakes.gate.clear()  # the runner hangs
        r = await client.post("/translate/a2b", **raw(png()))
        assert (r.status_code, r.json()["error"]) == (504, "batch_timeout")
        ready = await client.get("/readyz")
        assert (ready.status_code, ready.json()["status"]) == (503, "degraded")
        assert (await client.get("/healthz")).status_code == 200  # it may recover: no restart yet
        sick = await client.post("/translate/a2b", **raw(png()))
        assert (sick.status_code, sick.json()["error"]) == (503, "not_ready")  # refused, not queued to hang
        quick = {"content-type": "image/png", "x-request-timeout-ms": "1"}
        other = await client.post("/translate/b2a", content=png(), headers=quick)
        assert other.status_code == 504  # the healthy direction is still admitted (its 1 ms deadline passes)
        text = (await client.get("/metrics")).text
        assert sample(text, "dclgan_instance_failures_total", direction="a2b", device="cpu", kind="timeout") == 1
        fakes.gate.set()  # the runner returns
        for _ in range(2000):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.005)
        assert (await client.get("/readyz")).json()["status"] == "ready"


class Crash(BaseException):
    """Escapes the runner-error handling, as a bug in the worker loop would."""


async def test_a_dead_worker_answers_json_500_and_fails_liveness(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (_, client):
        fakes.fail = Crash()  # type: ignore[assignment]
        r = await client.post("/translate/a2b", **raw(png()))
        assert (r.status_code, r.json()["error"]) == (500, "inference_failed")
        health = await client.get("/healthz")
        assert (health.status_code, health.json()["status"]) == (503, "failed")
        assert (await client.get("/readyz")).status_code == 503
        text = (await client.get("/metrics")).text
        assert sample(text, "dclgan_instance_failures_total", direction="a2b", device="cpu", kind="crash") == 1


# --- error bodies --------------------------------------------------------------------------------------


async def test_error_bodies_carry_no_library_or_exception_text(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (_, client):
        corrupt = png((64, 64))
        corrupt = corrupt[:60] + bytes(40) + corrupt[100:]  # a damaged IDAT: zlib has words for it
        bad = await client.post("/translate/a2b", **raw(corrupt))
        assert bad.status_code == 400
        assert not re.search(r"zlib|Error -|broken data stream|truncated \(", bad.text), bad.text
        invalid = await client.post("/translate/a2b?max_side=2", **raw(png()))
        assert invalid.status_code == 422
        assert [set(item) for item in invalid.json()["detail"]] == [{"loc", "msg", "type"}]  # no input echo
        fakes.fail = RuntimeError("CUDA error: an illegal memory access at 0x7f3a")
        failed = await client.post("/translate/a2b", **raw(png()))
        assert failed.status_code == 500 and "0x7f3a" not in failed.text and "CUDA" not in failed.text


# --- what the OpenAPI document says --------------------------------------------------------------------


async def test_openapi_declares_auth_only_when_keys_are_set(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (_, client):
        open_spec = (await client.get("/openapi.json")).json()
    async with running_app(Settings(models_dir=repo, api_keys=["k"]), fakes.factory) as (_, client):
        keyed_spec = (await client.get("/openapi.json")).json()
    translate = "/translate/{direction}"
    assert "securitySchemes" not in open_spec.get("components", {})
    assert "security" not in open_spec["paths"][translate]["post"]
    assert "401" not in open_spec["paths"][translate]["post"]["responses"]
    assert keyed_spec["paths"][translate]["post"]["security"] == [{"HTTPBearer": []}]
    assert "401" in keyed_spec["paths"][translate]["post"]["responses"]


async def test_openapi_types_parameters_as_sent_and_documents_every_layer(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (_, client):
        spec = (await client.get("/openapi.json")).json()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            for param in operation.get("parameters", []):
                assert "anyOf" not in param["schema"], (path, param["name"])  # never "or null"
            assert {"400", "408", "413", "500"} <= set(operation["responses"]), (path, method)
    batch = spec["paths"]["/translate/{direction}/batch"]["post"]
    timeout = {p["name"]: p for p in batch["parameters"]}["X-Request-Timeout-Ms"]["schema"]
    assert (timeout["type"], timeout["exclusiveMinimum"]) == ("integer", 0)
    images = batch["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]["images"]
    assert images["minItems"] == 1


async def test_a_trailing_slash_is_404_not_a_redirect_to_the_clients_host(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (_, client):
        r = await client.post("/translate/a2b/", headers={"host": "evil.example", "content-type": "image/png"})
    assert (r.status_code, r.json()["error"]) == (404, "not_found") and "location" not in r.headers


async def test_nosniff_everywhere_and_a_hashed_csp_on_the_docs(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (_, client):
        for path in ("/healthz", "/openapi.json", "/docs", "/nope"):
            assert (await client.get(path)).headers["x-content-type-options"] == "nosniff", path
        docs = await client.get("/docs")
        redoc = await client.get("/redoc")
    (script,) = re.findall(r"<script>(.*?)</script>", docs.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    csp = docs.headers["content-security-policy"]
    assert f"'sha256-{digest}'" in csp and "default-src 'none'" in csp and "'unsafe-inline'" not in csp.split(";")[1]
    assert "script-src 'self'" in redoc.headers["content-security-policy"]


async def test_by_default_a_direction_on_a_2_core_cpu_runs_two_requests_side_by_side(
    repo: Path, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU of 2 cores the default is two instances per direction: a second request starts while the first
    still runs."""
    monkeypatch.delenv("DCLGAN_INSTANCES_PER_DEVICE")
    monkeypatch.setattr(service.config, "default_threads", lambda: 2)
    async with running_app(Settings(models_dir=repo), fakes.factory) as (_, client):
        fakes.gate.clear()
        both = [asyncio.ensure_future(client.post("/translate/a2b", **raw(png(seed=s)))) for s in (1, 2)]
        await eventually(lambda: len(fakes.batches) == 2, what="both requests to be running at once")
        fakes.gate.set()
        assert [(await r).status_code for r in both] == [200, 200]
        text = (await client.get("/metrics")).text
    assert sample(text, "dclgan_instances", device="cpu") == 4  # two directions x two
