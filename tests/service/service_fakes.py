"""Test doubles and helpers for the service tests: fake runners, a fake repository, an in-process app.

A ``FakeRunner`` negates its input, so every output is predictable from its own input (an output
handed to the wrong request is caught), and can be held at a gate to build queues deterministically.
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.imaging import encode_image
from service.main import create_app
from service.repository import (
    DirectionSpec,
    InputContract,
    LoadedModel,
    ModelCard,
    OnnxFile,
    Provenance,
    sha256_file,
)
from service.state import AppState

FAKE_PROVIDER = "FakeExecutionProvider"


@dataclass
class Fakes:
    """Shared control of every ``FakeRunner`` of a test.

    Attributes:
        warmup_gate: warm-up calls wait for it (set by default).
        gate: inference calls (not warm-ups) wait for it (set by default).
        batches: (direction, input batch) of every inference call, in order.
        fail: when set, inference raises this instead of returning.
    """

    warmup_gate: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event = field(default_factory=threading.Event)
    batches: list[tuple[str, np.ndarray]] = field(default_factory=list)
    fail: Exception | None = None

    def __post_init__(self) -> None:
        self.warmup_gate.set()
        self.gate.set()

    def factory(self, model: LoadedModel, direction: str, device: str) -> FakeRunner:
        return FakeRunner(self, direction, device)

    def sizes(self, direction: str | None = None) -> list[int]:
        """Batch sizes run so far (optionally for one direction)."""
        return [len(b) for d, b in list(self.batches) if direction in (None, d)]


class FakeDevice(ABC):
    """Where and how every fake runner says it runs (the ``DeviceRunner`` attributes but ``device``); its first
    call is the warm-up. Subclasses say what a call computes."""

    provider = FAKE_PROVIDER
    engine, precision, psnr_db, probe_ms = "fake", "float32", None, None
    warmed = False

    def run(self, batch: np.ndarray) -> np.ndarray:
        warm_up, self.warmed = not self.warmed, True
        return self.compute(batch, warm_up=warm_up)

    @abstractmethod
    def compute(self, batch: np.ndarray, *, warm_up: bool) -> np.ndarray:
        """The output for ``batch``; ``warm_up`` on the first call."""


class FakeRunner(FakeDevice):
    """Negates its input."""

    def __init__(self, fakes: Fakes, direction: str, device: str) -> None:
        self.fakes, self.direction, self.device = fakes, direction, device

    def compute(self, batch: np.ndarray, *, warm_up: bool) -> np.ndarray:
        if warm_up:
            self.fakes.warmup_gate.wait(30)
            return -batch
        self.fakes.batches.append((self.direction, batch.copy()))
        self.fakes.gate.wait(30)
        if self.fakes.fail is not None:
            raise self.fakes.fail
        return -batch


def write_fake_repo(
    root: Path,
    name: str = "tiny",
    directions: tuple[str, ...] = ("a2b", "b2a"),
    *,
    version: str = "7",
    versioned: bool = False,
) -> Path:
    """A repository with one model whose ONNX files are placeholders (fake runners never open them), in the
    flat layout (``<name>/model.json``) or, ``versioned``, as the version folder ``<name>/<version>/``."""
    folder = root / name / version if versioned else root / name
    folder.mkdir(parents=True)
    specs = []
    for index, direction in enumerate(directions):
        path = folder / f"{direction}.onnx"
        path.write_bytes(direction.encode())
        source, target = ("a", "b") if index % 2 == 0 else ("b", "a")
        specs.append(
            DirectionSpec(
                name=direction,
                source=source,
                target=target,
                generator=f"G_{source.upper()}",
                files={"float32": OnnxFile(path=path.name, sha256=sha256_file(path))},
            )
        )
    ModelCard(
        name=name,
        version=version,
        domains=("a", "b"),
        directions=specs,
        input=InputContract(native_size=16),
        provenance=Provenance(model_type="dcl", ngf=4, n_blocks=1, antialias=True, source="test"),
    ).write(folder)
    return root


def state_of(app: Any) -> AppState:
    """The service state of an app built by ``create_app``."""
    return app.state.service  # type: ignore[no-any-return]


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` (bounded; no timing assertion, only a ceiling against hangs)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


async def eventually(predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "condition") -> None:
    """``wait_until`` for async tests: yields to the event loop between polls."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@asynccontextmanager
