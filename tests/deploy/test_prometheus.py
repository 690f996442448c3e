"""A real Prometheus (Debian's `prometheus` package, with `promtool`) scraping the real service.

The repository's deploy/prometheus/prometheus.yml is checked as it is, then copied with its targets
rewritten to the test server and a 1 s scrape interval. `python -m service` runs over a tiny exported
generator; Prometheus scrapes it; the test sends translate requests and reads the request counter, a
latency quantile and every Grafana dashboard query back through Prometheus's HTTP API. Everything
listens on 127.0.0.1, every wait is bounded, and both processes are stopped in `finally`.
Skipped only when the prometheus or promtool binary is missing, and then only outside CI (``tests/requires.py``).
"""

from __future__ import annotations

import io
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from service.repository import Provenance
from tests.deploy.common import REPO_ROOT, dashboard_queries, find_tool
from tests.requires import require_module, unavailable

pytestmark = pytest.mark.slow

PROMETHEUS, PROMTOOL = find_tool("prometheus"), find_tool("promtool")
if PROMETHEUS is None or PROMTOOL is None:
    unavailable("prometheus/promtool not installed (Debian: apt-get install prometheus; .ci/run installs it)", True)

REPO_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
DIRECTION = "a2b"
TRANSLATE_ROUTE = "/translate/{direction}"
START_TIMEOUT_S = 60.0
ARRIVAL_TIMEOUT_S = 30.0


def wait_until(
    check: Callable[[], Any], what: str, timeout_s: float, process: subprocess.Popen[bytes], log: Path
) -> Any:
    """Poll ``check()`` until it is truthy; fail with the log if the process dies or time is up."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"exited ({process.returncode}) while waiting for {what}:\n{log.read_text()}"
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"no {what} after {timeout_s:.0f} s:\n{log.read_text()}"
        time.sleep(0.2)


@contextmanager
def running(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as sink:
        process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def png(size: int, seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one tiny random generator (direction a2b), exported the way `dclgan export` does."""
    require_module("torch", "pip install -e '.[train]'")
    from training.export import export_model
    from training.nets import ResnetGenerator

    root = tmp_path_factory.mktemp("models")
    export_model(
        {"G_A": ResnetGenerator(ngf=4, n_blocks=1), "G_B": ResnetGenerator(ngf=4, n_blocks=1)},
        name="tiny",
        domains=("a", "b"),  # directions a2b (DIRECTION) and b2a
        out_root=root,
        provenance=Provenance(model_type="dcl", ngf=4, n_blocks=1, antialias=True, source="test"),
        native_size=16,
        parity_sizes=((16, 16),),
    )
    return root


