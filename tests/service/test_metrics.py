"""Metric families on a fresh registry: names (checked by the Prometheus parser), batch observations."""

from __future__ import annotations

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from service_fakes import sample

from service.batching import Batch, WorkItem
from service.metrics import BATCH_SIZE_BUCKETS, build_metrics

FAMILIES = {
    "dclgan_requests": "counter",
    "dclgan_request_duration_seconds": "histogram",
    "dclgan_images": "counter",
    "dclgan_queue_wait_seconds": "histogram",
    "dclgan_inference_seconds": "histogram",
    "dclgan_batch_size": "histogram",
    "dclgan_queue_depth": "gauge",
    "dclgan_inflight_requests": "gauge",
    "dclgan_busy_instances": "gauge",
    "dclgan_instances": "gauge",
    "dclgan_ready": "gauge",
    "dclgan_model_info": "gauge",  # an Info is exposed as a gauge of 1 with the values as labels
    "dclgan_reloads": "counter",
}


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode()


def test_every_family_parses_with_the_documented_name_and_type() -> None:
    metrics = build_metrics(CollectorRegistry())
    metrics.requests.labels("/translate/{direction}", "a2b", "200").inc()
    metrics.images.labels("a2b", "ok").inc()
    metrics.request_seconds.labels("/translate/{direction}", "a2b").observe(0.1)
    for family in (metrics.queue_wait_seconds, metrics.batch_size):
        family.labels("a2b").observe(1)
    metrics.inference_seconds.labels("a2b", "cpu").observe(0.1)
    metrics.model.labels("tiny", "1", "a2b", "cpu").info({"provider": "CPUExecutionProvider"})
    metrics.reloads.labels("loaded").inc()
    parsed = {f.name: f.type for f in text_string_to_metric_families(exposition(metrics.registry))}
    assert {name: parsed.get(name) for name in FAMILIES} == FAMILIES
    assert all(name.startswith(("dclgan_", "process_")) for name in parsed)
    assert "process_resident_memory_bytes" in parsed


def test_registries_are_independent() -> None:
    first, second = build_metrics(CollectorRegistry()), build_metrics(CollectorRegistry())
    first.images.labels("a2b", "ok").inc()
    assert sample(exposition(first.registry), "dclgan_images_total", direction="a2b", outcome="ok") == 1
    assert sample(exposition(second.registry), "dclgan_images_total", direction="a2b", outcome="ok") == 0


def test_batch_done_records_size_compute_and_each_queue_wait() -> None:
    metrics = build_metrics(CollectorRegistry())
    items = [
        WorkItem(array=np.zeros((3, 8, 8), np.float32), deadline=100.0, enqueued_at=t)
        for t in (1.0, 1.5, 2.0)
    ]
    metrics.batch_done("a2b", "cpu", Batch(items=items, started_at=3.0), compute_s=0.25)
    text = exposition(metrics.registry)
    assert sample(text, "dclgan_batch_size_count", direction="a2b") == 1
    assert sample(text, "dclgan_batch_size_sum", direction="a2b") == 3
    assert sample(text, "dclgan_batch_size_bucket", direction="a2b", le="2.0") == 0
    assert sample(text, "dclgan_batch_size_bucket", direction="a2b", le="3.0") == 1
    assert sample(text, "dclgan_queue_wait_seconds_count", direction="a2b") == 3
    assert sample(text, "dclgan_queue_wait_seconds_sum", direction="a2b") == 2.0 + 1.5 + 1.0
    assert sample(text, "dclgan_inference_seconds_sum", direction="a2b", device="cpu") == 0.25


def test_watched_gauges_read_their_source_at_scrape_time() -> None:
    metrics = build_metrics(CollectorRegistry())
    depth = [0]
    metrics.watch(metrics.queue_depth, lambda: depth[0], "a2b")
    metrics.watch(metrics.inflight_requests, lambda: 2)
    depth[0] = 5
    text = exposition(metrics.registry)
    assert sample(text, "dclgan_queue_depth", direction="a2b") == 5
    assert sample(text, "dclgan_inflight_requests") == 2


def test_batch_size_buckets_are_explicit_and_cover_small_sizes_exactly() -> None:
    assert BATCH_SIZE_BUCKETS[:8] == (1, 2, 3, 4, 5, 6, 7, 8)
