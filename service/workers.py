"""The worker pool: N model instances per device, each one runner (one onnxruntime session) and one thread.

Like Triton's ``instance_group``: every direction gets ``instances_per_device`` instances on every
configured device, and all instances of a direction pull batches from that direction's
:class:`~service.batching.Batcher`. One session per thread because a CUDA session has a single
compute stream; on the CPU it keeps each instance's thread pool to itself.

Each thread first warms its runner up (the first call pays for memory planning, cuDNN algorithm
search, ...), then loops on ``next_batch``. The pool is ready once every instance is warm. Inference
therefore never runs on the event loop. This module knows runners and batchers, not HTTP or the
model repository: the app wires those in.

Workers are supervised, so that a sick one is seen rather than silently swallowing its direction:

* a runner error fails that batch's requests (500) and is counted; the instance carries on;
* an exception escaping the worker loop itself is logged, fails the batch it held (500) and marks
  the instance *failed* for good; a direction left with no live instance marks the pool failed
  (liveness fails, the process exits so that it is restarted);
* a watchdog thread fails the requests of a batch running longer than ``batch_timeout_s`` (504)
  and marks its instance *stuck* (unhealthy) until its runner returns. A direction with no healthy
  instance makes readiness 503.

Every failure is counted by the observer (``dclgan_instance_failures_total``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.batching import Batch, Batcher, InferenceResult, WorkItem
from service.errors import BatchTimedOut, InferenceFailed
from service.runtime import ProbeTimes, Runner

logger = logging.getLogger(__name__)


class DeviceRunner(Runner, Protocol):
    """A runner that says where and how it runs: ``provider`` is what the engine really gave it, ``precision``
    what it computes in, ``psnr_db`` that precision's PSNR against float32 measured at start (None: not
    reduced, nothing to measure), ``probe_ms`` what engine ``auto`` measured to choose it (see
    :data:`service.runtime.ProbeTimes`; None where nothing was measured)."""

    provider: str
    device: str
    engine: str
    precision: str
    psnr_db: float | None
    probe_ms: ProbeTimes | None


class BatchObserver(Protocol):
    """Told about every executed batch and every failure (the metrics implement it)."""

    def batch_done(self, direction: str, device: str, batch: Batch, compute_s: float) -> None: ...

    def instance_failure(self, direction: str, device: str, kind: str) -> None:
        """``kind``: ``warmup``, ``inference_error``, ``timeout`` or ``crash``."""


@dataclass(frozen=True)
class DirectionPlan:
    """What the pool needs to serve one direction.

    Attributes:
        name: the direction, e.g. ``horse2zebra``.
        batcher: its queue.
        version: the model version it serves (a pool may hold several versions of a direction).
        open_runner: creates a runner on a device (``"cpu"``, ``"cuda:0"``); may raise, e.g.
            ``ProviderUnavailable`` when a required GPU is missing.
        warmup_input: (N, 3, H, W) float32 batch run once by every instance before it is ready.
    """

    name: str
    batcher: Batcher
    open_runner: Callable[[str], DeviceRunner]
    warmup_input: np.ndarray
    version: str = ""


@dataclass
class Instance:
    """One runner plus the thread that feeds it, and what the supervisor knows of it.

    Attributes:
        batch: the batch running now (``None`` when idle); ``batch_started`` its ``time.monotonic``.
        failed: why the instance is gone for good (its thread ended), else ``None``.
        stuck: its batch ran past the limit and the runner has not returned yet.
        lock: guards ``batch`` and ``stuck`` together between the worker and the watchdog: unguarded, a
            batch that returns just as the watchdog flags it left an idle instance stuck for good.
    """

    direction: DirectionPlan
    device: str
    index: int
    runner: DeviceRunner
    warm: threading.Event = field(default_factory=threading.Event)
    batch: Batch | None = None
    batch_started: float = 0.0
    failed: str | None = None
    stuck: bool = False
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        version = f":{self.direction.version}" if self.direction.version else ""
        return f"{self.direction.name}{version}@{self.device}#{self.index}"

    @property
    def busy(self) -> bool:
        return self.batch is not None

    @property
    def healthy(self) -> bool:
        return self.warm.is_set() and self.failed is None and not self.stuck


def _settle(future: Future[InferenceResult], result: InferenceResult | None, error: Exception | None) -> None:
    """Resolve a running item once: the watchdog may already have failed it (then this is a no-op)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]
    except InvalidStateError:
        pass


def _fail_all(items: list[WorkItem], error: Exception) -> None:
    for item in items:
        _settle(item.future, None, error)


