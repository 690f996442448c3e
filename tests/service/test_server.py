"""The real thing: ``python -m service`` under uvicorn on a free 127.0.0.1 port, over the tiny model.

Queues are built with large images (the tiny generator takes about 0.3 s at 768x768 and 0.5 s at
1024x1024 on two idle cores) and observed through ``/metrics``; waits are bounded polls, never
timing assertions.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from service_fakes import sample

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 90.0


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=60, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        return sample(self.get("/metrics").text, name, **labels)

    def wait_for(self, predicate: Any, what: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert self.process.poll() is None, (
                f"server exited while waiting for {what}:\n{self.log.read_text()}"
            )
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{self.log.read_text()}"
            time.sleep(0.01)


def spawn_server(models: Path, log: Path, **settings: object) -> subprocess.Popen[bytes]:
    """``python -m service`` on a free port (DCLGAN_PORT=0), its output going to ``log``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCLGAN_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        OMP_WAIT_POLICY="PASSIVE",
        DCLGAN_MODELS_DIR=str(models),
        DCLGAN_PORT="0",
        DCLGAN_INTRA_OP_THREADS="1",
        DCLGAN_HOST="127.0.0.1",
    )
    env.update({f"DCLGAN_{key.upper()}": str(value) for key, value in settings.items()})
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "service"], cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT
        )


@contextmanager
def run_server(models: Path, log: Path, **settings: object) -> Iterator[Server]:
    """Start the service (the URL is read from its log) and wait until it is ready."""
    process = spawn_server(models, log, **settings)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (found := re.search(r"dclgan-serve at (http://\S+)", log.read_text())):
            assert process.poll() is None, f"server exited with {process.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"server did not start:\n{log.read_text()}"
            time.sleep(0.05)
        server = Server(found.group(1), process, log)
        server.wait_for(lambda: server.get("/readyz").status_code == 200, "readiness")
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def png(size: tuple[int, int], seed: int = 0) -> bytes:
    """A smooth image (cheap to encode and decode even when large) with a per-seed tint."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack(
        [xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, seed * 37 % 256)], -1
    )
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def raw(data: bytes, **headers: str) -> dict[str, Any]:
    return {"content": data, "headers": {"content-type": "image/png", **headers}}


@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that batches (a 200 ms queue delay gathers concurrent requests) with a small pixel cap."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with run_server(tiny_repo, log, max_queue_delay_ms=200, max_batch_size=8, max_pixels=1_000_000) as s:
        yield s


@pytest.fixture(scope="module")
def tight_server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One image at a time and room for two more in the queue: easy to overload."""
    log = tmp_path_factory.mktemp("tight") / "server.log"
    with run_server(tiny_repo, log, max_batch_size=1, max_queue_size=2, retry_after_s=3) as s:
        yield s


def test_both_directions_end_to_end(server: Server) -> None:
    a2b = server.post("/translate/a2b", files={"image": ("horse.png", png((70, 50)), "image/png")})
    b2a = server.post("/translate/b2a?format=jpeg", **raw(png((33, 21))))
    assert (a2b.status_code, a2b.headers["content-type"]) == (200, "image/png")
    assert (b2a.status_code, b2a.headers["content-type"]) == (200, "image/jpeg")
    assert Image.open(io.BytesIO(a2b.content)).size == (70, 50)
    assert Image.open(io.BytesIO(b2a.content)).size == (33, 21)
    assert "x-request-id" in a2b.headers
    models = server.get("/models").json()["models"]
    providers = {i["provider"] for m in models for d in m["directions"] for i in d["instances"]}
    assert providers == {"CPUExecutionProvider"}
    assert (
        server.metric(
            "dclgan_model_info",
            model="tiny",
            direction="b2a",
            device="cpu",
            version="1",
            provider="CPUExecutionProvider",
        )
        == 1
    )
    rid = a2b.headers["x-request-id"]
    server.wait_for(lambda: rid in server.log.read_text(), "the access log line")
    assert re.search(
        rf'"POST /translate/a2b" 200 .* queue=[\d.]+ms compute=[\d.]+ms rid={rid}', server.log.read_text()
    )


def test_docs_and_metrics_are_served(server: Server) -> None:
    for page in ("/docs", "/redoc"):
        html = server.get(page).text
        assert not re.search(r"https?://", html)
        for asset in re.findall(r'(?:src|href)="([^"]+)"', html):
            assert server.get(asset).status_code == 200
    assert server.get("/openapi.json").status_code == 200
    assert server.get("/metrics").headers["content-type"].startswith("text/plain")


