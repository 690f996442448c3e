"""The real thing: ``python -m service`` under uvicorn on a free 127.0.0.1 port, over the tiny model.

Tests that need a batch still running when the next request arrives (queue full, deadlines,
disconnects, drains) run the service with runners held at a gate (``gated_serve.py``), so the queue
they observe does not depend on the machine's speed. Waits are bounded polls, never timing assertions.
"""

from __future__ import annotations

import io
import json
import re
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from live_server import START_TIMEOUT_S, Server, png, raw, run_server, spawn_server
from PIL import Image
from service_fakes import write_fake_repo

from service.runtime import ProviderUnavailable, create_session

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tiny_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that batches (a 200 ms queue delay gathers concurrent requests) with a small pixel cap, on
    onnxruntime (the OpenVINO engine has its own end-to-end test in test_openvino.py)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    settings = {"max_queue_delay_ms": 200, "max_batch_size": 8, "max_pixels": 1_000_000, "engine": "onnxruntime"}
    with run_server(tiny_repo, log, **settings) as s:
        yield s


@dataclass
class Gated:
    """A server whose runners compute only while ``gate`` exists."""

    server: Server
    gate: Path

    def hold(self) -> None:
        self.gate.unlink(missing_ok=True)

    def release(self) -> None:
        self.gate.touch()


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gated]:
    """One image at a time and room for two more in the queue, runners at a gate: easy to overload."""
    folder = tmp_path_factory.mktemp("gated")
    gate = folder / "gate"
    gate.touch()
    models = write_fake_repo(folder / "models")
    with run_server(models, folder / "server.log", gate=gate, max_batch_size=1, max_queue_size=2, retry_after_s=3) as s:
        yield Gated(s, gate)


@pytest.fixture
def held(gated: Gated) -> Iterator[Gated]:
    """The gated server with its runners held; released (and idle again) after the test."""
    gated.hold()
    try:
        yield gated
    finally:
        gated.release()
        gated.server.wait_for(lambda: gated.server.metric("dclgan_busy_instances", device="cpu") == 0, "idle")


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
            engine="onnxruntime",
            precision="float32",
            psnr_db="",
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


def _busy(server: Server) -> bool:
    return server.metric("dclgan_busy_instances", device="cpu") == 1


def test_a_full_queue_answers_503_with_retry_after(held: Gated) -> None:
    server = held.server
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(server.post, "/translate/a2b", **raw(png((16, 16), 0)))
        server.wait_for(lambda: _busy(server), "a busy instance")
        queued = [pool.submit(server.post, "/translate/a2b", **raw(png((16, 16), s))) for s in (1, 2)]
        server.wait_for(lambda: server.metric("dclgan_queue_depth", direction="a2b") == 2, "a full queue")
        refused = server.post("/translate/a2b", **raw(png((16, 16), 3)))
        assert (refused.status_code, refused.json()["error"]) == (503, "queue_full")
        assert refused.headers["retry-after"] == "3" and "x-request-id" in refused.headers
        held.release()
        assert [f.result().status_code for f in [running, *queued]] == [200] * 3


def test_a_request_still_queued_at_its_deadline_gets_504(held: Gated) -> None:
    server = held.server
    computed = server.metric("dclgan_batch_size_sum", direction="a2b")
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(server.post, "/translate/a2b", **raw(png((16, 16))))
        server.wait_for(lambda: _busy(server), "a busy instance")
        late = server.post("/translate/a2b", **raw(png((16, 16)), **{"X-Request-Timeout-Ms": "100"}))
        assert (late.status_code, late.json()["error"]) == (504, "deadline_exceeded")
        held.release()
        assert slow.result().status_code == 200
    assert server.metric("dclgan_batch_size_sum", direction="a2b") == computed + 1  # the late one never ran


