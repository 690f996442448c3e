"""A generation: the model versions loaded together, their queues, their worker pool and their routing.

The service serves one generation at a time. A reload builds the next one beside it from a fresh scan
of the repository, warms it up, and switches to it in one assignment (``AppState.generation``); the old
one is drained and stopped (:mod:`service.lifecycle`). A request *leases* the generation it was routed to
for its whole life, so a generation is only closed once no request can still submit to its queues:
that is what makes a switch lose no request.

Routing: a direction (``/translate/{direction}``) may be served by several versions of its model; a
request names one, or gets the newest (:func:`service.repository.version_key`). This module knows
batchers, the worker pool and runners, not HTTP.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from service.batching import Batcher
from service.config import Settings
from service.errors import UnknownDirection, UnknownVersion
from service.repository import DirectionSpec, InputContract, LoadedModel, ModelRepositoryError, version_key
from service.runtime import RunnerConfig, file_variant, native_side, open_runner, threads_per_session
from service.workers import BatchObserver, DeviceRunner, DirectionPlan, WorkerPool

RunnerFactory = Callable[[LoadedModel, str, str], DeviceRunner]
"""(model, direction, device) -> a runner for that direction's ONNX file on that device."""


def onnx_runner_factory(settings: Settings, *, cpu_sessions: int) -> RunnerFactory:
    """Runners over the ONNX files, onnxruntime sessions or OpenVINO compiled models as ``settings`` choose
    (:func:`service.runtime.open_runner`).

    ``cpu_sessions``: how many CPU instances the pool opens. With ``intra_op_threads=0`` each one runs on all
    the usable cores while it runs alone and on its share of them beside other runs
    (:class:`service.runtime.WidthAdaptiveRunner`); a configured count is used as it is.
    """
    threads = settings.intra_op_threads or threads_per_session(cpu_sessions)

    def open_onnx(model: LoadedModel, direction: str, device: str) -> DeviceRunner:
        config = RunnerConfig(
            device=device,
            engine=settings.engine,
            precision=settings.precision,
            psnr_floor_db=settings.psnr_floor_db,
            intra_op_threads=threads,
            # Unless the operator fixed the threads: all cores for a run alone, the shared-out session beside others.
            all_cores_when_alone=not settings.intra_op_threads,
            require_gpu=settings.require_gpu,
            conv_algo_search=settings.cudnn_conv_algo_search,
        )
        return open_runner(model, direction, config)

    return open_onnx


def warmup_input(contract: InputContract) -> np.ndarray:
    """A (1, 3, S, S) batch at the training resolution, S rounded up to the model's multiple."""
    side = native_side(contract)
    return np.random.default_rng(0).uniform(-1, 1, (1, 3, side, side)).astype(np.float32)


@dataclass(frozen=True)
class ServedDirection:
    """One routable (direction, version): its model, its spec, its queue and the pool computing it."""

    model: LoadedModel
    spec: DirectionSpec
    batcher: Batcher
    pool: WorkerPool

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def healthy(self) -> bool:
        """At least one instance of this version of the direction is healthy."""
        return self.pool.serves(self.name, self.model.version)


class Generation:
    """The served versions and the pool computing them; immutable but for its lease count.

    Args:
        models: every version, as :func:`service.repository.scan_repository` returns them.
        routes: direction -> version -> what serves it.
        pool: the instances of every (direction, version).
    """

    def __init__(
        self, models: list[LoadedModel], routes: dict[str, dict[str, ServedDirection]], pool: WorkerPool
    ) -> None:
        self.models = models
        self.routes = routes
        self.pool = pool
        self.leases = 0  # requests routed here and not answered yet; only the event loop changes it

    def newest(self, direction: str) -> ServedDirection:
        versions = self.routes[direction]
        return versions[max(versions, key=version_key)]

    def route(self, direction: str, version: str | None) -> ServedDirection:
        """What serves ``direction`` in ``version`` (default: the newest); the 404s list what is available."""
        versions = self.routes.get(direction)
        if versions is None:
            raise UnknownDirection(f"no direction {direction!r}; available: {', '.join(sorted(self.routes))}")
        if version is None:
            return self.newest(direction)
        if version not in versions:
            available = ", ".join(sorted(versions, key=version_key, reverse=True))
            raise UnknownVersion(f"direction {direction!r} has no version {version!r}; available: {available}")
        return versions[version]

    @contextmanager
    def lease(self, direction: str, version: str | None) -> Iterator[ServedDirection]:
        """Route a request and hold this generation open until it is answered (event loop only)."""
        served = self.route(direction, version)
        self.leases += 1
        try:
            yield served
        finally:
            self.leases -= 1

    def versions(self, model: str) -> list[LoadedModel]:
        """The served versions of ``model``, newest first."""
        return sorted((m for m in self.models if m.name == model), key=lambda m: version_key(m.version), reverse=True)

    def served(self) -> Iterator[ServedDirection]:
        """Every (direction, version), directions sorted, newest version first."""
        for direction in sorted(self.routes):
            versions = self.routes[direction]
            for version in sorted(versions, key=version_key, reverse=True):
                yield versions[version]

    def same_models(self, models: list[LoadedModel]) -> bool:
        """Whether ``models`` are exactly what this generation serves (cards, digests included, and folders)."""
        return [(m.root, m.card) for m in self.models] == [(m.root, m.card) for m in models]


def build_generation(
    models: list[LoadedModel],
    settings: Settings,
    runner_factory: RunnerFactory | None,
    observer: BatchObserver,
) -> Generation:
    """A batcher per (direction, version) and a pool over them, not started yet.

    Raises ``ModelRepositoryError`` for a direction served by two models, or a version without the file of
    the configured precision. ``runner_factory``: ``None`` for :func:`onnx_runner_factory`.
    """
    if runner_factory is None:
        per_device = sum(len(m.card.directions) for m in models) * settings.instances_per_device
        runner_factory = onnx_runner_factory(settings, cpu_sessions=per_device * settings.devices.count("cpu"))
    owners: dict[str, str] = {}
    plans: list[tuple[LoadedModel, DirectionSpec, DirectionPlan]] = []
    for model in models:
        for spec in model.card.directions:
            owner = owners.setdefault(spec.name, model.name)
            if owner != model.name:
                raise ModelRepositoryError(f"direction {spec.name!r} is in both {owner!r} and {model.name!r}")
            model.path(spec.name, file_variant(settings.precision))  # fail now if the precision's file is missing
            batcher = Batcher(
                max_batch_size=settings.max_batch_size,
                max_batch_pixels=settings.max_batch_pixels,
                max_delay_s=settings.max_queue_delay_s,
                max_queue_size=settings.max_queue_size,
            )
            plan = DirectionPlan(
                name=spec.name,
                batcher=batcher,
                open_runner=functools.partial(runner_factory, model, spec.name),
                warmup_input=warmup_input(model.card.input),
                version=model.version,
            )
            plans.append((model, spec, plan))
    pool = WorkerPool(
        [plan for _, _, plan in plans],
        devices=settings.devices,
        instances_per_device=settings.instances_per_device,
        observer=observer,
        batch_timeout_s=settings.batch_timeout_s,
    )
    routes: dict[str, dict[str, ServedDirection]] = {}
    for model, spec, plan in plans:
        routes.setdefault(spec.name, {})[model.version] = ServedDirection(model, spec, plan.batcher, pool)
    return Generation(models, routes, pool)