BAD = {
    "not an image": ("/translate/a2b", raw(b"plain text"), 415, "unsupported_image"),
    "truncated": ("/translate/a2b", raw(png((300, 200))[:-400]), 400, "corrupt_image"),
    "wrong content type": (
        "/translate/a2b",
        {"content": b"{}", "headers": {"content-type": "application/json"}},
        415,
        "unsupported_media_type",
    ),
    "missing field": (
        "/translate/a2b",
        {"files": {"photo": ("x.png", png((8, 8)), "image/png")}},
        422,
        "validation_error",
    ),
    "unknown direction": ("/translate/horse2zebra", raw(png((8, 8))), 404, "unknown_direction"),
    "too many pixels": ("/translate/a2b", raw(png((1100, 1000))), 413, "image_too_large"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_the_right_json_error(server: Server, case: str) -> None:
    path, kwargs, status, error = BAD[case]
    r = server.post(path, **kwargs)
    assert (r.status_code, r.json()["error"]) == (status, error), r.text


def test_an_oversized_declared_body_is_refused_before_it_is_sent(server: Server) -> None:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /translate/a2b HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 11534336\r\n\r\n"
        )  # 11 MiB announced, not one byte sent
        response = b""
        while b"\r\n\r\n" not in response and (chunk := sock.recv(4096)):
            response += chunk
    assert response.startswith(b"HTTP/1.1 413")


def test_concurrent_requests_form_batches(server: Server) -> None:
    before = (
        server.metric("dclgan_batch_size_count", direction="a2b"),
        server.metric("dclgan_batch_size_sum", direction="a2b"),
    )
    with ThreadPoolExecutor(8) as pool:
        statuses = list(
            pool.map(lambda s: server.post("/translate/a2b", **raw(png((64, 48), s))).status_code, range(8))
        )
    assert statuses == [200] * 8
    batches = server.metric("dclgan_batch_size_count", direction="a2b") - before[0]
    images = server.metric("dclgan_batch_size_sum", direction="a2b") - before[1]
    assert images == 8 and batches < 8, f"{images} images in {batches} batches: no batch larger than 1"


def test_a_full_queue_answers_503_with_retry_after(tight_server: Server) -> None:
    with ThreadPoolExecutor(8) as pool:
        responses = list(
            pool.map(lambda s: tight_server.post("/translate/a2b", **raw(png((768, 768), s))), range(8))
        )
    statuses = sorted(r.status_code for r in responses)
    # One running plus two queued are always accepted; the rest arrive while the queue is full.
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 2 and 503 in statuses, statuses
    for r in responses:
        if r.status_code == 503:
            assert (r.json()["error"], r.headers["retry-after"]) == ("queue_full", "3")


def test_a_request_still_queued_at_its_deadline_gets_504(tight_server: Server) -> None:
    computed = tight_server.metric("dclgan_batch_size_sum", direction="a2b")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(tight_server.post, "/translate/a2b", **raw(png((1024, 1024))))
        tight_server.wait_for(
            lambda: tight_server.metric("dclgan_busy_instances", device="cpu") == 1, "a busy instance"
        )
        late = tight_server.post("/translate/a2b", **raw(png((16, 16)), **{"X-Request-Timeout-Ms": "100"}))
        assert (late.status_code, late.json()["error"]) == (504, "deadline_exceeded")
        assert slow.result().status_code == 200
    assert (
        tight_server.metric("dclgan_batch_size_sum", direction="a2b") == computed + 1
    )  # the late one never ran


def test_a_client_that_disconnects_has_its_queued_work_dropped(tight_server: Server) -> None:
    computed = tight_server.metric("dclgan_batch_size_sum", direction="a2b")
    cancelled = tight_server.metric("dclgan_images_total", direction="a2b", outcome="cancelled")
    body = png((16, 16))
    host, port = tight_server.url.removeprefix("http://").rsplit(":", 1)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(tight_server.post, "/translate/a2b", **raw(png((1024, 1024))))
        tight_server.wait_for(
            lambda: tight_server.metric("dclgan_busy_instances", device="cpu") == 1, "a busy instance"
        )
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /translate/a2b HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            depth = "dclgan_queue_depth"
            tight_server.wait_for(
                lambda: tight_server.metric(depth, direction="a2b") == 1, "the request to queue"
            )
        tight_server.wait_for(
            lambda: (
                tight_server.metric("dclgan_images_total", direction="a2b", outcome="cancelled")
                == cancelled + 1
            ),
            "the cancellation",
        )
        assert slow.result().status_code == 200
    assert tight_server.metric("dclgan_batch_size_sum", direction="a2b") == computed + 1  # never computed


def test_sigterm_drains_requests_in_flight_and_exits_0(tiny_repo: Path, tmp_path: Path) -> None:
    with run_server(tiny_repo, tmp_path / "server.log", max_batch_size=1) as server:
        with ThreadPoolExecutor(4) as pool:
            in_flight = [
                pool.submit(server.post, "/translate/b2a", **raw(png((768, 768), s))) for s in range(4)
            ]
            server.wait_for(lambda: server.metric("dclgan_inflight_requests") == 4, "4 requests in flight")
            server.process.send_signal(signal.SIGTERM)
            ready = server.get("/readyz")
            assert (ready.status_code, ready.json()["status"]) == (503, "draining")
            refused = server.post("/translate/b2a", **raw(png((16, 16))))
            assert (refused.status_code, refused.json()["error"]) == (503, "not_ready")
            assert [f.result().status_code for f in in_flight] == [200] * 4
        assert server.process.wait(60) == 0
    assert "draining" in (tmp_path / "server.log").read_text()


def test_a_required_gpu_that_is_missing_stops_startup_with_a_reason(tiny_repo: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with pytest.raises(AssertionError, match="server exited with 3"):
        with run_server(tiny_repo, log, devices="cuda:0", require_gpu="true"):
            pass
    assert re.search(r"startup failed: cuda:0 was requested .* CUDA is not usable", log.read_text())


def test_an_instance_that_cannot_warm_up_ends_the_process(tiny_model_copy: Path, tmp_path: Path) -> None:
    # The session opens, but the warm-up batch is 1x1 pixels, which the generator's padding refuses.
    card = json.loads((tiny_model_copy / "model.json").read_text())
    card["input"].update(native_size=1, min_size=1, multiple_of=1)
    (tiny_model_copy / "model.json").write_text(json.dumps(card))
    log = tmp_path / "server.log"
    process = spawn_server(tiny_model_copy.parent, log)
    try:
        assert process.wait(START_TIMEOUT_S) == 1, log.read_text()
    finally:
        process.kill()
    assert "exiting: warm-up of" in log.read_text()
