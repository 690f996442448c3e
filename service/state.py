"""What one running app holds, and its lifecycle: starting -> ready -> draining (or failed).

``AppState`` is created empty by ``create_app`` and given its first :class:`~service.generation.Generation`
by the lifespan once the repository is loaded and the worker pool started; a reload replaces it
(:mod:`service.lifecycle`). It lives on ``app.state.service``; routes reach it through
``service.api.deps``. Only the event loop mutates ``inflight``, ``draining``, ``generation`` and the
leases, so they need no lock.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from anyio import CapacityLimiter, to_thread

from service.admission import MemoryBudget
from service.config import Settings
from service.errors import ErrorPolicy, NotReady, Overloaded, UnknownDirection
from service.generation import Generation, ServedDirection
from service.metrics import ServiceMetrics
from service.workers import WorkerPool

T = TypeVar("T")


class Phase(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    DEGRADED = "degraded"  # a direction has no healthy instance (failed or stuck past the batch limit)
    FAILED = "failed"


@dataclass
class AppState:
    """Settings, metrics and, once started, the served generation of models.

    Attributes:
        budget: memory that request bodies and decoded images may hold at once.
        io_limiter: the bounded pool that decodes and encodes (created by the lifespan, on the loop).
        generation: what requests are routed to (``None`` until the first load).
        retiring: generations replaced by a reload and still draining.
    """

    settings: Settings
    metrics: ServiceMetrics
    policy: ErrorPolicy
    budget: MemoryBudget
    io_limiter: CapacityLimiter | None = None
    generation: Generation | None = None
    retiring: list[Generation] = field(default_factory=list)
    draining: bool = False
    inflight: int = 0
    drain_started: float | None = None
    cut_off_reason: str | None = None
    _tasks: set[asyncio.Task[object]] = field(default_factory=set)

    @property
    def pool(self) -> WorkerPool | None:
        """The served generation's pool (a reload's new pool counts only once switched to)."""
        return None if self.generation is None else self.generation.pool

    @property
    def directions(self) -> dict[str, ServedDirection]:
        """Each served direction's newest version."""
        generation = self.generation
        return {} if generation is None else {name: generation.newest(name) for name in generation.routes}

    @property
    def phase(self) -> Phase:
        if self.draining:
            return Phase.DRAINING
        if self.pool is None:
            return Phase.STARTING
        if self.pool.failure is not None:
            return Phase.FAILED
        if not self.pool.warm:
            return Phase.STARTING
        # The default versions decide: an older version kept for pinned requests (`?version=`) with no healthy
        # instance refuses only those (503), as a sick direction does, and takes no replica out of rotation.
        return Phase.READY if all(served.healthy for served in self.directions.values()) else Phase.DEGRADED

    @contextmanager
    def lease(self, direction: str, version: str | None) -> Iterator[ServedDirection]:
        """Route a request to ``direction`` in ``version`` (default: the newest) and keep what serves it open
        until the request is answered, even if a reload switches to a new generation meanwhile."""
        if self.generation is None:
            raise UnknownDirection(f"no direction {direction!r}; available: none (no model loaded yet)")
        with self.generation.lease(direction, version) as served:
            yield served

    @contextmanager
    def admit(self) -> Iterator[None]:
        """Count a translate request as in flight, or refuse it (503) unless the service is ready and has
        room for one more (``max_inflight_requests``)."""
        phase = self.phase
        if phase not in (Phase.READY, Phase.DEGRADED):  # degraded: the routes refuse only the sick direction
            raise NotReady(f"the service is {phase.value}")
        if self.inflight >= self.settings.max_inflight_requests:
            raise Overloaded(f"{self.inflight} requests are in flight, the most this server takes; retry later")
        task = asyncio.current_task()
        self.inflight += 1
        if task is not None:
            self._tasks.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if self.cut_off_reason is None or task is None:
                raise
            task.uncancel()  # this cancellation was ours: the request is answered, not abandoned
            raise NotReady(self.cut_off_reason) from None
        finally:
            self.inflight -= 1
            self._tasks.discard(task)  # type: ignore[arg-type]

    def cut_off(self, reason: str = "the server is shutting down and could not finish this request") -> int:
        """End the drain: every admitted request is cancelled and answers 503 ``not_ready`` (JSON, with its
        request id) instead of being dropped by the server's shutdown. Returns how many were cut off."""
        self.begin_drain()
        self.cut_off_reason = reason
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def in_pool(self, func: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run ``func`` in the bounded decode/encode pool (``io_threads`` at once)."""
        return await to_thread.run_sync(functools.partial(func, *args, **kwargs), limiter=self.io_limiter)

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
