"""Reloading the model repository without a restart (``POST /admin/reload``, polling), in process.

Runners stamp their model version into every output pixel (``StampRunner``), so each response proves
which version computed it, whatever its ``X-Model-Version`` header says. Versions are held at gates to
put requests in flight, or a warm-up in progress, at the moment a test needs; waits are bounded polls.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from service_fakes import (
    StampRunner,
    Stamps,
    eventually,
    png,
    raw,
    running_app,
    sample,
    stamped_pixel,
    state_of,
    write_fake_repo,
)

from service.config import Settings
from service.generation import Generation
from service.main import create_app
from service.repository import MODEL_JSON, LoadedModel

pytestmark = pytest.mark.anyio


def set_version(repo: Path, version: str) -> None:
    """Edit the flat model's card in place, as an operator replacing the model would."""
    path = repo / "tiny" / MODEL_JSON
    card = json.loads(path.read_text())
    card["version"] = version
    path.write_text(json.dumps(card))


def computed_by(response: httpx.Response) -> str:
    """The version the response names, after checking every pixel was computed by that version."""
    version = response.headers["x-model-version"]
    pixels = np.asarray(Image.open(io.BytesIO(response.content)))
    assert (pixels == stamped_pixel(version)).all(), f"the pixels are not version {version}'s"
    return version


async def translate(c: httpx.AsyncClient, seed: int) -> httpx.Response:
    return await c.post("/translate/a2b", **raw(png((16, 12), seed)))


async def slow_upload(c: httpx.AsyncClient, seed: int, go: asyncio.Event) -> httpx.Response:
    """A request routed at once whose body arrives only after ``go``: it is not queued yet at a switch."""
    data = png((16, 12), seed)

    async def body() -> AsyncIterator[bytes]:
        yield data[:10]
        await go.wait()
        yield data[10:]

    return await c.post("/translate/a2b", content=body(), headers={"content-type": "image/png"})


async def reload_under_load(
    c: httpx.AsyncClient, app: Any, repo: Path, queued: int, uploading: int, uploaded: asyncio.Event
) -> tuple[Generation, list[asyncio.Future[httpx.Response]], asyncio.Future[httpx.Response]]:
    """``queued`` requests on version 7, held (one computing, the others queued), ``uploading`` more routed
    to it whose bodies wait for ``uploaded``; then version 8 replaces 7 in the repository and a reload is
    asked for. Returns version 7's generation, the responses to come (in that order) and the reload's."""
    old = state_of(app).generation
    assert old is not None
    first = [asyncio.ensure_future(translate(c, seed)) for seed in range(queued)]
    await eventually(lambda: old.routes["a2b"]["7"].batcher.depth() == queued - 1, what="a queue on version 7")
    uploads = [asyncio.ensure_future(slow_upload(c, seed, uploaded)) for seed in range(100, 100 + uploading)]
    await eventually(lambda: old.leases == queued + uploading, what="the uploads routed to version 7")
    set_version(repo, "8")
    return old, first + uploads, asyncio.ensure_future(c.post("/admin/reload"))


async def test_reload_under_load_loses_no_request_and_each_response_names_its_version(repo: Path) -> None:
    """20 requests queued on version 7, 5 routed to it and still uploading, and a reload to 8 warming up:
    readiness stays 200 and requests still go to 7; after the switch 20 more go to 8 while 7 drains, the
    uploads finish on 7; all 45 succeed, each computed by the version it names."""
    stamps = Stamps(held={"7"}, warmup_held={"8"})
    uploaded = asyncio.Event()
    async with running_app(Settings(models_dir=repo), stamps.factory) as (app, c):
        state = state_of(app)
        old, first, reload = await reload_under_load(c, app, repo, 20, 5, uploaded)
        await eventually(lambda: stamps.warming.count("8") == 2, what="version 8 warming up")
        assert (await c.get("/readyz")).status_code == 200
        assert state.generation is old
        stamps.release("8")
        await eventually(lambda: state.generation is not old, what="the switch")
        assert (await c.get("/readyz")).status_code == 200 and not reload.done()  # 7 still drains
        second = await asyncio.gather(*(translate(c, seed) for seed in range(20, 40)))
        uploaded.set()
        stamps.release("7")
        first_done = await asyncio.gather(*first)
        reloaded = await reload
        metrics = (await c.get("/metrics")).text
    assert [r.status_code for r in first_done + second] == [200] * 45
    assert [computed_by(r) for r in first_done] == ["7"] * 25
    assert [computed_by(r) for r in second] == ["8"] * 20
    assert reloaded.status_code == 200, reloaded.text
    assert reloaded.json()["result"] == "loaded" and reloaded.json()["models"] == {"tiny": ["8"]}
    assert old.pool.instances and all(not i.thread.is_alive() for i in old.pool.instances if i.thread)
    assert sample(metrics, "dclgan_reloads_total", result="loaded") == 1
    info = {"model": "tiny", "direction": "a2b", "device": "cpu", "provider": "FakeExecutionProvider"}
    info |= {"engine": "fake", "precision": "float32", "psnr_db": ""}
    assert sample(metrics, "dclgan_model_info", version="8", **info) == 1
    assert sample(metrics, "dclgan_model_info", version="7", **info) == 0