async def running_app(
    settings: Settings, runner_factory: Any = None, *, wait_ready: bool = True
) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app with its lifespan running, and an in-process httpx client (``raise_app_exceptions`` off, as
    a real server would answer a 500)."""
    app = create_app(settings, runner_factory=runner_factory)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if wait_ready:
                for _ in range(2000):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.005)
                else:
                    raise AssertionError("the app never became ready")
            yield app, client


def samples(metrics_text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus exposition, keyed by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(metrics_text)
        for s in family.samples
    }


def sample(metrics_text: str, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a counter never incremented has no series yet)."""
    return samples(metrics_text).get((name, frozenset(labels.items())), 0.0)


class BrokenRunner(FakeDevice):
    """A runner whose every call fails, as an instance that cannot allocate its memory would."""

    def __init__(self, device: str) -> None:
        self.device = device

    def compute(self, batch: np.ndarray, *, warm_up: bool) -> np.ndarray:
        raise RuntimeError("cannot allocate")


class RecordingRunner:
    """A Runner that returns its input unchanged and records every batch shape."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.shapes.append(batch.shape)
        return batch.copy()


def png(size: tuple[int, int] = (30, 20), seed: int = 0) -> bytes:
    """A random RGB PNG of ``size`` (width, height)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return encode_image(Image.fromarray(pixels), "png")


def raw(data: bytes, content_type: str = "image/png") -> dict[str, Any]:
    """httpx keyword arguments for a raw image body."""
    return {"content": data, "headers": {"content-type": content_type}}


def stamp(version: str) -> float:
    """What a ``StampRunner`` of a numbered ``version`` outputs everywhere: a grey level of its own."""
    return int(version) / 20 - 1


def stamped_pixel(version: str) -> int:
    """The 0..255 value every pixel of an image computed by ``version``'s ``StampRunner`` has."""
    return int(np.rint((stamp(version) + 1) * 127.5))


@dataclass
class Stamps:
    """Runners that stamp their model version into every output pixel, so a test can tell from the image
    itself which version computed it.

    Attributes:
        held: versions whose inference (not warm-up) waits until released.
        warmup_held: versions whose warm-up waits until released.
        broken: versions whose warm-up fails.
        warming: versions whose warm-up has begun, one entry per instance.
    """

    held: set[str] = field(default_factory=set)
    warmup_held: set[str] = field(default_factory=set)
    broken: set[str] = field(default_factory=set)
    warming: list[str] = field(default_factory=list)
    _released: threading.Condition = field(default_factory=threading.Condition)

    def release(self, version: str) -> None:
        with self._released:
            self.held.discard(version)
            self.warmup_held.discard(version)
            self._released.notify_all()

    def wait(self, version: str, held: set[str]) -> None:
        with self._released:
            self._released.wait_for(lambda: version not in held, timeout=30)

    def factory(self, model: LoadedModel, direction: str, device: str) -> StampRunner:
        return StampRunner(self, model.version, device)


class StampRunner(FakeDevice):
    """Outputs ``stamp(version)`` in every pixel."""

    def __init__(self, stamps: Stamps, version: str, device: str) -> None:
        self.stamps, self.version, self.device = stamps, version, device

    def compute(self, batch: np.ndarray, *, warm_up: bool) -> np.ndarray:
        if warm_up:
            self.stamps.warming.append(self.version)
            self.stamps.wait(self.version, self.stamps.warmup_held)
            if self.version in self.stamps.broken:
                raise RuntimeError(f"version {self.version} cannot warm up")
        else:
            self.stamps.wait(self.version, self.stamps.held)
        return np.full_like(batch, stamp(self.version))
