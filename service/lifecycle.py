"""Model lifecycle: the first load, reloads without a restart, and the final drain.

A reload (``POST /admin/reload``, SIGHUP, or polling with ``DCLGAN_RELOAD_POLL_S``) runs these steps, one
reload at a time:

1. scan the repository and verify every file's SHA-256 (a thread); nothing changed: done, ``unchanged``;
2. build the next :class:`~service.generation.Generation` beside the served one, open its runners and wait
   until every instance is warm (a thread; at most ``batch_timeout_s``);
3. switch: one assignment on the event loop, where every request takes its lease, so each request is
   routed either wholly to the old generation or wholly to the new one;
4. drain the old one: wait until no request holds a lease on it, then close its queues and stop its
   threads. No timeout cuts this short: a reload is not a shutdown, and every lease is already bounded
   (``body_timeout_s`` + ``request_timeout_s`` + ``batch_timeout_s``), so no request routed to the old
   versions is ever refused for the reload's sake.

A failure in step 1 or 2 (a broken ``model.json``, a tampered file, an engine that cannot open a file, a
failed warm-up, or anything unexpected) stops the half-built generation, leaves the served one untouched,
is logged and counted (``dclgan_reloads_total{result="failed"}``) and raised as ``ReloadFailed`` with the
reason. Both generations are in memory between steps 2 and 4.

The steps run in a task of their own: a caller that goes away (a client disconnecting, the poller
cancelled at shutdown) cannot abandon a half-built generation. A reload asked for while one runs is
refused (``ReloadInProgress``) but not lost: one more reload runs when the current one ends, and reads
the repository as it is then. Only :meth:`ModelLifecycle.stop` (shutdown) cuts work off.

Readiness is untouched throughout: it reads the served generation, which stays warm until the switch.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from anyio import to_thread

from service.batching import Batch
from service.errors import NotReady, ReloadFailed, ReloadInProgress, ServiceError
from service.generation import Generation, RunnerFactory, build_generation
from service.metrics import ServiceMetrics
from service.repository import LoadedModel, ModelRepositoryError, scan_repository
from service.state import AppState, Phase
from service.workers import WorkerPool

logger = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, int, int], ...] | None

# How often a retiring generation's leases are looked at: a reload's drain ends this long after its last request.
_LEASE_POLL_S = 0.02


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


@dataclass(frozen=True)
class _ReloadObserver:
    """The metrics, as a generation built by a reload sees them: its failed warm-up is the reload's failure,
    counted in ``dclgan_reloads_total{result="failed"}`` alone; counted in
    ``dclgan_instance_failures_total`` too, it would look like a failure of the served versions, whose
    labels (direction, device) it shares. Its later failures, once served, count there as any."""

    metrics: ServiceMetrics

    def batch_done(self, direction: str, device: str, batch: Batch, compute_s: float) -> None:
        self.metrics.batch_done(direction, device, batch, compute_s)

    def instance_failure(self, direction: str, device: str, kind: str) -> None:
        if kind != "warmup":  # a served generation was warm before the switch: only a candidate fails so
            self.metrics.instance_failure(direction, device, kind)


class ModelLifecycle:
    """Loads, reloads and finally stops the served models of one app.

    Args:
        state: the app's state; its ``generation`` is what this replaces.
        runner_factory: how runners are made; ``None`` for the ONNX files' engines.
    """

    def __init__(self, state: AppState, runner_factory: RunnerFactory | None) -> None:
        self.state = state
        self.runner_factory = runner_factory
        self._running: asyncio.Task[ReloadReport] | None = None  # the reload in progress
        self._again = False  # a reload was asked for while one ran: run one more after it
        self._poller: asyncio.Task[None] | None = None
        self._loaded: Fingerprint = None  # the repository's files as the first load found them (for the poller)
        # The prepare thread and the shutdown meet here: a generation built while the service shuts down
        # is stopped by whichever of the two sees the other.
        self._lock = threading.Lock()
        self._candidate: Generation | None = None  # built by a reload, not switched to yet
        self._closed = False

    def start(self) -> None:
        """Load the repository and start the first generation's pool (blocking); its threads warm up after."""
        settings, metrics = self.state.settings, self.state.metrics
        if settings.reload_poll_s:  # taken before the scan: a change while loading is seen by the first poll
            self._loaded = fingerprint(settings.models_dir)
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

    def poll_in_background(self, period_s: float) -> None:
        """Start reloading whenever a file under the repository changes (event loop; ended by :meth:`stop`)."""
        self._poller = asyncio.ensure_future(self._poll(period_s))

    async def stop(self) -> None:
        """Shutdown: refuse new work and reloads, end the poller, let queued and running work finish (up to
        ``drain_timeout_s``; nothing after a cut-off), stop every thread, a reload's half-built ones too."""
        state = self.state
        state.begin_drain()
        self._again = False
        if self._poller is not None:
            self._poller.cancel()
            (outcome,) = await asyncio.gather(self._poller, return_exceptions=True)
            if isinstance(outcome, Exception):
                logger.error("the repository poller had stopped: %r", outcome)
        with self._lock:
            self._closed = True
            candidate = self._candidate
        pools = [g.pool for g in (*self._generations(), candidate) if g is not None]
        await to_thread.run_sync(self._stop_pools, pools)
        if self._running is not None:
            # Its generation is stopped: the reload ends as soon as its thread sees that.
            await asyncio.wait({self._running}, timeout=state.drain_timeout_left())

    def _stop_pools(self, pools: list[WorkerPool]) -> None:
        for pool in pools:
            pool.stop(timeout_s=self._drain_left())

    def _drain_left(self) -> float:
        """What a shutdown still grants the workers: after a cut-off (second signal) nobody waits for the
        results, so nothing."""
        return 0 if self.state.cut_off_reason else self.state.drain_timeout_left()

    async def reload(self) -> ReloadReport:
        """Load the repository's current state beside the served one and switch to it (see the module doc).

        Raises:
            ReloadFailed: the new state cannot be served; the old one still is.
            ReloadInProgress: another reload is running; one more runs after it.
            NotReady: the service is starting or shutting down.
        """
        if self._running is not None and not self._running.done():
            self._again = True
            raise ReloadInProgress("another reload is running; one more follows it and reads the repository then")
        if self.state.draining or self.state.generation is None:
            raise NotReady("the service is starting or shutting down; nothing is reloaded")
        # Shielded: a caller that goes away does not cancel the reload, which finishes (or fails) cleanly.
        return await asyncio.shield(self._begin())

    def _begin(self) -> asyncio.Task[ReloadReport]:
        task = asyncio.ensure_future(self._reload(time.perf_counter()))
        self._running = task
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[ReloadReport]) -> None:
        """Run the reload asked for meanwhile, if any. Retrieves the outcome (``_reload`` logged it), so that a
        reload whose caller went away leaves no "exception never retrieved" behind."""
        if not task.cancelled():
            task.exception()
        if self._again and not self.state.draining:
            self._again = False
            logger.info("reload: running the reload requested during the previous one")
            self._begin()

    async def _reload(self, started: float) -> ReloadReport:
        reloads = self.state.metrics.reloads
        try:
            candidate = await to_thread.run_sync(self._prepare)
            if candidate is not None:
                self._adopt(candidate)
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

    def _adopt(self, candidate: Generation) -> None:
        """Take ``candidate`` back from the prepare thread, unless the service began shutting down meanwhile
        (then :meth:`stop`, which saw it registered, stops it)."""
        with self._lock:
            self._candidate = None
            closed = self._closed
        if closed:
            raise ReloadFailed("the service began shutting down during the reload")

    async def reload_logged(self, trigger: str) -> bool:
        """:meth:`reload` for a trigger with nobody to answer (a signal, the poller): outcomes go to the log.
        Whether a reload ran (loaded, unchanged or failed)."""
        logger.info("reload requested by %s", trigger)
        try:
            report = await self.reload()
        except ReloadFailed:
            return True  # logged by _reload()
        except ServiceError as exc:
            logger.warning("reload requested by %s not done: %s", trigger, exc)
            return False
        except Exception:  # the signal handler's task and the poller must outlive any bug in a reload
            logger.exception("reload requested by %s broke", trigger)
            return False
        if report.result == "unchanged":
            logger.info("reload: the repository is unchanged; nothing to do")
        return True

    async def _poll(self, period_s: float) -> None:
        """Reload whenever a file under the repository changes (path, size or modification time). A change is
        taken as seen only once a reload ran after it: one refused (another reload running) is tried again."""
        root = self.state.settings.models_dir
        seen = self._loaded
        while True:
            await asyncio.sleep(period_s)
            now = await to_thread.run_sync(fingerprint, root)
            if now != seen and await self.reload_logged("the repository poller"):
                seen = now

    def _prepare(self) -> Generation | None:
        """Steps 1 and 2 (blocking): the warm new generation, or ``None`` when the repository is unchanged.
        Anything unexpected is a ``ReloadFailed`` too: the served versions are untouched either way."""
        try:
            return self._build_and_warm()
        except ReloadFailed:
            raise
        except Exception as exc:
            logger.debug("the reload failed unexpectedly", exc_info=True)
            raise ReloadFailed(f"unexpected {type(exc).__name__}: {exc}") from exc

    def _build_and_warm(self) -> Generation | None:
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
        with self._lock:
            closed = self._closed
            if not closed:
                self._candidate = generation  # from now on a shutdown stops it
        if closed:  # the shutdown did not see it: stopped here, as the shutdown would (the shutdown waits for this)
            generation.pool.stop(timeout_s=self._drain_left())
            raise ReloadFailed("the service began shutting down during the reload")
        failure = generation.pool.wait_warm(settings.batch_timeout_s)
        if failure is not None:
            with self._lock:
                self._candidate = None
                closed = self._closed
            if not closed:  # else the shutdown stops it
                generation.pool.stop(timeout_s=settings.drain_timeout_s)
            raise ReloadFailed(f"the new models did not warm up: {failure}")
        return generation

    def _open(self, models: list[LoadedModel]) -> Generation:
        observer = _ReloadObserver(self.state.metrics)
        try:
            generation = build_generation(models, self.state.settings, self.runner_factory, observer)
            generation.pool.start()
        except ModelRepositoryError as exc:
            raise ReloadFailed(str(exc)) from exc
        except Exception as exc:  # an engine refusing a file: its message stays in the log
            logger.exception("opening the new models failed")
            raise ReloadFailed(f"the new models could not be opened ({type(exc).__name__}; see the log)") from exc
        return generation

    async def _retire(self, old: Generation) -> None:
        """Step 4: wait for the requests routed to ``old``, however long their own limits let them run, then
        close its queues and stop its threads. A shutdown meanwhile takes over (it stops ``old``)."""
        while old.leases and not self._closed:
            await asyncio.sleep(_LEASE_POLL_S)
        if self._closed:
            return
        # Nobody waits on ``old`` any more: its threads end as soon as their batches do (a stuck one is left
        # to its daemon thread after batch_timeout_s).
        await to_thread.run_sync(functools.partial(old.pool.stop, timeout_s=self.state.settings.batch_timeout_s))
        self.state.retiring.remove(old)
        self._watch_queues()

    def _publish(self, generation: Generation) -> None:
        """Point the per-direction gauges at ``generation`` and say what runs where (``dclgan_model_info``)."""
        metrics = self.state.metrics
        self._watch_queues()
        for name in generation.routes:
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

    def _watch_queues(self) -> None:
        """``dclgan_queue_depth`` per direction, summed over the served generation and those still draining."""
        gauge = self.state.metrics.queue_depth
        gauge.clear()
        for name in sorted({name for g in self._generations() for name in g.routes}):
            self.state.metrics.watch(gauge, functools.partial(self._depth, name), name)

    def _generations(self) -> list[Generation]:
        return [g for g in (self.state.generation, *self.state.retiring) if g is not None]

    def _depth(self, direction: str) -> int:
        return sum(s.batcher.depth() for g in self._generations() for s in g.routes.get(direction, {}).values())

    def _busy(self, device: str) -> int:
        return sum(g.pool.busy_count(device) for g in self._generations())

    def _instances(self, device: str) -> int:
        return sum(g.pool.instance_count(device) for g in self._generations())