def pool_threads() -> set[threading.Thread]:
    """The worker and watchdog threads of every pool alive in this process."""
    return {t for t in threading.enumerate() if t.name.startswith("dclgan-") and t.is_alive()}


async def test_a_reload_never_cuts_the_old_versions_requests_off_whatever_the_drain_timeout(repo: Path) -> None:
    """drain_timeout_s bounds a shutdown, not a reload: with it at 0, 5 requests queued or running on
    version 7 and 2 still uploading at the switch all finish on 7 once it computes again."""
    stamps = Stamps(held={"7"})
    uploaded = asyncio.Event()
    async with running_app(Settings(models_dir=repo, drain_timeout_s=0), stamps.factory) as (app, c):
        state = state_of(app)
        old, first, reload = await reload_under_load(c, app, repo, 5, 2, uploaded)
        await eventually(lambda: state.generation is not old, what="the switch")
        after = await translate(c, 9)
        uploaded.set()
        await eventually(lambda: old.routes["a2b"]["7"].batcher.depth() == 6, what="the uploads queued on 7")
        stamps.release("7")
        responses = await asyncio.gather(*first)
        reloaded = await reload
    assert [(r.status_code, computed_by(r)) for r in responses] == [(200, "7")] * 7
    assert (after.status_code, computed_by(after)) == (200, "8")
    assert reloaded.status_code == 200, reloaded.text
    assert not any(i.thread.is_alive() for i in old.pool.instances if i.thread)


async def test_a_card_that_is_not_utf8_is_a_failed_reload(repo: Path) -> None:
    async with running_app(Settings(models_dir=repo), Stamps().factory) as (app, c):
        old = state_of(app).generation
        (repo / "tiny" / MODEL_JSON).write_bytes(b'{"name": "\xff"}')
        reloaded = await c.post("/admin/reload")
        after = await translate(c, 0)
        metrics = (await c.get("/metrics")).text
        assert state_of(app).generation is old
    assert (reloaded.status_code, reloaded.json()["error"]) == (409, "reload_failed"), reloaded.text
    assert "not UTF-8" in reloaded.json()["detail"]
    assert (after.status_code, computed_by(after)) == (200, "7")
    assert sample(metrics, "dclgan_reloads_total", result="failed") == 1


