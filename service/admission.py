"""The memory budget of requests in flight: request bodies and decoded images share one ceiling.

Counting requests is not enough to bound memory: a 48 KB PNG may declare 5000x5000 pixels, and a
10 MiB body is 10 MiB whatever its content. So each request reserves what it will hold before it
holds it: its body (declared length, or the upload cap when chunked) before reading it, and each
image's decoding estimate (:meth:`service.imaging.Probe.decode_bytes`, from the header alone) before
decoding it. A reservation that does not fit is refused at once (503, ``Retry-After``) rather than
queued: waiting reservations would hold bodies while waiting for image memory, and a refusal is
what overload already answers everywhere else in the service. One that could never fit is 413.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import Overloaded


class MemoryBudget:
    """A byte counter with a ceiling; thread-safe, never blocks.

    Args:
        capacity: the ceiling in bytes (``max_request_memory_bytes``).
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._used = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._used

    @contextmanager
    def hold(self, nbytes: int, too_large: Exception) -> Iterator[None]:
        """Reserve ``nbytes`` for the block.

        Raises:
            too_large: ``nbytes`` exceeds the whole budget, so no retry can succeed.
            Overloaded: the budget lacks ``nbytes`` now (503 with ``Retry-After``).
        """
        self.reserve(nbytes, too_large)
        try:
            yield
        finally:
            self.release(nbytes)

    def reserve(self, nbytes: int, too_large: Exception) -> None:
        """Take ``nbytes`` until :meth:`release`; raises as :meth:`hold`."""
        if nbytes > self.capacity:
            raise too_large
        with self._lock:
            if self._used + nbytes > self.capacity:
                raise Overloaded("the server is busy with other large requests; retry later")
            self._used += nbytes

    def count(self, nbytes: int) -> None:
        """Take ``nbytes`` whether or not they fit, until :meth:`release`: for memory already held that new
        work must wait for (a response being sent), where a refusal would free nothing."""
        with self._lock:
            self._used += nbytes

    def release(self, nbytes: int) -> None:
        """Give back what :meth:`reserve` took."""
        with self._lock:
            self._used -= nbytes


class Abandoned(Exception):
    """The coroutine a :class:`Claim` was made for has gone; a pool thread stops before touching the image."""


class Claim:
    """One image's reservation, made inside the pool thread that decodes it and released once the request's
    coroutine and every pool thread working on the image (decoding, then encoding) are done with it.

    Reserving in the thread saves the event loop a second hand-off per image (reading the header, then
    decoding). But a cancelled coroutine (its client left) does not wait for its threads (anyio's
    ``run_sync`` is interrupted at once), so whoever finishes last gives the bytes back: the budget never
    counts memory nobody holds, nor forgets memory a thread still decodes or encodes into.
    """

    def __init__(self, budget: MemoryBudget) -> None:
        self._budget = budget
        self._lock = threading.Lock()
        self._nbytes = 0
        self._threads = 0
        self._closed = False

    @contextmanager
    def in_thread(self) -> Iterator[None]:
        """Wrap a pool thread's work on the image; the bytes stay reserved at least until it ends.

        Raises:
            Abandoned: the coroutine has already closed the claim (the work is not started).
        """
        with self._lock:
            if self._closed:
                raise Abandoned("the request went away before its image was processed")
            self._threads += 1
        try:
            yield
        finally:
            with self._lock:
                self._threads -= 1
                self._give_back_if_unused()

    def take(self, nbytes: int, too_large: Exception) -> None:
        """Reserve ``nbytes``, from inside :meth:`in_thread`.

        Raises:
            too_large, Overloaded: as :meth:`MemoryBudget.hold`.
        """
        with self._lock:
            self._budget.reserve(nbytes, too_large)
            self._nbytes += nbytes

    def close(self) -> None:
        """The coroutine is done with the image (finished, failed or cancelled)."""
        with self._lock:
            self._closed = True
            self._give_back_if_unused()

    def _give_back_if_unused(self) -> None:
        if self._closed and not self._threads and self._nbytes:
            self._budget.release(self._nbytes)
            self._nbytes = 0
