"""Prometheus metrics of the service, all registered on a caller-supplied ``CollectorRegistry``.

One app, one registry: tests build as many apps as they like without duplicate-series errors, and the
service runs as a single process, so counters are exact (no multiprocess mode, see serving-notes §8.7).
Names follow Prometheus conventions: ``dclgan_`` prefix, base units, ``_total`` counters, and labels
of bounded cardinality (routes are templates; an unknown direction is labelled ``""``).

Gauges that mirror live state (queue depth, busy instances, in-flight requests) are callbacks read at
scrape time, so the code that owns the state never has to remember to update a gauge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector

from service.batching import Batch

# Seconds: from sub-millisecond rejections to minutes-long CPU inference at large sizes.
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
# Every small batch size exactly (batch 3 and 4 mean different things), then coarser.
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64)


@dataclass(frozen=True)
class ServiceMetrics:
    """The service's metric families. ``batch_done`` makes it the worker pool's batch observer."""

    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    images: Counter
    queue_wait_seconds: Histogram
    inference_seconds: Histogram
    batch_size: Histogram
    queue_depth: Gauge
    inflight_requests: Gauge
    busy_instances: Gauge
    instances: Gauge
    ready: Gauge
    model: Info
    instance_failures: Counter
    request_memory_bytes: Gauge
    reloads: Counter

    def batch_done(self, direction: str, device: str, batch: Batch, compute_s: float) -> None:
        """Record one executed batch: its size, its compute time and each item's queue wait."""
        self.batch_size.labels(direction).observe(len(batch.items))
        self.inference_seconds.labels(direction, device).observe(compute_s)
        wait = self.queue_wait_seconds.labels(direction)
        for item in batch.items:
            wait.observe(batch.started_at - item.enqueued_at)

    def instance_failure(self, direction: str, device: str, kind: str) -> None:
        """Count one failure of a model instance (warm-up, runner error, batch timeout, crashed worker)."""
        self.instance_failures.labels(direction, device, kind).inc()

    def watch(self, gauge: Gauge, read: Callable[[], float], *labels: str) -> None:
        """Make ``gauge`` (with ``labels``) report ``read()`` at every scrape."""
        (gauge.labels(*labels) if labels else gauge).set_function(read)


def build_metrics(registry: CollectorRegistry) -> ServiceMetrics:
    """Create every metric family on ``registry``, plus the standard ``process_*`` ones (memory, CPU,
    open files: onnxruntime's arenas grow with the largest batch and never shrink)."""
    ProcessCollector(registry=registry)
    return ServiceMetrics(
        registry=registry,
        requests=Counter(
            "dclgan_requests",
            "HTTP requests by route template, direction and status code",
            ["route", "direction", "code"],
            registry=registry,
        ),
        request_seconds=Histogram(
            "dclgan_request_duration_seconds",
            "HTTP request latency, first byte in to last byte out",
            ["route", "direction"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        ),
        images=Counter(
            "dclgan_images",
            "Images the service tried to translate, by outcome "
            "(ok, bad_image, queue_full, overloaded, deadline, not_ready, failed, cancelled); a request refused "
            "before its body is read counts once",
            ["direction", "outcome"],
            registry=registry,
        ),
        queue_wait_seconds=Histogram(
            "dclgan_queue_wait_seconds",
            "Time an image waited in the queue before its batch started",
            ["direction"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        ),
        inference_seconds=Histogram(
            "dclgan_inference_seconds",
            "Duration of one batched inference call",
            ["direction", "device"],
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        ),
        batch_size=Histogram(
            "dclgan_batch_size",
            "Images per executed batch",
            ["direction"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=registry,
        ),
        queue_depth=Gauge(
            "dclgan_queue_depth", "Images waiting in the queue", ["direction"], registry=registry
        ),
        inflight_requests=Gauge(
            "dclgan_inflight_requests", "Translate requests admitted and not yet answered", registry=registry
        ),
        busy_instances=Gauge(
            "dclgan_busy_instances",
            "Model instances running a batch right now",
            ["device"],
            registry=registry,
        ),
        instances=Gauge(
            "dclgan_instances", "Model instances (session + thread)", ["device"], registry=registry
        ),
        ready=Gauge(
            "dclgan_ready", "1 when every model is loaded and warmed up and not draining", registry=registry
        ),
        model=Info(
            "dclgan_model",
            "Served directions: each version of each model and the execution provider each device got",
            ["model", "version", "direction", "device"],
            registry=registry,
        ),
        instance_failures=Counter(
            "dclgan_instance_failures",
            "Model instance failures by kind (warmup, inference_error, timeout, crash)",
            ["direction", "device", "kind"],
            registry=registry,
        ),
        request_memory_bytes=Gauge(
            "dclgan_request_memory_bytes",
            "Bytes reserved by request bodies and decoded images in flight (of max_request_memory_bytes)",
            registry=registry,
        ),
        reloads=Counter(
            "dclgan_reloads",
            "Reloads of the model repository by result (loaded, unchanged, failed: the old versions kept serving)",
            ["result"],
            registry=registry,
        ),
    )
