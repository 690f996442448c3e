"""The worker pool: N model instances per device, each one runner (one onnxruntime session) and one thread.

Like Triton's ``instance_group``: every direction gets ``instances_per_device`` instances on every
configured device, and all instances of a direction pull batches from that direction's
:class:`~service.batching.Batcher`. One session per thread because a CUDA session has a single
compute stream; on the CPU it keeps each instance's thread pool to itself.

Each thread first warms its runner up (the first call pays for memory planning, cuDNN algorithm
search, ...), then loops on ``next_batch``. The pool is ready once every instance is warm. Inference
therefore never runs on the event loop. This module knows runners and batchers, not HTTP or the
model repository: the app wires those in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.batching import Batch, Batcher, InferenceResult
from service.errors import InferenceFailed
from service.runtime import Runner

logger = logging.getLogger(__name__)


class DeviceRunner(Runner, Protocol):
    """A runner that says where it runs: ``provider`` is what onnxruntime really gave it."""

    provider: str
    device: str


class BatchObserver(Protocol):
    """Told about every executed batch (the metrics implement it)."""

    def batch_done(self, direction: str, device: str, batch: Batch, compute_s: float) -> None: ...


@dataclass(frozen=True)
class DirectionPlan:
    """What the pool needs to serve one direction.

    Attributes:
        name: the direction, e.g. ``horse2zebra``.
        batcher: its queue.
        open_runner: creates a runner on a device (``"cpu"``, ``"cuda:0"``); may raise, e.g.
            ``ProviderUnavailable`` when a required GPU is missing.
        warmup_input: (N, 3, H, W) float32 batch run once by every instance before it is ready.
    """

    name: str
    batcher: Batcher
    open_runner: Callable[[str], DeviceRunner]
    warmup_input: np.ndarray


@dataclass
class Instance:
    """One runner plus the thread that feeds it."""

    direction: DirectionPlan
    device: str
    index: int
    runner: DeviceRunner
    warm: threading.Event = field(default_factory=threading.Event)
    busy: bool = False
    thread: threading.Thread | None = None

    @property
    def name(self) -> str:
        return f"{self.direction.name}@{self.device}#{self.index}"


class WorkerPool:
    """Instances for every (direction, device, index), started and stopped together.

    Args:
        plans: one per direction.
        devices: e.g. ``["cpu"]`` or ``["cuda:0", "cuda:1"]``.
        instances_per_device: instances of each direction on each device.
        observer: told about every executed batch.
    """

    def __init__(
        self,
        plans: Sequence[DirectionPlan],
        *,
        devices: Sequence[str],
        instances_per_device: int,
        observer: BatchObserver | None = None,
    ) -> None:
        self.plans = list(plans)
        self.devices = list(devices)
        self.instances_per_device = instances_per_device
        self.observer = observer
        self.instances: list[Instance] = []
        self.failure: str | None = None
        self._lock = threading.Lock()
        self._warm_count = 0
        self._started_at = 0.0

    def start(self) -> None:
        """Open every runner (fails fast, e.g. on a missing GPU), then start one thread per instance.

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

    @property
    def warm(self) -> bool:
        """Every instance has run its warm-up batch."""
        return bool(self.instances) and all(inst.warm.is_set() for inst in self.instances)

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
        deadline = time.monotonic() + timeout_s
        for inst in self.instances:
            if inst.thread is not None:
                inst.thread.join(max(0.0, deadline - time.monotonic()))
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
        if not self._warm_up(inst):
            return
        batcher = inst.direction.batcher
        while (batch := batcher.next_batch()) is not None:
            self._run(inst, batch)

    def _warm_up(self, inst: Instance) -> bool:
        try:
            inst.runner.run(inst.direction.warmup_input)
        except Exception as exc:
            logger.exception("warm-up of %s failed", inst.name)
            with self._lock:
                self.failure = self.failure or f"warm-up of {inst.name} failed: {exc}"
            return False
        inst.warm.set()
        with self._lock:
            self._warm_count += 1
            last = self._warm_count == len(self.instances)
        if last:
            logger.info(
                "all %d instances warm after %.2f s", self._warm_count, time.perf_counter() - self._started_at
            )
        return True

    def _run(self, inst: Instance, batch: Batch) -> None:
        """Run one batch and hand each item exactly its own output (or the batch's error)."""
        count = len(batch.items)
        inst.busy = True
        start = time.perf_counter()
        try:
            outputs = inst.runner.run(batch.inputs())
            if len(outputs) != count:
                raise RuntimeError(f"the runner returned {len(outputs)} outputs for {count} inputs")
        except Exception as exc:
            logger.exception("inference on %s failed for a batch of %d", inst.name, count)
            for item in batch.items:
                item.future.set_exception(InferenceFailed(f"inference failed on {inst.name}: {exc}"))
            return
        finally:
            inst.busy = False
        compute_s = time.perf_counter() - start
        # Observe before resolving: a client that reads /metrics right after its response must see its batch.
        if self.observer is not None:
            try:
                self.observer.batch_done(inst.direction.name, inst.device, batch, compute_s)
            except Exception:  # a metrics bug must never strand the batch's requests
                logger.exception("batch observer failed on %s", inst.name)
        for item, output in zip(batch.items, outputs, strict=True):
            queue_s = batch.started_at - item.enqueued_at
            item.future.set_result(
                InferenceResult(output, queue_s=queue_s, compute_s=compute_s, batch_size=count)
            )
