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
        if nbytes > self.capacity:
            raise too_large
        with self._lock:
            if self._used + nbytes > self.capacity:
                raise Overloaded("the server is busy with other large requests; retry later")
            self._used += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._used -= nbytes