async def test_an_unexpected_error_in_a_reload_is_a_failed_reload(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_scan(root: Path) -> list[LoadedModel]:
        raise RuntimeError("a bug")

    async with running_app(Settings(models_dir=repo), Stamps().factory) as (_, c):
        monkeypatch.setattr("service.lifecycle.scan_repository", broken_scan)
        reloaded = await c.post("/admin/reload")
        metrics = (await c.get("/metrics")).text
    assert (reloaded.status_code, reloaded.json()["error"]) == (409, "reload_failed"), reloaded.text
    assert reloaded.json()["detail"] == "unexpected RuntimeError: a bug"
    assert sample(metrics, "dclgan_reloads_total", result="failed") == 1


async def test_the_poller_outlives_a_failed_reload_and_the_shutdown_stops_every_thread(repo: Path) -> None:
    before = pool_threads()
    card = repo / "tiny" / MODEL_JSON
    good = json.loads(card.read_text())
    async with running_app(Settings(models_dir=repo, reload_poll_s=0.02), Stamps().factory) as (app, c):
        card.write_bytes(b'{"name": "\xff"}')
        registry = state_of(app).metrics.registry
        failed = {"result": "failed"}
        await eventually(lambda: (registry.get_sample_value("dclgan_reloads_total", failed) or 0) >= 1, what="failed")
        card.write_text(json.dumps(good | {"version": "9"}))
        await eventually(lambda: state_of(app).directions["a2b"].model.version == "9", what="the poller's reload")
        after = await translate(c, 0)
    assert (after.status_code, computed_by(after)) == (200, "9")
    assert pool_threads() <= before


async def test_a_shutdown_during_a_reloads_warm_up_stops_the_half_built_versions(repo: Path) -> None:
    """The poller is cancelled while version 8 warms up: its pool is stopped all the same, no thread is left."""
    before = pool_threads()
    stamps = Stamps(warmup_held={"8"})
    app_cm = running_app(Settings(models_dir=repo, reload_poll_s=0.02), stamps.factory)
    app, _ = await app_cm.__aenter__()
    set_version(repo, "8")
    await eventually(lambda: stamps.warming.count("8") == 2, what="version 8 warming up")
    shutdown = asyncio.ensure_future(app_cm.__aexit__(None, None, None))
    await eventually(lambda: state_of(app).draining, what="the shutdown")
    stamps.release("8")
    await shutdown
    assert pool_threads() <= before
    assert state_of(app).directions["a2b"].model.version == "7"


async def test_queue_depth_counts_the_old_versions_queue_while_it_drains(repo: Path) -> None:
    stamps = Stamps(held={"7"})
    async with running_app(Settings(models_dir=repo), stamps.factory) as (app, c):
        state = state_of(app)
        old, first, reload = await reload_under_load(c, app, repo, 5, 0, asyncio.Event())
        await eventually(lambda: state.generation is not old, what="the switch")
        during = (await c.get("/metrics")).text
        stamps.release("7")
        await asyncio.gather(*first, reload)
        after = (await c.get("/metrics")).text
    assert sample(during, "dclgan_queue_depth", direction="a2b") == 4
    assert sample(after, "dclgan_queue_depth", direction="a2b") == 0


async def test_a_reload_asked_for_during_another_runs_after_it(repo: Path) -> None:
    """Version 8 warms up when the repository changes to 9 and a second reload is asked for: it is refused
    (409 ``reload_in_progress``) but runs once the first ends, so 9 is served in the end."""
    stamps = Stamps(warmup_held={"8"})
    async with running_app(Settings(models_dir=repo), stamps.factory) as (app, c):
        set_version(repo, "8")
        first = asyncio.ensure_future(c.post("/admin/reload"))
        await eventually(lambda: stamps.warming.count("8") == 2, what="version 8 warming up")
        set_version(repo, "9")
        second = await c.post("/admin/reload")
        stamps.release("8")
        assert (await first).json()["models"] == {"tiny": ["8"]}
        await eventually(lambda: state_of(app).directions["a2b"].model.version == "9", what="the follow-up")
        metrics = (await c.get("/metrics")).text
    assert (second.status_code, second.json()["error"]) == (409, "reload_in_progress")
    assert sample(metrics, "dclgan_reloads_total", result="loaded") == 2


def tamper(repo: Path) -> None:
    onnx = repo / "tiny" / "a2b.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"!")


def break_card(repo: Path) -> None:
    (repo / "tiny" / MODEL_JSON).write_text("{")


def second_owner(repo: Path) -> None:
    set_version(repo, "8")
    write_fake_repo(repo, name="other", directions=("a2b",))


FAILURES = {
    "tampered file": (tamper, "SHA-256 mismatch"),
    "invalid model.json": (break_card, "is not a valid model card"),
    "failed warm-up": (lambda repo: set_version(repo, "8"), "did not warm up"),
    "direction in two models": (second_owner, "direction 'a2b' is in both 'other' and 'tiny'"),
}


@pytest.mark.parametrize("case", list(FAILURES))
async def test_a_failed_reload_keeps_the_old_version_and_says_why(repo: Path, case: str) -> None:
    change, reason = FAILURES[case]
    stamps = Stamps(broken={"8"})
    async with running_app(Settings(models_dir=repo), stamps.factory) as (app, c):
        old = state_of(app).generation
        change(repo)
        reloaded = await c.post("/admin/reload")
        after = await translate(c, 0)
        health = [(await c.get(path)).status_code for path in ("/healthz", "/readyz")]
        metrics = (await c.get("/metrics")).text
        assert state_of(app).generation is old
    assert reloaded.status_code == 409 and reloaded.json()["error"] == "reload_failed"
    assert reason in reloaded.json()["detail"]
    assert (after.status_code, computed_by(after)) == (200, "7")
    assert health == [200, 200]
    assert sample(metrics, "dclgan_reloads_total", result="failed") == 1
    assert sample(metrics, "dclgan_reloads_total", result="loaded") == 0
    # The new versions never served: their warm-up is not a failure of the instances serving these directions.
    assert sample(metrics, "dclgan_instance_failures_total", direction="a2b", device="cpu", kind="warmup") == 0


async def test_a_reload_of_an_unchanged_repository_changes_nothing(repo: Path) -> None:
    async with running_app(Settings(models_dir=repo), Stamps().factory) as (app, c):
        old = state_of(app).generation
        reloaded = await c.post("/admin/reload")
        assert state_of(app).generation is old
    assert reloaded.status_code == 200
    assert (reloaded.json()["result"], reloaded.json()["models"]) == ("unchanged", {"tiny": ["7"]})


async def test_a_second_reload_while_one_runs_is_refused(repo: Path) -> None:
    stamps = Stamps(warmup_held={"8"})
    async with running_app(Settings(models_dir=repo), stamps.factory) as (_, c):
        set_version(repo, "8")
        first = asyncio.ensure_future(c.post("/admin/reload"))
        await eventually(lambda: "8" in stamps.warming, what="the first reload warming up")
        second = await c.post("/admin/reload")
        stamps.release("8")
        assert (await first).status_code == 200
    assert (second.status_code, second.json()["error"]) == (409, "reload_in_progress")


async def test_admin_reload_needs_a_key_when_keys_are_set(repo: Path) -> None:
    async with running_app(Settings(models_dir=repo, api_keys="k1"), Stamps().factory) as (_, c):
        missing = await c.post("/admin/reload")
        wrong = await c.post("/admin/reload", headers={"Authorization": "Bearer nope"})
        right = await c.post("/admin/reload", headers={"Authorization": "Bearer k1"})
    assert [missing.status_code, wrong.status_code, right.status_code] == [401, 401, 200]
    assert missing.json()["error"] == "unauthorized"


@pytest.mark.parametrize(
    ("host", "status"),
    [("127.0.0.1", 200), ("127.0.0.2", 200), ("::1", 200), ("::ffff:127.0.0.1", 200), ("localhost", 200),
     ("0.0.0.0", 403), ("::", 403), ("192.0.2.7", 403)],
)
async def test_without_keys_reloading_needs_a_server_listening_on_loopback(repo: Path, host: str, status: int) -> None:
    """What the server binds decides, not the client's address, which a proxy on the same host makes loopback
    for everyone and ``X-Forwarded-For`` can forge; /openapi.json documents the 403 only where it can happen."""
    app = create_app(Settings(models_dir=repo, host=host), runner_factory=Stamps().factory)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        await eventually(lambda: state_of(app).pool is not None and state_of(app).pool.warm, what="warm")
        reloaded = await c.post("/admin/reload", headers={"X-Forwarded-For": "127.0.0.1"})
        documented = (await c.get("/openapi.json")).json()["paths"]["/admin/reload"]["post"]["responses"]
    assert reloaded.status_code == status, reloaded.text
    assert ("403" in documented) == (status == 403)
    if status == 403:
        assert reloaded.json()["error"] == "forbidden"
        assert "DCLGAN_API_KEYS" in reloaded.json()["detail"] and "SIGHUP" in reloaded.json()["detail"]


async def test_with_keys_the_admin_route_documents_401_not_403(repo: Path) -> None:
    settings = Settings(models_dir=repo, api_keys="k1", host="0.0.0.0")
    async with running_app(settings, Stamps().factory) as (_, c):
        documented = (await c.get("/openapi.json")).json()["paths"]["/admin/reload"]["post"]["responses"]
    assert "401" in documented and "403" not in documented


async def test_the_poller_sees_a_change_made_while_the_first_load_ran(repo: Path) -> None:
    stamps = Stamps()

    def change_during_load(model: LoadedModel, direction: str, device: str) -> StampRunner:
        if model.version == "7":  # the repository was scanned already: 7 is what loads
            set_version(repo, "19")
        return stamps.factory(model, direction, device)

    async with running_app(Settings(models_dir=repo, reload_poll_s=0.02), change_during_load) as (app, _):
        await eventually(lambda: state_of(app).directions["a2b"].model.version == "19", what="the poller's reload")


async def test_polling_reloads_a_changed_repository(repo: Path) -> None:
    async with running_app(Settings(models_dir=repo, reload_poll_s=0.05), Stamps().factory) as (app, c):
        set_version(repo, "18")  # a longer card: seen even where modification times are coarse
        await eventually(lambda: state_of(app).directions["a2b"].model.version == "18", what="the poller's reload")
        after = await translate(c, 0)
        metrics = (await c.get("/metrics")).text
    assert computed_by(after) == "18"
    assert sample(metrics, "dclgan_reloads_total", result="loaded") == 1
