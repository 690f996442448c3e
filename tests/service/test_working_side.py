"""A model's recommended working side (model.json ``input.working_side``): the default scale of a request."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image
from service_fakes import Fakes, RecordingRunner, png, raw, running_app, write_fake_repo

from service.config import Settings
from service.repository import ModelCard, load_model_dir
from service.runtime import Engine

pytestmark = pytest.mark.anyio


def with_working_side(model_dir: Path, side: int | None) -> None:
    """Rewrite a model folder's card with ``input.working_side`` set (validated through the schema)."""
    raw = json.loads((model_dir / "model.json").read_text())
    raw["input"]["working_side"] = side
    ModelCard.model_validate(raw).write(model_dir)


async def test_requests_run_at_the_models_working_side_unless_they_ask(tmp_path: Path) -> None:
    repo = write_fake_repo(tmp_path / "models")
    with_working_side(repo / "tiny", 40)
    fakes = Fakes()
    async with running_app(Settings(models_dir=repo, max_side=1024), fakes.factory) as (_, client):
        r = await client.post("/translate/a2b", **raw(png((100, 50))))
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (100, 50)
        assert fakes.batches[-1][1].shape == (1, 3, 20, 40)  # the model's 40, not the server's 1024
        assert (await client.post("/translate/a2b?max_side=80", **raw(png((100, 50))))).status_code == 200
        assert fakes.batches[-1][1].shape == (1, 3, 40, 80)  # a request's max_side overrides it
        info = (await client.get("/models")).json()["models"][0]
        assert info["working_side"] == 40


async def test_the_servers_max_side_still_caps_the_working_side(tmp_path: Path) -> None:
    repo = write_fake_repo(tmp_path / "models")
    with_working_side(repo / "tiny", 400)
    fakes = Fakes()
    async with running_app(Settings(models_dir=repo, max_side=32), fakes.factory) as (_, client):
        assert (await client.post("/translate/a2b", **raw(png((100, 50))))).status_code == 200
        assert fakes.batches[-1][1].shape == (1, 3, 16, 32)


def test_a_working_side_below_the_minimum_is_refused(tmp_path: Path) -> None:
    repo = write_fake_repo(tmp_path / "models")
    with pytest.raises(ValueError, match="working_side"):
        with_working_side(repo / "tiny", 4)


def test_offline_translate_uses_the_working_side_by_default(tiny_model_copy: Path) -> None:
    with_working_side(tiny_model_copy, 16)
    runner = RecordingRunner()
    engine = Engine(load_model_dir(tiny_model_copy), {"a2b": runner})
    image = Image.new("RGB", (64, 32))
    (out,) = engine.translate([image], "a2b")
    assert runner.shapes == [(1, 3, 8, 16)] and out.size == (64, 32)
    engine.translate([image], "a2b", max_side=32)
    assert runner.shapes[-1] == (1, 3, 16, 32)
