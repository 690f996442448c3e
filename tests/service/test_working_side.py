"""A model's recommended working side (model.json ``input.working_side``): the default scale of a request."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from service.config import Settings
from service.imaging import encode_image
from service.repository import ModelCard, load_model_dir
from service.runtime import Engine
from tests.service.service_fakes import Fakes, running_app, write_fake_repo

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def with_working_side(model_dir: Path, side: int | None) -> None:
    """Rewrite a model folder's card with ``input.working_side`` set (validated through the schema)."""
    raw = json.loads((model_dir / "model.json").read_text())
    raw["input"]["working_side"] = side
    ModelCard.model_validate(raw).write(model_dir)


def png(size: tuple[int, int]) -> dict[str, Any]:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return {"content": encode_image(Image.fromarray(pixels), "png"), "headers": {"content-type": "image/png"}}


async def test_requests_run_at_the_models_working_side_unless_they_ask(tmp_path: Path) -> None:
    repo = write_fake_repo(tmp_path / "models")
    with_working_side(repo / "tiny", 40)
    fakes = Fakes()
    async with running_app(Settings(models_dir=repo, max_side=1024), fakes.factory) as (_, client):
        r = await client.post("/translate/a2b", **png((100, 50)))
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (100, 50)
        assert fakes.batches[-1][1].shape == (1, 3, 20, 40)  # the model's 40, not the server's 1024
        assert (await client.post("/translate/a2b?max_side=80", **png((100, 50)))).status_code == 200
        assert fakes.batches[-1][1].shape == (1, 3, 40, 80)  # a request's max_side overrides it
        info = (await client.get("/models")).json()["models"][0]
        assert info["working_side"] == 40


async def test_the_servers_max_side_still_caps_the_working_side(tmp_path: Path) -> None:
    repo = write_fake_repo(tmp_path / "models")
    with_working_side(repo / "tiny", 400)
    fakes = Fakes()
    async with running_app(Settings(models_dir=repo, max_side=32), fakes.factory) as (_, client):
        assert (await client.post("/translate/a2b", **png((100, 50)))).status_code == 200
        assert fakes.batches[-1][1].shape == (1, 3, 16, 32)


def test_a_working_side_below_the_minimum_is_refused(tmp_path: Path) -> None:
    repo = write_fake_repo(tmp_path / "models")
    with pytest.raises(ValueError, match="working_side"):
        with_working_side(repo / "tiny", 4)


class Recording:
    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.append(batch.shape)
        return batch.copy()


def test_offline_translate_uses_the_working_side_by_default(tiny_model_copy: Path) -> None:
    with_working_side(tiny_model_copy, 16)
    runner = Recording()
    engine = Engine(load_model_dir(tiny_model_copy), {"a2b": runner})
    image = Image.new("RGB", (64, 32))
    (out,) = engine.translate([image], "a2b")
    assert runner.shapes == [(1, 3, 8, 16)] and out.size == (64, 32)
    engine.translate([image], "a2b", max_side=32)
    assert runner.shapes[-1] == (1, 3, 16, 32)
