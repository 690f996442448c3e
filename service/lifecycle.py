"""Model lifecycle: the first load, reloads without a restart, and the final drain.

A reload (``POST /admin/reload``, SIGHUP, or polling with ``DCLGAN_RELOAD_POLL_S``) runs these steps, one
reload at a time:

1. scan the repository and verify every file's SHA-256 (a thread); nothing changed: done, ``unchanged``;
2. build the next :class:`~service.generation.Generation` beside the served one, open its runners and wait
   until every instance is warm (a thread; at most ``batch_timeout_s``);
3. switch: one assignment on the event loop, where every request takes its lease, so each request is
   routed either wholly to the old generation or wholly to the new one;
4. drain the old one: wait until no request holds a lease on it (at most ``drain_timeout_s``), then close
   its queues and stop its threads.

A failure in step 1 or 2 (a broken ``model.json``, a tampered file, an engine that cannot open a file, a
failed warm-up) stops the half-built generation, leaves the served one untouched, is logged and counted
(``dclgan_reloads_total{result="failed"}``) and raised as ``ReloadFailed`` with the reason. Both
generations are in memory between steps 2 and 4.

Readiness is untouched throughout: it reads the served generation, which stays warm until the switch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from anyio import to_thread

from service.errors import NotReady, ReloadFailed, ReloadInProgress, ServiceError
from service.generation import Generation, RunnerFactory, build_generation
from service.repository import LoadedModel, ModelRepositoryError, scan_repository
from service.state import AppState, Phase

logger = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...] | None


@dataclass(frozen=True)
class ReloadReport:
    """What a reload did: ``loaded`` a new generation or found the repository ``unchanged``; then served
    ``models`` (name -> versions, newest first), after ``seconds``."""

    result: Literal["loaded", "unchanged"]
    models: dict[str, list[str]]
    seconds: float


def served_versions(generation: Generation) -> dict[str, list[str]]:
    """Model name -> its served versions, newest (the default) first."""
    names = sorted({m.name for m in generation.models})
    return {name: [m.version for m in generation.versions(name)] for name in names}


def fingerprint(root: Path) -> Fingerprint:
    """Path, modification time and size of every file under ``root``: cheap to compare, unlike digests.
    ``None`` when the folder cannot be read."""
    try:
        return tuple(
            sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*") if p.is_file())
        )
    except OSError:
        return None


class ModelLifecycle:
    """Loads, reloads and finally stops the served models of one app.

    Args:
        state: the app's state; its ``generation`` is what this replaces.
        runner_factory: how runners are made; ``None`` for the ONNX files' engines.
    """

    def __init__(self, state: AppState, runner_factory: RunnerFactory | None) -> None:
        self.state = state
        self.runner_factory = runner_factory
        self._reloading = False

    def start(self) -> None:
        """Load the repository and start the first generation's pool (blocking); its threads warm up after."""
        settings, metrics = self.state.settings, self.state.metrics
        models = scan_repository(settings.models_dir)
        if not models:
            raise ModelRepositoryError(f"no model in {settings.models_dir.resolve()} (expected <name>/model.json)")
        generation = build_generation(models, settings, self.runner_factory, metrics)
        generation.pool.start()
        self.state.generation = generation
        for device in settings.devices:
            metrics.watch(metrics.busy_instances, functools.partial(self._busy, device), device)
            metrics.watch(metrics.instances, functools.partial(self._instances, device), device)
        metrics.watch(metrics.inflight_requests, lambda: self.state.inflight)
        metrics.watch(metrics.request_memory_bytes, lambda: self.state.budget.used)
        metrics.watch(metrics.ready, lambda: float(self.state.phase is Phase.READY))
        self._publish(generation)

    def stop(self) -> None:
        """Drain (blocking): refuse new work, let queued and running work finish (bounded), stop the threads."""
        state = self.state
        state.begin_drain()
        for generation in self._generations():
            # After a cut-off (second signal) nobody waits for the results: do not wait for the workers either.
            generation.pool.stop(timeout_s=0 if state.cut_off_reason else state.drain_timeout_left())

    async def reload(self) -> ReloadReport:
        """Load the repository's current state beside the served one and switch to it (see the module doc).

        Raises:
            ReloadFailed: the new state cannot be served; the old one still is.
            ReloadInProgress: another reload is running.
            NotReady: the service is starting or shutting down.
        """
        if self._reloading:
            raise ReloadInProgress("another reload is running; retry when it is done")
        if self.state.draining or self.state.generation is None:
            raise NotReady("the service is starting or shutting down; nothing is reloaded")
        self._reloading = True
        started = time.perf_counter()
        try:
            return await self._reload(started)
        finally:
            self._reloading = False

    async def _reload(self, started: float) -> ReloadReport:
        reloads = self.state.metrics.reloads
        try:
            candidate = await to_thread.run_sync(self._prepare)
            if candidate is not None and self.state.draining:
                await to_thread.run_sync(functools.partial(candidate.pool.stop, timeout_s=0))
                raise ReloadFailed("the service began shutting down during the reload")
        except ReloadFailed as exc:
            reloads.labels("failed").inc()
            logger.error("reload failed, the versions served before keep serving: %s", exc)
            raise
        old = self.state.generation
        assert old is not None  # reload() checked
        if candidate is None:
            reloads.labels("unchanged").inc()
            return ReloadReport("unchanged", served_versions(old), time.perf_counter() - started)
        self.state.generation = candidate  # the switch: on the loop, so no lease is taken half-way
        self.state.retiring.append(old)
        self._publish(candidate)
        reloads.labels("loaded").inc()
        logger.info("reload: switched to the new versions; the previous ones drain")
        await self._retire(old)
        return ReloadReport("loaded", served_versions(candidate), time.perf_counter() - started)

    async def reload_logged(self, trigger: str) -> None:
        """:meth:`reload` for a trigger with nobody to answer (a signal, the poller): outcomes go to the log."""
        logger.info("reload requested by %s", trigger)
        try:
            report = await self.reload()
        except ReloadFailed:
            return  # logged by reload()
        except ServiceError as exc:
            logger.warning("reload requested by %s not done: %s", trigger, exc)
            return
        if report.result == "unchanged":
            logger.info("reload: the repository is unchanged; nothing to do")

    async def poll(self, period_s: float) -> None:
        """Reload whenever a file under the repository changes (path, size or modification time)."""
        root = self.state.settings.models_dir
        seen = await to_thread.run_sync(fingerprint, root)
        while True:
            await asyncio.sleep(period_s)
            now = await to_thread.run_sync(fingerprint, root)
            if now != seen:
                seen = now
                await self.reload_logged("the repository poller")

    def _prepare(self) -> Generation | None:
        """Steps 1 and 2 (blocking): the warm new generation, or ``None`` when the repository is unchanged."""
        settings = self.state.settings
        try:
            models = scan_repository(settings.models_dir)
        except (ModelRepositoryError, OSError) as exc:  # OSError: a folder that cannot be listed
            raise ReloadFailed(str(exc)) from exc
        if not models:
            raise ReloadFailed(f"no model in {settings.models_dir.resolve()}")
        served = self.state.generation
        if served is not None and served.same_models(models):
            return None
        generation = self._open(models)
        failure = generation.pool.wait_warm(settings.batch_timeout_s)
        if failure is not None:
            generation.pool.stop(timeout_s=settings.drain_timeout_s)
            raise ReloadFailed(f"the new models did not warm up: {failure}")
        return generation

    def _open(self, models: list[LoadedModel]) -> Generation:
        try:
            generation = build_generation(models, self.state.settings, self.runner_factory, self.state.metrics)
            generation.pool.start()
        except ModelRepositoryError as exc:
            raise ReloadFailed(str(exc)) from exc
        except Exception as exc:  # an engine refusing a file: its message stays in the log
            logger.exception("opening the new models failed")
            raise ReloadFailed(f"the new models could not be opened ({type(exc).__name__}; see the log)") from exc
        return generation

    async def _retire(self, old: Generation) -> None:
        """Step 4: wait for the requests routed to ``old``, then close its queues and stop its threads."""
        settings = self.state.settings
        deadline = time.monotonic() + settings.drain_timeout_s
        while old.leases and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if old.leases:
            logger.warning("%d requests still on the previous versions after the drain timeout", old.leases)
        await to_thread.run_sync(functools.partial(old.pool.stop, timeout_s=max(0.0, deadline - time.monotonic())))
        self.state.retiring.remove(old)

    def _publish(self, generation: Generation) -> None:
        """Point the per-direction gauges at ``generation`` and say what runs where (``dclgan_model_info``)."""
        metrics = self.state.metrics
        metrics.queue_depth.clear()
        for name, versions in generation.routes.items():
            queues = [served.batcher for served in versions.values()]
            metrics.watch(metrics.queue_depth, lambda qs=queues: sum(q.depth() for q in qs), name)
            newest = generation.newest(name)
            logger.info(
                "serving %s (model %s, versions %s; default %s) at /translate/%s",
                name,
                newest.model.name,
                ", ".join(m.version for m in generation.versions(newest.model.name)),
                newest.model.version,
                name,
            )
        metrics.model.clear()
        for inst in generation.pool.instances:
            runner, plan = inst.runner, inst.direction
            model = generation.routes[plan.name][plan.version].model
            psnr = "" if runner.psnr_db is None else f"{runner.psnr_db:.1f}"
            metrics.model.labels(model.name, plan.version, plan.name, inst.device).info(
                {"provider": runner.provider, "engine": runner.engine, "precision": runner.precision, "psnr_db": psnr}
            )

    def _generations(self) -> list[Generation]:
        return [g for g in (self.state.generation, *self.state.retiring) if g is not None]

    def _busy(self, device: str) -> int:
        return sum(g.pool.busy_count(device) for g in self._generations())

    def _instances(self, device: str) -> int:
        return sum(g.pool.instance_count(device) for g in self._generations())

