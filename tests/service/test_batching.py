"""The Batcher alone: batch formation, shape buckets, bounds, deadlines, cancellation and closing."""

from __future__ import annotations

import gc
import random
import threading
import weakref
from concurrent.futures import Future

import numpy as np
import pytest

from service.batching import Batch, Batcher, InferenceResult
from service.errors import DeadlineExceeded, NotReady, QueueFull


class Clock:
    """A manual monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def image(side: int = 8, value: float = 0.0) -> np.ndarray:
    return np.full((3, side, side), value, dtype=np.float32)


def values(batch: Batch | None) -> list[float]:
    assert batch is not None
    return [float(item.array[0, 0, 0]) for item in batch.items]


def test_takes_whatever_is_queued_up_to_max_batch_size() -> None:
    batcher = Batcher(max_batch_size=4, max_queue_size=10)
    for v in range(6):
        batcher.submit(image(value=v), timeout_s=10)
    assert values(batcher.next_batch(timeout_s=0)) == [0, 1, 2, 3]
    assert values(batcher.next_batch(timeout_s=0)) == [4, 5]
    assert batcher.next_batch(timeout_s=0) is None
    assert batcher.depth() == 0


def test_batch_stacks_inputs_in_order() -> None:
    batcher = Batcher(max_batch_size=4, max_queue_size=10)
    for v in range(3):
        batcher.submit(image(value=v), timeout_s=10)
    batch = batcher.next_batch(timeout_s=0)
    assert batch is not None
    inputs = batch.inputs()
    assert inputs.shape == (3, 3, 8, 8) and inputs.dtype == np.float32
    assert inputs[:, 0, 0, 0].tolist() == [0, 1, 2]


def test_a_batch_holds_one_shape_and_other_shapes_keep_their_turn() -> None:
    batcher = Batcher(max_batch_size=8, max_queue_size=10)
    for side, v in [(8, 0), (16, 1), (8, 2), (16, 3), (8, 4)]:
        batcher.submit(image(side, v), timeout_s=10)
    assert values(batcher.next_batch(timeout_s=0)) == [0, 2, 4]
    assert values(batcher.next_batch(timeout_s=0)) == [1, 3]


def test_the_pixel_cap_batches_large_images_less_but_never_refuses_one() -> None:
    batcher = Batcher(max_batch_size=8, max_batch_pixels=2 * 8 * 8, max_queue_size=10)
    for side, v in [(8, 0), (8, 1), (8, 2), (16, 3), (16, 4)]:
        batcher.submit(image(side, v), timeout_s=10)
    assert values(batcher.next_batch(timeout_s=0)) == [0, 1]
    assert values(batcher.next_batch(timeout_s=0)) == [2]
    assert values(batcher.next_batch(timeout_s=0)) == [3]  # over the cap on its own: runs alone
    assert values(batcher.next_batch(timeout_s=0)) == [4]


def test_full_queue_raises_at_once_and_frees_up_when_taken() -> None:
    batcher = Batcher(max_batch_size=2, max_queue_size=2)
    batcher.submit(image(), timeout_s=10)
    batcher.submit(image(), timeout_s=10)
    with pytest.raises(QueueFull):
        batcher.ensure_room()
    with pytest.raises(QueueFull):
        batcher.submit(image(), timeout_s=10)
    assert batcher.next_batch(timeout_s=0) is not None
    batcher.ensure_room()
    batcher.submit(image(), timeout_s=10)


def test_waits_for_company_until_the_batch_is_full() -> None:
    batcher = Batcher(max_batch_size=2, max_delay_s=60.0, max_queue_size=4)
    batcher.submit(image(value=1), timeout_s=100)
    result: list[Batch | None] = []
    worker = threading.Thread(target=lambda: result.append(batcher.next_batch(timeout_s=30)))
    worker.start()
    batcher.submit(image(value=2), timeout_s=100)
    worker.join(30)
    assert values(result[0]) == [1, 2]


def test_a_partial_batch_leaves_when_the_delay_expires() -> None:
    batcher = Batcher(max_batch_size=8, max_delay_s=0.02, max_queue_size=4)
    batcher.submit(image(value=1), timeout_s=100)
    assert values(batcher.next_batch(timeout_s=30)) == [1]


def test_blocks_until_work_arrives() -> None:
    batcher = Batcher(max_batch_size=2, max_queue_size=4)
    result: list[Batch | None] = []
    worker = threading.Thread(target=lambda: result.append(batcher.next_batch(timeout_s=30)))
    worker.start()
    batcher.submit(image(value=5), timeout_s=100)
    worker.join(30)
    assert values(result[0]) == [5]


def test_expired_items_fail_without_being_computed() -> None:
    clock = Clock()
    batcher = Batcher(max_batch_size=4, max_queue_size=4, clock=clock)
    late = batcher.submit(image(value=1), timeout_s=1.0)
    on_time = batcher.submit(image(value=2), timeout_s=10.0)
    clock.now += 2.0
    assert values(batcher.next_batch(timeout_s=0)) == [2]
    assert isinstance(late.exception(0), DeadlineExceeded)
    assert on_time.running()


def test_only_expired_items_means_no_batch_yet() -> None:
    clock = Clock()
    batcher = Batcher(max_batch_size=4, max_queue_size=4, clock=clock)
    late = batcher.submit(image(), timeout_s=1.0)
    clock.now += 2.0
    assert batcher.next_batch(timeout_s=0) is None
    assert isinstance(late.exception(0), DeadlineExceeded)


def test_cancelled_items_are_skipped_and_running_ones_cannot_be_cancelled() -> None:
    batcher = Batcher(max_batch_size=4, max_queue_size=4)
    gone = batcher.submit(image(value=1), timeout_s=10)
    kept = batcher.submit(image(value=2), timeout_s=10)
    assert gone.cancel()
    # Off the queue at once: its decoded image is not held while every worker is busy, nor counted as queued.
    assert batcher.depth() == 1
    assert values(batcher.next_batch(timeout_s=0)) == [2]
    assert not kept.cancel()


def test_cancelled_items_do_not_hold_places_in_a_full_queue() -> None:
    batcher = Batcher(max_batch_size=4, max_queue_size=2)
    batcher.submit(image(value=1), timeout_s=10).cancel()
    batcher.submit(image(value=2), timeout_s=10)
    batcher.submit(image(value=3), timeout_s=10)
    assert values(batcher.next_batch(timeout_s=0)) == [2, 3]


def test_close_refuses_new_work_but_serves_the_queue() -> None:
    batcher = Batcher(max_batch_size=4, max_queue_size=4)
    batcher.submit(image(value=1), timeout_s=10)
    batcher.close()
    with pytest.raises(NotReady):
        batcher.submit(image(), timeout_s=10)
    assert values(batcher.next_batch()) == [1]
    assert batcher.next_batch() is None  # closed and empty: returns without a timeout


def test_cancel_pending_fails_queued_items() -> None:
    batcher = Batcher(max_batch_size=4, max_queue_size=4)
    futures = [batcher.submit(image(), timeout_s=10) for _ in range(3)]
    futures[0].cancel()  # already gone from the queue
    assert batcher.cancel_pending("bye") == 2
    assert futures[0].cancelled()
    assert all(isinstance(f.exception(0), NotReady) for f in futures[1:])


def test_rejects_bad_limits() -> None:
    with pytest.raises(ValueError):
        Batcher(max_batch_size=0, max_queue_size=1)


def test_concurrent_producers_and_consumers_deliver_every_item_once_in_shape_pure_batches() -> None:
    batcher = Batcher(max_batch_size=4, max_delay_s=0.001, max_queue_size=1000)
    seen: list[int] = []
    bad_batches: list[Batch] = []
    lock = threading.Lock()

    def consume() -> None:
        while (batch := batcher.next_batch()) is not None:
            with lock:
                if len(batch.items) > 4 or len({item.shape for item in batch.items}) != 1:
                    bad_batches.append(batch)
                seen.extend(int(item.array[0, 0, 0]) for item in batch.items)
            for item in batch.items:
                item.future.set_result(None)  # type: ignore[arg-type]

    def produce(start: int, futures: list[Future[object]]) -> None:
        rng = random.Random(start)
        for v in range(start, start + 100):
            futures.append(batcher.submit(image(rng.choice([8, 12, 16]), v), timeout_s=60))  # type: ignore[arg-type]

    consumers = [threading.Thread(target=consume) for _ in range(2)]
    futures: list[list[Future[object]]] = [[] for _ in range(4)]
    producers = [threading.Thread(target=produce, args=(i * 1000, futures[i])) for i in range(4)]
    for t in consumers + producers:
        t.start()
    for t in producers:
        t.join(30)
    for group in futures:
        for f in group:
            f.result(30)
    batcher.close()
    for t in consumers:
        t.join(30)
    assert not bad_batches
    assert sorted(seen) == sorted(v for i in range(4) for v in range(i * 1000, i * 1000 + 100))


def test_an_item_s_input_is_freed_as_soon_as_nothing_refers_to_it() -> None:
    """No reference cycle through the future's callbacks: without the garbage collector, the (large) decoded
    input goes with the last reference to its batch and future, computed or cancelled."""
    batcher = Batcher(max_batch_size=1, max_queue_size=4)
    gc.disable()
    try:
        computed, cancelled = image(value=1), image(value=2)
        refs = [weakref.ref(computed), weakref.ref(cancelled)]
        done = batcher.submit(computed, timeout_s=10)
        batcher.submit(cancelled, timeout_s=10).cancel()
        batch = batcher.next_batch(timeout_s=0)
        done.set_result(InferenceResult(np.zeros(1, np.float32), 0.0, 0.0, 1))
        del computed, cancelled, done, batch
        assert [ref() for ref in refs] == [None, None]
    finally:
        gc.enable()
