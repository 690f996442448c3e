"""KServe v2 (Open Inference Protocol) health and metadata routes, in process over fake runners.

Each state the service can be in (warming up, ready, one direction unhealthy, draining, failed) is
checked against ``/healthz`` and ``/readyz``, so the v2 routes cannot drift from them.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from service_fakes import BrokenRunner, Fakes, eventually, running_app, state_of, write_fake_repo

from service.config import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """Two models, so that one model's readiness can differ from the other's."""
    root = write_fake_repo(tmp_path / "models", name="tiny", directions=("a2b", "b2a"))
    return write_fake_repo(root, name="other", directions=("c2d", "d2c"))


async def statuses(c: httpx.AsyncClient, *paths: str) -> list[int]:
    return [(await c.get(path)).status_code for path in paths]


async def test_a_ready_server_answers_every_v2_route(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (_, c):
        live, ready = await c.get("/v2/health/live"), await c.get("/v2/health/ready")
        assert (live.status_code, live.json()) == (200, {"live": True})
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        model_ready = await c.get("/v2/models/tiny/ready")
        assert (model_ready.status_code, model_ready.json()) == (200, {"ready": True})
        metadata = await c.get("/v2/models/tiny")
        assert metadata.status_code == 200
        assert metadata.json() == {
            "name": "tiny",
            "versions": ["7"],
            "platform": "onnx",
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, -1, -1]}],
            "outputs": [{"name": "translated", "datatype": "FP32", "shape": [-1, 3, -1, -1]}],
        }


@pytest.mark.parametrize("path", ["/v2/models/nope", "/v2/models/nope/ready", "/v2/models/a2b/ready"])
async def test_an_unknown_model_is_404_with_an_error_field(repo: Path, fakes: Fakes, path: str) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (_, c):
        r = await c.get(path)
        assert r.status_code == 404
        assert "available: other, tiny" in r.json()["detail"] and isinstance(r.json()["error"], str)


async def test_not_ready_while_warming_up_but_live(repo: Path, fakes: Fakes) -> None:
    fakes.warmup_gate.clear()
    async with running_app(Settings(models_dir=repo), fakes.factory, wait_ready=False) as (_, c):
        assert await statuses(c, "/healthz", "/v2/health/live") == [200, 200]
        assert await statuses(c, "/readyz", "/v2/health/ready", "/v2/models/tiny/ready") == [503, 503, 503]
        r = await c.get("/v2/models/tiny/ready")
        assert r.json() == {"ready": False} and r.headers["retry-after"] == "1"
        fakes.warmup_gate.set()
        for _ in range(2000):
            if (await c.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.005)
        assert await statuses(c, "/v2/health/ready", "/v2/models/tiny/ready") == [200, 200]


async def test_a_model_is_ready_only_while_each_of_its_directions_has_a_healthy_instance(
    repo: Path, fakes: Fakes
) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (app, c):
        pool = state_of(app).pool
        assert pool is not None
        (sick,) = [inst for inst in pool.instances if inst.direction.name == "b2a"]
        sick.stuck = True  # as the watchdog marks an instance whose batch ran past the limit
        assert await statuses(c, "/readyz", "/v2/health/ready") == [503, 503]
        assert await statuses(c, "/v2/models/tiny/ready", "/v2/models/other/ready") == [503, 200]
        assert (await c.post("/translate/b2a", content=b"x", headers={"content-type": "image/png"})).status_code == 503
        sick.stuck = False
        assert await statuses(c, "/readyz", "/v2/health/ready", "/v2/models/tiny/ready") == [200, 200, 200]


async def test_draining_makes_every_model_not_ready(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (app, c):
        state_of(app).begin_drain()
        assert await statuses(c, "/readyz", "/v2/health/ready", "/v2/models/tiny/ready") == [503, 503, 503]
        assert await statuses(c, "/healthz", "/v2/health/live") == [200, 200]


async def test_a_failed_instance_fails_v2_liveness_as_healthz(repo: Path) -> None:
    broken = running_app(Settings(models_dir=repo), lambda m, d, dev: BrokenRunner(dev), wait_ready=False)
    async with broken as (app, c):
        await eventually(lambda: state_of(app).pool is not None and state_of(app).pool.failure is not None)
        live = await c.get("/v2/health/live")
        assert (live.status_code, live.json()) == (503, {"live": False})
        assert await statuses(c, "/healthz", "/v2/health/ready", "/v2/models/tiny/ready") == [503, 503, 503]


async def test_metadata_needs_a_key_like_models_and_health_does_not(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo, api_keys=["k1"]), fakes.factory) as (_, c):
        assert await statuses(c, "/models", "/v2/models/tiny") == [401, 401]
        key = {"authorization": "Bearer k1"}
        assert (await c.get("/v2/models/tiny", headers=key)).status_code == 200
        assert await statuses(c, "/v2/health/live", "/v2/health/ready", "/v2/models/tiny/ready") == [200, 200, 200]


async def test_openapi_documents_the_v2_routes(repo: Path, fakes: Fakes) -> None:
    async with running_app(Settings(models_dir=repo), fakes.factory) as (_, c):
        paths = (await c.get("/openapi.json")).json()["paths"]
    for path, codes in {
        "/v2/health/live": {"200", "503"},
        "/v2/health/ready": {"200", "503"},
        "/v2/models/{name}": {"200", "404"},
        "/v2/models/{name}/ready": {"200", "404", "503"},
    }.items():
        operation = paths[path]["get"]
        assert operation["tags"] == ["kserve-v2"] and codes <= set(operation["responses"]), path
