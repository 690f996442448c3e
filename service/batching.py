"""Dynamic batching for one direction: a thread-safe bounded queue and its one scheduler.

The event loop calls :meth:`Batcher.submit`, which never blocks: it returns a
``concurrent.futures.Future`` or raises ``QueueFull``. Free worker instances call
:meth:`Batcher.next_batch`, which returns up to ``max_batch_size`` queued images of *one shape*
(oldest first), waiting at most ``max_delay_s`` after the oldest one arrived for more to come.

One scheduler per direction, as Triton's dynamic batcher: batches are formed one at a time, under a
lock, by whichever free instance holds it, and handed to that instance; other free instances wait for
the lock, not for items. Busy instances take no part. So while one batch waits for company, no other
instance takes the items it is waiting for: several instances never split a batch (with a per-worker
batch formation, two idle instances and a queue delay halved every batch). A scheduler thread
handing batches over would do the same with one more thread and a hand-off per batch.
With ``max_delay_s == 0`` (the default) it batches whatever is already queued and never waits: on a
compute-bound CPU, waiting for company costs more than batching gains. ``max_batch_pixels`` caps
N x H x W, so that large images batch less (an image over the cap still runs, alone): runtime
memory grows with the largest batch ever run, and onnxruntime's arena does not give it back.

Each item's future goes through the standard ``concurrent.futures`` state machine, which is what
makes cancellation safe across threads: a client that disconnects cancels its future, and
:meth:`next_batch` skips it (``set_running_or_notify_cancel`` is false), so it is never computed;
once an item is running, ``cancel()`` fails and the result is simply discarded. An item still queued
at its deadline is failed with ``DeadlineExceeded`` without being computed.

This module owns no threads and knows nothing about onnxruntime or HTTP.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, NotReady, QueueFull

Clock = Callable[[], float]


@dataclass(frozen=True)
class InferenceResult:
    """What a request's future resolves to.

    Attributes:
        output: (3, H, W) float32, the network's output for exactly this item's input.
        queue_s: time from submission to the start of its batch.
        compute_s: duration of the batch's inference call.
        batch_size: how many images shared that call.
    """

    output: np.ndarray
    queue_s: float
    compute_s: float
    batch_size: int


@dataclass
class WorkItem:
    """One queued image: (3, H, W) float32 input, its deadline (clock seconds) and its future."""

    array: np.ndarray
    deadline: float
    enqueued_at: float
    future: Future[InferenceResult] = field(default_factory=Future)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)


@dataclass(frozen=True)
class Batch:
    """Items of one shape whose futures are already RUNNING (so they can no longer be cancelled)."""

    items: list[WorkItem]
    started_at: float

    def inputs(self) -> np.ndarray:
        """(N, 3, H, W) float32, in item order."""
        return np.stack([item.array for item in self.items])


class Batcher:
    """A bounded FIFO of :class:`WorkItem` for one direction, shared by that direction's workers.

    Args:
        max_batch_size: most items per batch.
        max_batch_pixels: most pixels (N x H x W) per batch; ``None`` for no cap.
        max_delay_s: how long a partial batch may wait, counted from its oldest item's arrival.
        max_queue_size: most queued (not yet running) items; one more raises ``QueueFull``.
        clock: monotonic time source (seconds), injectable for tests.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        max_batch_pixels: int | None = None,
        max_delay_s: float = 0.0,
        max_queue_size: int,
        clock: Clock = time.monotonic,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_size must be >= 1 and max_delay_s >= 0")
        self.max_batch_size = max_batch_size
        self.max_batch_pixels = max_batch_pixels
        self.max_delay_s = max_delay_s
        self.max_queue_size = max_queue_size
        self._clock = clock
        self._queue: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._forming = threading.Lock()  # the scheduler: one batch is formed at a time
        self._closed = False

    def ensure_room(self) -> None:
        """Raise ``QueueFull`` now if a submission would be refused: lets a caller reject an overload
        before paying for decoding the image (``submit`` still checks, atomically)."""
        with self._cond:
            self._check_room()

    def _check_room(self) -> None:
        if self._closed:
            raise NotReady("the service is shutting down")
        if len(self._queue) >= self.max_queue_size:
            raise QueueFull(f"the queue is full ({self.max_queue_size} images waiting); retry later")

    def submit(self, array: np.ndarray, *, timeout_s: float) -> Future[InferenceResult]:
        """Queue one (3, H, W) input; never blocks.

        Raises:
            QueueFull: ``max_queue_size`` items are already waiting.
            NotReady: the batcher is closed (the service is draining).
        """
        now = self._clock()
        item = WorkItem(array=array, deadline=now + timeout_s, enqueued_at=now)
        with self._cond:
            self._check_room()
            self._queue.append(item)
            # notify_all: a worker waiting for company for another shape must not swallow the wake-up.
            self._cond.notify_all()
        # A weak reference: the item holds its future, which holds this callback; a strong one would make a
        # cycle that keeps every input array alive until the garbage collector runs.
        item.future.add_done_callback(functools.partial(self._forget, weakref.ref(item)))
        return item.future

    def _forget(self, ref: weakref.ref[WorkItem], future: Future[InferenceResult]) -> None:
        """Take a cancelled item (its client left, or its deadline passed) off the queue at once: left there
        until a worker looked, it held a queue place and its decoded image, which the request's memory
        reservation no longer counts, for as long as every instance was busy."""
        item = ref()
        if item is None or not future.cancelled():
            return
        with self._cond, contextlib.suppress(ValueError):  # already taken by a worker, or never queued
            self._queue.remove(item)

    def depth(self) -> int:
        """Items waiting (not yet running)."""
        with self._cond:
            return len(self._queue)

    def close(self) -> None:
        """Refuse new submissions; workers still get every queued item, then ``None``."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def cancel_pending(self, reason: str) -> int:
        """Fail every queued item with ``NotReady(reason)`` (used when a drain runs out of time)."""
        with self._cond:
            items = list(self._queue)
            self._queue.clear()
        for item in items:
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(NotReady(reason))
        return len(items)

    def next_batch(self, timeout_s: float | None = None) -> Batch | None:
        """Block until a batch is ready and return it; ``None`` once closed and empty, or on timeout.

        The batch holds the oldest live item and every later item of the same shape, up to
        ``max_batch_size`` (fewer for large images, see ``max_batch_pixels``); other shapes keep
        their place in the queue. Cancelled items are dropped,
        expired ones fail with ``DeadlineExceeded``; neither is computed.
        """
        give_up = None if timeout_s is None else self._clock() + timeout_s
        if not self._forming.acquire(timeout=-1 if timeout_s is None else timeout_s):
            return None
        try:
            while True:
                items = self._collect(give_up)
                if items is None:
                    return None
                batch = self._start(items)
                if batch is not None:
                    return batch
        finally:
            self._forming.release()

    def _collect(self, give_up: float | None) -> list[WorkItem] | None:
        """Take the next batch's items off the queue; ``None`` if closed and empty or past ``give_up``."""
        with self._cond:
            items = self._take_same_shape([])
            while not items:
                if self._closed or not self._wait(give_up):
                    return None
                items = self._take_same_shape([])
            # Triton's max_queue_delay: wait for company only while the batch is partial and its oldest
            # item is younger than the delay.
            wait_until = items[0].enqueued_at + self.max_delay_s
            capacity = self._capacity(items[0].shape)
            while len(items) < capacity and not self._closed and self._clock() < wait_until:
                self._cond.wait(wait_until - self._clock())
                items = self._take_same_shape(items)
            return items

    def _wait(self, give_up: float | None) -> bool:
        """Wait for a notification; false once ``give_up`` has passed."""
        if give_up is None:
            self._cond.wait()
            return True
        remaining = give_up - self._clock()
        if remaining <= 0:
            return False
        self._cond.wait(remaining)
        return True

    def _take_same_shape(self, items: list[WorkItem]) -> list[WorkItem]:
        """Move queued items matching ``items``' shape (or the oldest live item's) into ``items``.

        Called with the lock held. Items cancelled while queued are discarded here.
        """
        shape = items[0].shape if items else None
        kept: deque[WorkItem] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.cancelled():
                continue
            if shape is None or (item.shape == shape and len(items) < self._capacity(shape)):
                shape = item.shape
                items.append(item)
            else:
                kept.append(item)
        self._queue = kept
        return items

    def _capacity(self, shape: tuple[int, ...]) -> int:
        """How many items of ``shape`` (C, H, W) one batch may hold; at least one."""
        if self.max_batch_pixels is None:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, self.max_batch_pixels // (shape[-2] * shape[-1])))

    def _start(self, items: list[WorkItem]) -> Batch | None:
        """Mark live items RUNNING and fail expired ones; ``None`` if none is left to compute.

        Runs outside the lock: failing a future runs its callbacks (which wake the event loop).
        """
        now = self._clock()
        live = []
        for item in items:
            if not item.future.set_running_or_notify_cancel():
                continue  # cancelled while the batch waited for company
            if now > item.deadline:
                waited = now - item.enqueued_at
                item.future.set_exception(
                    DeadlineExceeded(f"still queued after {waited:.3f} s, past its deadline")
                )
                continue
            live.append(item)
        return Batch(items=live, started_at=now) if live else None