@pytest.fixture(scope="module")
def service_url(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m service` on a free loopback port (DCLGAN_PORT=0, the URL read from its log), ready."""
    log = tmp_path_factory.mktemp("service") / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCLGAN_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        OMP_WAIT_POLICY="PASSIVE",
        DCLGAN_MODELS_DIR=str(models),
        DCLGAN_HOST="127.0.0.1",
        DCLGAN_PORT="0",
        DCLGAN_DEVICES="cpu",
        DCLGAN_INTRA_OP_THREADS="1",
    )
    with running([sys.executable, "-m", "service"], log, env) as process:
        found = wait_until(
            lambda: re.search(r"dclgan-serve at (http://\S+)", log.read_text()),
            "the service to listen",
            START_TIMEOUT_S,
            process,
            log,
        )
        url = found.group(1)
        wait_until(lambda: get_ok(url + "/readyz"), "readiness", START_TIMEOUT_S, process, log)
        yield url


def test_repo_config_passes_promtool() -> None:
    result = subprocess.run([PROMTOOL, "check", "config", str(REPO_CONFIG)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def prometheus_url(service_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus with the repo's config, its dclgan job pointed at the test server, scraping every second."""
    work = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load(REPO_CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "dclgan"]
    del job["dns_sd_configs"]  # compose's DNS discovery; here the one server under test
    job["static_configs"] = [{"targets": [service_url.removeprefix("http://")]}]
    path = work / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    check = subprocess.run([PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr

    address = f"127.0.0.1:{free_port()}"
    args = [
        PROMETHEUS,
        f"--config.file={path}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address={address}",
        "--log.level=warn",
    ]
    log = work / "prometheus.log"
    with running(args, log) as process:
        url = f"http://{address}"
        wait_until(lambda: get_ok(url + "/-/ready"), "Prometheus to be ready", START_TIMEOUT_S, process, log)
        yield url


def query(prometheus_url: str, promql: str) -> list[dict[str, Any]]:
    """Instant query through the HTTP API; the result vector (empty until data has arrived)."""
    body = httpx.get(f"{prometheus_url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert body["status"] == "success", f"{promql}: {body}"
    return body["data"]["result"]


def translate(service_url: str, count: int, seed: int) -> None:
    for i in range(count):
        response = httpx.post(
            f"{service_url}/translate/{DIRECTION}",
            content=png(24, seed + i),
            headers={"content-type": "image/png"},
            timeout=30,
        )
        assert response.status_code == 200, response.text


def test_scrape_passes_promtool_check_metrics(service_url: str) -> None:
    translate(service_url, 1, seed=100)  # so every labelled family has samples to lint
    scrape = httpx.get(f"{service_url}/metrics", timeout=10).text
    assert f'dclgan_requests_total{{code="200",direction="{DIRECTION}",route="{TRANSLATE_ROUTE}"}}' in scrape
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def translated(service_url: str, prometheus_url: str) -> int:
    """Requests sent in two rounds, the second after Prometheus has seen the first: rate() needs a series
    that grows between two scrapes. Returns how many translate requests got 200 in total."""
    translate(service_url, 2, seed=0)
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    selector = f'dclgan_requests_total{{route="{TRANSLATE_ROUTE}"}}'
    while not query(prometheus_url, selector):
        assert time.monotonic() < deadline, "Prometheus never scraped the request counter"
        time.sleep(0.2)
    translate(service_url, 4, seed=10)
    scrape = httpx.get(f"{service_url}/metrics", timeout=10).text
    return round(
        sum(
            sample.value
            for family in text_string_to_metric_families(scrape)
            for sample in family.samples
            if sample.name == "dclgan_requests_total"
            and sample.labels["route"] == TRANSLATE_ROUTE
            and sample.labels["code"] == "200"
        )
    )


def poll(
    prometheus_url: str, promql: str, accept: Callable[[list[dict[str, Any]]], bool], what: str = ""
) -> list[dict[str, Any]]:
    """Query until ``accept(result)``, for up to ARRIVAL_TIMEOUT_S."""
    deadline = time.monotonic() + ARRIVAL_TIMEOUT_S
    while not accept(result := query(prometheus_url, promql)):
        assert time.monotonic() < deadline, f"{what or promql}: never an acceptable result; last: {result}"
        time.sleep(0.25)
    return result


def test_request_counter_and_latency_quantile_arrive(prometheus_url: str, translated: int) -> None:
    assert translated >= 6  # the fixture's own requests (an earlier test of this module may add one)
    counter = f'sum(dclgan_requests_total{{route="{TRANSLATE_ROUTE}", code="200"}})'
    # Exactly the service's count: nothing lost or doubled between /metrics and Prometheus.
    poll(prometheus_url, counter, lambda r: bool(r) and float(r[0]["value"][1]) == translated)

    quantile = (
        "histogram_quantile(0.5, sum(rate("
        f'dclgan_request_duration_seconds_bucket{{route="{TRANSLATE_ROUTE}"}}[1m])) by (le))'
    )
    (sample,) = poll(prometheus_url, quantile, lambda r: bool(r) and math.isfinite(float(r[0]["value"][1])))
    assert 0 < float(sample["value"][1]) < 60  # seconds: a tiny model's request, within the last bucket

    (target,) = httpx.get(f"{prometheus_url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
    assert target["labels"]["job"] == "dclgan" and target["health"] == "up"


def test_every_dashboard_query_returns_data(prometheus_url: str, translated: int) -> None:
    """Grafana's queries, with its variables filled in, parse in a real Prometheus and return series."""
    for title, expr in dashboard_queries():
        promql = expr.replace("$__rate_interval", "1m").replace("$direction", ".*")
        poll(prometheus_url, promql, bool, what=f"panel {title!r}: {promql}")