def test_a_client_that_disconnects_has_its_queued_work_dropped(held: Gated) -> None:
    server = held.server
    computed = server.metric("dclgan_batch_size_sum", direction="a2b")
    cancelled = server.metric("dclgan_images_total", direction="a2b", outcome="cancelled")
    body = png((16, 16))
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(server.post, "/translate/a2b", **raw(png((16, 16))))
        server.wait_for(lambda: _busy(server), "a busy instance")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(
                b"POST /translate/a2b HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            server.wait_for(lambda: server.metric("dclgan_queue_depth", direction="a2b") == 1, "the request to queue")
        server.wait_for(
            lambda: server.metric("dclgan_images_total", direction="a2b", outcome="cancelled") == cancelled + 1,
            "the cancellation",
        )
        held.release()
        assert slow.result().status_code == 200
    assert server.metric("dclgan_batch_size_sum", direction="a2b") == computed + 1  # never computed


@contextmanager
def gated_server(tmp_path: Path, **settings: object) -> Iterator[Gated]:
    """A private gated server (these tests end it), its runners held from the start."""
    gate = tmp_path / "gate"
    gate.touch()
    with run_server(write_fake_repo(tmp_path / "models"), tmp_path / "server.log", gate=gate, **settings) as s:
        gated = Gated(s, gate)
        gated.hold()
        yield gated


def _in_flight(pool: ThreadPoolExecutor, server: Server, count: int) -> list[Future[httpx.Response]]:
    """``count`` requests admitted (one running at the held gate, the rest queued)."""
    futures = [pool.submit(server.post, "/translate/b2a", **raw(png((16, 16), s))) for s in range(count)]
    server.wait_for(lambda: server.metric("dclgan_inflight_requests") == count, f"{count} requests in flight")
    return futures


def test_sigterm_drains_requests_in_flight_and_exits_0(tmp_path: Path) -> None:
    with gated_server(tmp_path, max_batch_size=1) as gated, ThreadPoolExecutor(4) as pool:
        server = gated.server
        in_flight = _in_flight(pool, server, 4)
        server.process.send_signal(signal.SIGTERM)
        ready = server.get("/readyz")
        assert (ready.status_code, ready.json()["status"]) == (503, "draining")
        refused = server.post("/translate/b2a", **raw(png((16, 16))))
        assert (refused.status_code, refused.json()["error"]) == (503, "not_ready")
        gated.release()
        assert [f.result().status_code for f in in_flight] == [200] * 4
        assert server.process.wait(60) == 0
    assert "draining" in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize("ending", ["drain timeout", "second SIGTERM"])
def test_a_cut_off_drain_answers_json_503_and_exits_1(tmp_path: Path, ending: str) -> None:
    drain_timeout_s = 0.5 if ending == "drain timeout" else 600
    settings = {"max_batch_size": 1, "drain_timeout_s": drain_timeout_s}
    with gated_server(tmp_path, **settings) as gated, ThreadPoolExecutor(3) as pool:
        server = gated.server
        in_flight = _in_flight(pool, server, 3)
        server.process.send_signal(signal.SIGTERM)
        if ending == "second SIGTERM":
            server.wait_for(lambda: "draining for up to" in server.log.read_text(), "the drain to start")
            server.process.send_signal(signal.SIGTERM)
        responses = [f.result() for f in in_flight]  # the runner is still held: nothing could finish
        for r in responses:
            assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
            assert r.json()["error"] == "not_ready" and r.headers["x-request-id"]
        assert server.process.wait(60) == 1  # the exit status says the drain was incomplete
    assert "drain incomplete: 3 requests answered 503" in (tmp_path / "server.log").read_text()


def _cuda_usable(onnx_path: Path) -> bool:
    try:
        create_session(onnx_path, device="cuda:0", require_gpu=True)
    except ProviderUnavailable:
        return False
    return True


def test_a_required_gpu_that_is_missing_stops_startup_with_a_reason(tiny_repo: Path, tmp_path: Path) -> None:
    if _cuda_usable(tiny_repo / "tiny" / "a2b.onnx"):
        pytest.skip("this machine has a usable GPU: nothing is missing")
    log = tmp_path / "server.log"
    with pytest.raises(AssertionError, match="server exited with 3"):
        with run_server(tiny_repo, log, devices="cuda:0", require_gpu="true"):
            pass
    text = log.read_text()
    assert re.search(r"startup failed: cuda:0 was requested .* CUDA is not usable", text)
    assert "Traceback" not in text  # one line, not a traceback


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


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a short header timeout, a cap of 3 connections and long keep-alives."""
    folder = tmp_path_factory.mktemp("guarded")
    gate = folder / "gate"
    gate.touch()
    settings = {"header_timeout_s": 0.3, "max_connections": 3, "keep_alive_s": 60}
    with run_server(write_fake_repo(folder / "models"), folder / "server.log", gate=gate, **settings) as s:
        yield s


def _address(server: Server) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or 30 s pass: a hang fails)."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_half_sent_headers_are_dropped_after_the_header_timeout(guarded: Server) -> None:
    with socket.create_connection(_address(guarded), timeout=30) as sock:
        sock.sendall(b"POST /translate/a2b HTTP/1.1\r\nHost: x\r\nContent-Ty")  # and nothing more
        assert _read_all(sock) == b""  # closed by the server, not left open forever


def test_connections_over_the_cap_are_closed_at_once(guarded: Server) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    held = [socket.create_connection(_address(guarded), timeout=30) for _ in range(3)]
    try:
        for sock in held:  # three kept-alive connections, each with a complete exchange
            sock.sendall(request)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        with socket.create_connection(_address(guarded), timeout=30) as extra:
            try:
                extra.sendall(request)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert _read_all(extra) == b""  # a fourth is closed without an answer
    finally:
        for sock in held:
            sock.close()
    guarded.wait_for(lambda: guarded.get("/healthz").status_code == 200, "room again")


def test_a_request_that_is_not_http_gets_a_json_400(guarded: Server) -> None:
    with socket.create_connection(_address(guarded), timeout=30) as sock:
        sock.sendall(b"HELLO THERE\r\n\r\n")
        head, _, body = _read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"] == "bad_request"