class WorkerPool:
    """Instances for every (direction, device, index), started and stopped together, and supervised.

    Args:
        plans: one per direction.
        devices: e.g. ``["cpu"]`` or ``["cuda:0", "cuda:1"]``.
        instances_per_device: instances of each direction on each device.
        observer: told about every executed batch and every failure.
        batch_timeout_s: a batch running longer fails its requests and marks its instance stuck.
    """

    def __init__(
        self,
        plans: Sequence[DirectionPlan],
        *,
        devices: Sequence[str],
        instances_per_device: int,
        observer: BatchObserver | None = None,
        batch_timeout_s: float = 120.0,
    ) -> None:
        self.plans = list(plans)
        self.devices = list(devices)
        self.instances_per_device = instances_per_device
        self.observer = observer
        self.batch_timeout_s = batch_timeout_s
        self.instances: list[Instance] = []
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._warm_count = 0
        self._started_at = 0.0
        self._stopping = threading.Event()
        self._settled = threading.Event()  # every instance warm, the pool failed, or stopped
        self._watchdog_thread: threading.Thread | None = None

    def start(self) -> None:
        """Open every runner (fails fast, e.g. on a missing GPU), then start one thread per instance
        and the watchdog.

        Runners are all opened before any thread starts, so a failure leaves nothing running.
        Warm-up happens in the threads; see :attr:`warm`.
        """
        instances = [
            Instance(direction=plan, device=device, index=i, runner=plan.open_runner(device))
            for plan in self.plans
            for device in self.devices
            for i in range(self.instances_per_device)
        ]
        self.instances = instances
        self._started_at = time.perf_counter()
        for inst in instances:
            # Daemon: a batch stuck in a driver call must not keep the process alive after the drain timeout.
            inst.thread = threading.Thread(
                target=self._serve, args=(inst,), name=f"dclgan-{inst.name}", daemon=True
            )
            inst.thread.start()
        self._watchdog_thread = threading.Thread(target=self._watchdog, name="dclgan-watchdog", daemon=True)
        self._watchdog_thread.start()

    @property
    def warm(self) -> bool:
        """Every instance has run its warm-up batch."""
        return bool(self.instances) and all(inst.warm.is_set() for inst in self.instances)

    def wait_warm(self, timeout_s: float) -> str | None:
        """Block until every instance is warm; why it will not be (failed, too slow, stopped), else ``None``."""
        if not self._settled.wait(timeout_s):
            return f"the model instances did not warm up within {timeout_s:g} s"
        if self.failure is None and not self.warm:
            return "the pool was stopped before every instance was warm"
        return self.failure

    def serves(self, direction: str, version: str | None = None) -> bool:
        """``direction`` (of ``version``, or of any version) has at least one healthy instance."""
        return any(
            inst.healthy
            for inst in self.instances
            if inst.direction.name == direction and version in (None, inst.direction.version)
        )

    def busy_count(self, device: str) -> int:
        return sum(inst.busy for inst in self.instances if inst.device == device)

    def instance_count(self, device: str) -> int:
        return sum(inst.device == device for inst in self.instances)

    def stop(self, *, timeout_s: float) -> bool:
        """Close the batchers and wait up to ``timeout_s`` for the queued and running work to finish.

        Work still queued after the timeout is failed with ``NotReady``; a batch still running is
        abandoned to its daemon thread. Returns whether everything finished in time.
        """
        for plan in self.plans:
            plan.batcher.close()
        self._settled.set()  # a wait_warm() in progress has its answer: stopped
        deadline = time.monotonic() + timeout_s
        for inst in self.instances:
            if inst.thread is not None:
                inst.thread.join(max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        if self._watchdog_thread is not None:
            self._watchdog_thread.join()  # it wakes on _stopping at once: after stop() no thread of the pool polls
        stragglers = [
            inst.name for inst in self.instances if inst.thread is not None and inst.thread.is_alive()
        ]
        if stragglers:
            dropped = sum(plan.batcher.cancel_pending("the drain timed out") for plan in self.plans)
            logger.warning(
                "drain timed out after %.1f s: %d queued images dropped, still running: %s",
                timeout_s,
                dropped,
                ", ".join(stragglers),
            )
        return not stragglers

    def _serve(self, inst: Instance) -> None:
        """The instance's thread: warm up, then run batches until the batcher closes. Nothing escapes."""
        try:
            if not self._warm_up(inst):
                return
            batcher = inst.direction.batcher
            while (batch := batcher.next_batch()) is not None:
                self._run(inst, batch)
        except BaseException:
            logger.exception("worker %s died; the instance is out of service", inst.name)
            self._fail_instance(inst, "crash", f"the worker of {inst.name} died")

    def _fail_instance(self, inst: Instance, kind: str, reason: str) -> None:
        """Mark ``inst`` failed for good, fail the batch it held, and the pool if its direction is left
        with no live instance."""
        batch, inst.batch = inst.batch, None
        inst.failed = reason
        if batch is not None:
            _fail_all(batch.items, InferenceFailed("the model instance running this image failed"))
        self._notify_failure(inst, kind)
        plan = inst.direction
        if all(other.failed is not None for other in self.instances if other.direction is plan):
            self._record_failure(f"direction {plan.name} has no live instance: {reason}")
            # Nobody will ever take these: answer them now (503) rather than at their deadlines.
            plan.batcher.close()
            plan.batcher.cancel_pending(f"direction {plan.name} has no working model instance")

    def _record_failure(self, reason: str) -> None:
        """The pool failed for good; the first reason is kept."""
        with self._lock:
            self.failure = self.failure or reason
        self._settled.set()

    def _notify_failure(self, inst: Instance, kind: str) -> None:
        if self.observer is not None:
            try:
                self.observer.instance_failure(inst.direction.name, inst.device, kind)
            except Exception:
                logger.exception("failure observer failed on %s", inst.name)

    def _warm_up(self, inst: Instance) -> bool:
        try:
            inst.runner.run(inst.direction.warmup_input)
        except Exception:
            logger.exception("warm-up of %s failed", inst.name)
            inst.failed = "warm-up failed"
            self._notify_failure(inst, "warmup")
            self._record_failure(f"warm-up of {inst.name} failed")
            return False
        inst.warm.set()
        with self._lock:
            self._warm_count += 1
            last = self._warm_count == len(self.instances)
        if last:
            self._settled.set()
            logger.info(
                "all %d instances warm after %.2f s", self._warm_count, time.perf_counter() - self._started_at
            )
        return True

    def _run(self, inst: Instance, batch: Batch) -> None:
        """Run one batch and hand each item exactly its own output (or the batch's error)."""
        count = len(batch.items)
        with inst.lock:
            inst.batch_started = time.monotonic()
            inst.batch = batch
        start = time.perf_counter()
        try:
            outputs = inst.runner.run(batch.inputs())
            if len(outputs) != count:
                raise RuntimeError(f"the runner returned {len(outputs)} outputs for {count} inputs")
        except Exception:
            self._batch_over(inst)
            logger.exception("inference on %s failed for a batch of %d", inst.name, count)
            self._notify_failure(inst, "inference_error")
            _fail_all(batch.items, InferenceFailed(f"inference failed on {inst.name}"))
            return
        # Anything else (a BaseException) escapes with inst.batch still set, for _serve to fail it.
        self._batch_over(inst)
        compute_s = time.perf_counter() - start
        # Observe before resolving: a client that reads /metrics right after its response must see its batch.
        if self.observer is not None:
            try:
                self.observer.batch_done(inst.direction.name, inst.device, batch, compute_s)
            except Exception:  # a metrics bug must never strand the batch's requests
                logger.exception("batch observer failed on %s", inst.name)
        for item, output in zip(batch.items, outputs, strict=True):
            queue_s = batch.started_at - item.enqueued_at
            _settle(
                item.future,
                InferenceResult(output, queue_s=queue_s, compute_s=compute_s, batch_size=count),
                None,
            )

    @staticmethod
    def _batch_over(inst: Instance) -> None:
        with inst.lock:
            inst.batch, was_stuck, inst.stuck = None, inst.stuck, False
        if was_stuck:
            ran_s = time.monotonic() - inst.batch_started
            logger.warning("%s returned after %.1f s and serves again", inst.name, ran_s)

    def _watchdog(self) -> None:
        """Fail batches that run past ``batch_timeout_s`` and mark their instances stuck."""
        period = min(1.0, self.batch_timeout_s / 4)
        while not self._stopping.wait(period):
            now = time.monotonic()
            for inst in self.instances:
                with inst.lock:  # flag only the batch that is still running (see Instance.lock)
                    batch = inst.batch
                    if batch is None or inst.stuck or now - inst.batch_started <= self.batch_timeout_s:
                        continue
                    inst.stuck = True
                logger.error(
                    "%s: a batch of %d has run for %.1f s, over the %.1f s limit; its requests fail and the "
                    "instance is unhealthy until it returns",
                    inst.name,
                    len(batch.items),
                    now - inst.batch_started,
                    self.batch_timeout_s,
                )
                self._notify_failure(inst, "timeout")
                _fail_all(batch.items, BatchTimedOut(f"the batch ran longer than {self.batch_timeout_s:g} s"))
