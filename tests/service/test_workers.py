"""The WorkerPool with fake runners (and once with a real onnxruntime session): fan-out, errors, drain."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from service_fakes import FAKE_PROVIDER, Fakes, wait_until

from service.batching import Batch, Batcher, InferenceResult
from service.errors import BatchTimedOut, InferenceFailed, NotReady
from service.repository import load_model_dir
from service.runtime import OnnxRunner, ProviderUnavailable
from service.workers import DeviceRunner, DirectionPlan, WorkerPool

WARMUP = np.zeros((1, 3, 8, 8), dtype=np.float32)


def make_pool(
    fakes: Fakes,
    directions: Sequence[str] = ("a2b",),
    devices: Sequence[str] = ("cpu",),
    instances: int = 1,
    observer: object = None,
) -> tuple[WorkerPool, dict[str, Batcher]]:
    batchers = {d: Batcher(max_batch_size=4, max_queue_size=16) for d in directions}
    plans = [
        DirectionPlan(
            name=d,
            batcher=batchers[d],
            open_runner=functools.partial(fakes.factory, None, d),
            warmup_input=WARMUP,
        )
        for d in directions
    ]
    return WorkerPool(plans, devices=devices, instances_per_device=instances, observer=observer), batchers  # type: ignore[arg-type]


def serving(pool: WorkerPool) -> bool:
    """Every direction has a healthy instance: what readiness asks of the pool."""
    return all(pool.serves(plan.name, plan.version) for plan in pool.plans)


def image(value: float, side: int = 8) -> np.ndarray:
    return np.random.default_rng(int(value)).uniform(-1, 1, (3, side, side)).astype(np.float32) + value


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.failures: list[tuple[str, str, str]] = []

    def instance_failure(self, direction: str, device: str, kind: str) -> None:
        self.failures.append((direction, device, kind))

    def batch_done(self, direction: str, device: str, batch: Batch, compute_s: float) -> None:
        assert compute_s >= 0 and all(batch.started_at >= item.enqueued_at for item in batch.items)
        self.calls.append((direction, device, len(batch.items)))


def test_every_item_of_a_batch_gets_exactly_its_own_output(fakes: Fakes) -> None:
    pool, batchers = make_pool(fakes)
    pool.start()
    fakes.gate.clear()
    first = batchers["a2b"].submit(image(0), timeout_s=60)
    wait_until(lambda: fakes.sizes() == [1], what="the first batch to start")
    inputs = [image(v) for v in (1, 2, 3)]
    futures = [batchers["a2b"].submit(x, timeout_s=60) for x in inputs]
    fakes.gate.set()
    results = [f.result(30) for f in futures]
    assert fakes.sizes() == [1, 3]
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result.output, -x)
        assert result.batch_size == 3
    assert first.result(30).batch_size == 1
    pool.stop(timeout_s=30)


def test_a_runner_error_fails_every_item_of_its_batch(
    fakes: Fakes, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    pool, batchers = make_pool(fakes, observer=recorder)
    pool.start()
    wait_until(lambda: pool.warm, what="warm-up")
    fakes.fail = RuntimeError("kaput")
    futures = [batchers["a2b"].submit(image(v), timeout_s=60) for v in range(3)]
    for f in futures:
        with pytest.raises(InferenceFailed) as failed:
            f.result(30)
        assert "kaput" not in str(failed.value)  # the client is told it failed, not the library's words
    assert "kaput" in caplog.text  # the log has them
    assert set(recorder.failures) == {("a2b", "cpu", "inference_error")}  # one per failed batch
    assert serving(pool)  # one bad batch does not take the instance out
    pool.stop(timeout_s=30)


class ShortRunner:
    """Returns one output whatever the batch size: a broken model."""

    provider, device = FAKE_PROVIDER, "cpu"

    def run(self, batch: np.ndarray) -> np.ndarray:
        return batch[:1]


def test_a_wrong_output_count_fails_the_batch_instead_of_misrouting() -> None:
    batcher = Batcher(max_batch_size=4, max_queue_size=16)
    futures = [batcher.submit(image(v), timeout_s=60) for v in range(2)]
    pool = WorkerPool(
        [DirectionPlan("a2b", batcher, lambda device: ShortRunner(), WARMUP)],
        devices=["cpu"],
        instances_per_device=1,
    )
    pool.start()
    for f in futures:
        with pytest.raises(InferenceFailed, match="inference failed on a2b@cpu#0"):
            f.result(30)
    pool.stop(timeout_s=30)


class WarmupFails:
    provider, device = FAKE_PROVIDER, "cpu"

    def run(self, batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("out of memory")


def test_a_failed_warm_up_is_reported_and_never_warm(caplog: pytest.LogCaptureFixture) -> None:
    pool = WorkerPool(
        [DirectionPlan("a2b", Batcher(max_batch_size=1, max_queue_size=1), lambda d: WarmupFails(), WARMUP)],
        devices=["cpu"],
        instances_per_device=1,
    )
    pool.start()
    wait_until(lambda: pool.failure is not None, what="the warm-up failure")
    assert pool.failure == "warm-up of a2b@cpu#0 failed" and not pool.warm and not serving(pool)
    assert "out of memory" in caplog.text
    pool.stop(timeout_s=30)


def test_start_fails_fast_when_a_runner_cannot_be_opened() -> None:
    def no_gpu(device: str) -> DeviceRunner:
        raise ProviderUnavailable(f"{device} was requested but CUDA is not usable")

    pool = WorkerPool(
        [DirectionPlan("a2b", Batcher(max_batch_size=1, max_queue_size=1), no_gpu, WARMUP)],
        devices=["cuda:0"],
        instances_per_device=1,
    )
    with pytest.raises(ProviderUnavailable, match="cuda:0"):
        pool.start()
    assert pool.instances == [] and not pool.warm


def test_instances_per_device_for_every_direction(fakes: Fakes) -> None:
    pool, _ = make_pool(fakes, directions=("a2b", "b2a"), devices=("cpu", "cuda:1"), instances=2)
    pool.start()
    wait_until(lambda: pool.warm, what="warm-up")
    assert len(pool.instances) == 8
    assert pool.instance_count("cpu") == pool.instance_count("cuda:1") == 4
    assert len({id(inst.runner) for inst in pool.instances}) == 8
    assert len({inst.thread.name for inst in pool.instances if inst.thread}) == 8
    assert {(inst.direction.name, inst.runner.device) for inst in pool.instances} == {
        (d, dev) for d in ("a2b", "b2a") for dev in ("cpu", "cuda:1")
    }
    pool.stop(timeout_s=30)


def test_busy_instances_are_counted(fakes: Fakes) -> None:
    pool, batchers = make_pool(fakes, instances=2)
    pool.start()
    fakes.gate.clear()
    futures = [batchers["a2b"].submit(image(v, side=8 + 4 * v), timeout_s=60) for v in range(2)]  # 2 shapes
    wait_until(lambda: pool.busy_count("cpu") == 2, what="both instances busy")
    fakes.gate.set()
    for f in futures:
        f.result(30)
    wait_until(lambda: pool.busy_count("cpu") == 0, what="instances idle")
    pool.stop(timeout_s=30)


def test_stop_lets_queued_and_running_work_finish(fakes: Fakes) -> None:
    pool, batchers = make_pool(fakes)
    pool.start()
    fakes.gate.clear()
    futures = [batchers["a2b"].submit(image(0), timeout_s=60)]
    wait_until(lambda: len(fakes.batches) == 1, what="the first batch")
    futures += [batchers["a2b"].submit(image(v), timeout_s=60) for v in (1, 2)]
    finished: list[bool] = []
    stopper = threading.Thread(target=lambda: finished.append(pool.stop(timeout_s=30)))
    stopper.start()
    fakes.gate.set()
    stopper.join(30)
    assert finished == [True]
    assert all(isinstance(f.result(0), InferenceResult) for f in futures)
    assert all(inst.thread is not None and not inst.thread.is_alive() for inst in pool.instances)


def test_stop_timeout_drops_the_queue_and_abandons_the_running_batch(fakes: Fakes) -> None:
    pool, batchers = make_pool(fakes)
    pool.start()
    fakes.gate.clear()
    running = batchers["a2b"].submit(image(0), timeout_s=60)
    wait_until(lambda: len(fakes.batches) == 1, what="the first batch")
    queued = batchers["a2b"].submit(image(1, side=12), timeout_s=60)
    assert pool.stop(timeout_s=0.01) is False
    with pytest.raises(NotReady, match="drain timed out"):
        queued.result(0)
    fakes.gate.set()
    assert running.result(30).batch_size == 1


def test_the_observer_sees_every_batch_before_its_futures_resolve(fakes: Fakes) -> None:
    recorder = Recorder()
    pool, batchers = make_pool(fakes, observer=recorder)
    futures: list[Future[InferenceResult]] = [
        batchers["a2b"].submit(image(v), timeout_s=60) for v in range(3)
    ]
    pool.start()
    for f in futures:
        f.result(30)
        assert recorder.calls == [("a2b", "cpu", 3)]
    pool.stop(timeout_s=30)


def test_real_onnx_batched_outputs_equal_each_image_run_alone(tiny_repo: Path) -> None:
    model = load_model_dir(tiny_repo / "tiny")
    runner = OnnxRunner.open(model.path("a2b"), intra_op_threads=1)
    batcher = Batcher(max_batch_size=4, max_queue_size=8)
    inputs = [image(v, side=16) for v in range(4)]
    futures = [batcher.submit(x, timeout_s=60) for x in inputs]  # queued before start: one batch of 4
    pool = WorkerPool(
        [DirectionPlan("a2b", batcher, lambda device: runner, np.zeros((1, 3, 16, 16), np.float32))],
        devices=["cpu"],
        instances_per_device=1,
    )
    pool.start()
    results = [f.result(60) for f in futures]
    pool.stop(timeout_s=30)
    assert [r.batch_size for r in results] == [4] * 4
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(result.output, runner.run(x[None])[0], atol=1e-5)


def test_two_instances_never_split_a_batch() -> None:
    """Triton's dynamic batcher: 16 concurrent requests, 2 idle instances, a 5 ms delay, batches of up
    to 12 -> one batch of 12 and one of 4.

    The batcher's clock stands still until every request is queued and taken, so the delay cannot run
    out early on a slow machine; then it jumps past the delay. With a batch formed by each idle worker
    (the old design), both workers take part of the 16 as they arrive, and neither batch holds 12.
    """
    fakes = Fakes()
    now = [0.0]
    batcher = Batcher(max_batch_size=12, max_delay_s=0.005, max_queue_size=64, clock=lambda: now[0])
    plan = DirectionPlan("a2b", batcher, functools.partial(fakes.factory, None, "a2b"), WARMUP)  # type: ignore[arg-type]
    pool = WorkerPool([plan], devices=["cpu"], instances_per_device=2)
    pool.start()
    wait_until(lambda: pool.warm, what="warm-up")
    barrier = threading.Barrier(16)
    submitted: list[Future[InferenceResult]] = []

    def client(value: int) -> InferenceResult:
        barrier.wait(30)
        future = batcher.submit(image(value), timeout_s=60)
        submitted.append(future)
        return future.result(30)

    with ThreadPoolExecutor(16) as clients:
        results = clients.map(client, range(16))
        wait_until(lambda: len(submitted) == 16 and batcher.depth() == 0, what="all 16 queued and taken")
        now[0] = 1.0  # the delay is over: a partial batch may go
        sizes = sorted(r.batch_size for r in results)
    assert sorted(fakes.sizes()) == [4, 12]
    assert sizes == [4] * 4 + [12] * 12
    pool.stop(timeout_s=30)


class Crash(BaseException):
    """Not an ``Exception``: escapes the runner-error handling, as a bug in the worker loop would."""


class CrashingRunner:
    provider, device = FAKE_PROVIDER, "cpu"

    def __init__(self) -> None:
        self.calls = 0

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls > 1:  # the first call is the warm-up
            raise Crash()
        return -batch


def test_a_worker_that_dies_fails_its_batch_and_is_marked_failed(caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    batcher = Batcher(max_batch_size=4, max_queue_size=16)
    pool = WorkerPool(
        [DirectionPlan("a2b", batcher, lambda device: CrashingRunner(), WARMUP)],
        devices=["cpu"],
        instances_per_device=1,
        observer=recorder,
    )
    futures = [batcher.submit(image(v, side=8 + 4 * v), timeout_s=60) for v in range(2)]  # 2 batches
    pool.start()
    with pytest.raises(InferenceFailed, match="the model instance running this image failed"):
        futures[0].result(30)
    with pytest.raises(NotReady, match="no working model instance"):  # queued: answered now, not at 60 s
        futures[1].result(30)
    with pytest.raises(NotReady):
        batcher.submit(image(2), timeout_s=60)
    (inst,) = pool.instances
    wait_until(lambda: inst.thread is not None and not inst.thread.is_alive(), what="the thread to end")
    assert inst.failed is not None and not inst.healthy and not serving(pool)
    assert pool.failure is not None and "no live instance" in pool.failure  # liveness: cannot recover
    assert recorder.failures == [("a2b", "cpu", "crash")]
    assert "worker a2b@cpu#0 died" in caplog.text
    pool.stop(timeout_s=1)


def test_a_dead_instance_leaves_its_direction_served_by_the_others() -> None:
    runners = iter([CrashingRunner(), ShortRunner()])
    batcher = Batcher(max_batch_size=1, max_queue_size=16)
    pool = WorkerPool(
        [DirectionPlan("a2b", batcher, lambda device: next(runners), WARMUP)],
        devices=["cpu"],
        instances_per_device=2,
    )
    pool.start()
    wait_until(lambda: pool.warm, what="warm-up")
    for v in range(4):  # some land on the crashing instance, until it is dead; the rest are served
        try:
            batcher.submit(image(v), timeout_s=60).result(30)
        except InferenceFailed:
            pass
    wait_until(lambda: sum(inst.failed is not None for inst in pool.instances) == 1, what="one dead instance")
    assert serving(pool) and pool.failure is None
    assert batcher.submit(image(9), timeout_s=60).result(30).batch_size == 1
    pool.stop(timeout_s=5)


def test_a_batch_over_the_time_limit_fails_with_504_and_marks_the_instance_stuck(fakes: Fakes) -> None:
    recorder = Recorder()
    batcher = Batcher(max_batch_size=4, max_queue_size=16)
    plan = DirectionPlan("a2b", batcher, functools.partial(fakes.factory, None, "a2b"), WARMUP)  # type: ignore[arg-type]
    pool = WorkerPool([plan], devices=["cpu"], instances_per_device=1, observer=recorder, batch_timeout_s=0.05)
    pool.start()
    wait_until(lambda: pool.warm, what="warm-up")
    fakes.gate.clear()  # the runner hangs until the test lets it go
    future = batcher.submit(image(0), timeout_s=60)
    with pytest.raises(BatchTimedOut) as timed_out:
        future.result(30)
    assert (timed_out.value.status, timed_out.value.error) == (504, "batch_timeout")
    assert not serving(pool) and pool.failure is None  # unhealthy (readiness), not dead (liveness)
    assert recorder.failures == [("a2b", "cpu", "timeout")]
    fakes.gate.set()  # the runner returns: its late result is dropped and the instance serves again
    wait_until(lambda: serving(pool), what="the instance to recover")
    assert batcher.submit(image(1), timeout_s=60).result(30).batch_size == 1
    pool.stop(timeout_s=30)


def test_a_batch_returning_as_the_watchdog_flags_it_never_leaves_an_idle_instance_stuck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The interleaving that once put a direction out of service for good: the watchdog finds a batch over the
    limit, and before it flags the instance the runner returns and the worker marks the instance idle. Forced
    here: the watchdog's read of ``batch_started`` lets the runner go and waits (bounded) for the worker."""
    from service import workers

    release = threading.Event()
    armed = threading.Event()
    armed.set()

    class Racy(workers.Instance):
        @property  # type: ignore[override]
        def batch_started(self) -> float:
            started = self.__dict__.get("_started", 0.0)
            if threading.current_thread().name == "dclgan-watchdog" and self.__dict__.get("batch") is not None:
                if armed.is_set() and time.monotonic() - started > LIMIT_S:
                    armed.clear()
                    release.set()  # the runner returns now ...
                    deadline = time.monotonic() + 0.5  # ... and the worker goes idle, unless a lock stops it
                    while self.__dict__.get("batch") is not None and time.monotonic() < deadline:
                        time.sleep(0.001)
            return started

        @batch_started.setter
        def batch_started(self, value: float) -> None:
            self.__dict__["_started"] = value

    class Slow:
        provider, engine, precision, psnr_db, device = FAKE_PROVIDER, "fake", "float32", None, "cpu"

        def __init__(self) -> None:
            self.warmed = False

        def run(self, batch: np.ndarray) -> np.ndarray:
            if self.warmed:
                release.wait(30)
            self.warmed = True
            return -batch

    LIMIT_S = 0.2
    monkeypatch.setattr(workers, "Instance", Racy)
    batcher = Batcher(max_batch_size=1, max_queue_size=4)
    recorder = Recorder()
    pool = WorkerPool(
        [DirectionPlan("a2b", batcher, lambda device: Slow(), WARMUP)],
        devices=["cpu"],
        instances_per_device=1,
        batch_timeout_s=LIMIT_S,
        observer=recorder,
    )
    pool.start()
    wait_until(lambda: pool.warm, what="warm-up")
    future = batcher.submit(image(0), timeout_s=60)
    with contextlib.suppress(BatchTimedOut):
        future.result(30)
    # The watchdog reports right after it flags the instance: from then on, only the worker may clear the flag.
    wait_until(lambda: recorder.failures == [("a2b", "cpu", "timeout")], what="the watchdog to flag the batch")
    wait_until(lambda: not pool.instances[0].busy, what="the batch to end")
    wait_until(lambda: serving(pool), what="the instance to serve again", timeout_s=5)
    assert not pool.instances[0].stuck
    assert batcher.submit(image(1), timeout_s=60).result(30).batch_size == 1
    pool.stop(timeout_s=5)
