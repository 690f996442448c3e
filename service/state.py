"""What one running app holds, and its lifecycle: starting -> ready -> draining (or failed).

``AppState`` is created empty by ``create_app`` and filled by the lifespan once the repository is
loaded and the worker pool started. It lives on ``app.state.service``; routes reach it through
``service.api.deps``. Only the event loop mutates ``inflight`` and ``draining``, so they need no lock.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from service.batching import Batcher
from service.config import Settings
from service.errors import ErrorPolicy, NotReady, UnknownDirection
from service.metrics import ServiceMetrics
from service.repository import DirectionSpec, LoadedModel
from service.workers import WorkerPool


class Phase(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


@dataclass(frozen=True)
class ServedDirection:
    """One routable direction: its model, its spec and its queue."""

    model: LoadedModel
    spec: DirectionSpec
    batcher: Batcher

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass
class AppState:
    """Settings, metrics and, once started, the served directions and the worker pool."""

    settings: Settings
    metrics: ServiceMetrics
    policy: ErrorPolicy
    directions: dict[str, ServedDirection] = field(default_factory=dict)
    pool: WorkerPool | None = None
    draining: bool = False
    inflight: int = 0
    drain_started: float | None = None

    @property
    def phase(self) -> Phase:
        if self.draining:
            return Phase.DRAINING
        if self.pool is None:
            return Phase.STARTING
        if self.pool.failure is not None:
            return Phase.FAILED
        return Phase.READY if self.pool.warm else Phase.STARTING

    def direction(self, name: str) -> ServedDirection:
        """The served direction ``name``; the 404 lists the available ones."""
        try:
            return self.directions[name]
        except KeyError:
            available = ", ".join(sorted(self.directions)) or "none (no model loaded yet)"
            raise UnknownDirection(f"no direction {name!r}; available: {available}") from None

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count a translate request as in flight, or refuse it (503) unless the service is ready."""
        phase = self.phase
        if phase is not Phase.READY:
            raise NotReady(f"the service is {phase.value}")
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    def begin_drain(self) -> None:
        """Readiness and new translate requests get 503 from now on; admitted work carries on."""
        if not self.draining:
            self.draining = True
            self.drain_started = time.monotonic()

    def drain_timeout_left(self) -> float:
        """What remains of ``drain_timeout_s`` since the drain began (all of it before)."""
        spent = 0.0 if self.drain_started is None else time.monotonic() - self.drain_started
        return max(0.0, self.settings.drain_timeout_s - spent)

    async def wait_idle(self, timeout_s: float, poll_s: float = 0.02) -> bool:
        """Wait until no translate request is in flight; false if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        return not self.inflight
