"""Hostile clients against a live ``dclgan serve`` on 127.0.0.1: memory bombs, slow clients, broken files.

    python bench/attack.py --out runs/attack-after.json                     # this checkout
    python bench/attack.py --code /tmp/before --out runs/attack-before.json # another checkout of the code

Starts the service from ``--code`` (``python -m service`` with that folder first on ``PYTHONPATH``) over
``--models`` on a free port, then runs each attack once, bounded in connections and time, sampling the
server's resident memory (``/proc/PID/status``) every 20 ms. Prints a table and writes JSON: per attack,
the statuses clients got, the peak and the after-attack RSS above the idle server, and whether a normal
request still succeeded during the attack. Loopback only; the server is stopped at the end.

Attacks (issue 11): eight concurrent 48 KB 16-bit PNGs declaring 5000x5000; one ``/batch`` of eight of
them; a 633-byte truncated JPEG declaring 5000x5000; half-sent request headers held open; a body
trickled a byte a second; many connections each holding an unfinished 10 MiB body; clients that never
read their (large) responses.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def emit(line: str) -> None:
    print(line, flush=True)


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024  # type: ignore[union-attr]


class Sampler:
    """Peak RSS of a process over a block, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()

    def __enter__(self) -> Sampler:
        self.peak = rss_mb(self.pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def server(
    code: Path, models: Path, log: Path, nofile: int, settings: dict[str, str]
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCLGAN_")}
    env.update(PYTHONPATH=str(code), OMP_WAIT_POLICY="PASSIVE", DCLGAN_MODELS_DIR=str(models), DCLGAN_PORT="0")
    env.update(settings)
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service"],
            cwd=code,
            env=env,
            stdout=sink,
            stderr=sink,
            # A common default descriptor limit, soft and hard, so that exhausting it is measurable.
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
        )
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(r"dclgan-serve at (http://\S+)", log.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)
        url = m.group(1)
        while httpx.get(url + "/readyz", timeout=10).status_code != 200:
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def png16_bomb(side: int = 5000) -> bytes:
    """A flat 16-bit grey PNG: tiny file, huge image."""
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), 30000, dtype=np.uint16)).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def truncated_jpeg(side: int = 5000, keep: int = 631) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 200, 30)).save(buf, format="JPEG", quality=50)
    return buf.getvalue()[:keep] + b"\xff\xd9"


def small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(buf, format="JPEG")
    return buf.getvalue()


def probe_ok(url: str, direction: str) -> bool:
    """A normal request while the attack goes on."""
    try:
        r = httpx.post(
            f"{url}/translate/{direction}", content=small_jpeg(), headers={"content-type": "image/jpeg"}, timeout=60
        )
        return r.status_code == 200
    except httpx.HTTPError:
        return False


def statuses(responses: list[Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in responses:
        key = str(r) if not isinstance(r, httpx.Response) else str(r.status_code)
        counts[key] = counts.get(key, 0) + 1
    return counts


def post(url: str, **kwargs: Any) -> httpx.Response | str:
    try:
        return httpx.post(url, timeout=120, **kwargs)
    except httpx.HTTPError as exc:
        return type(exc).__name__


def attack_bombs(url: str, direction: str) -> dict[str, Any]:
    bomb = png16_bomb()
    with ThreadPoolExecutor(8) as pool:
        got = list(
            pool.map(
                lambda _: post(f"{url}/translate/{direction}", content=bomb, headers={"content-type": "image/png"}),
                range(8),
            )
        )
    return {"statuses": statuses(got), "upload_bytes": len(bomb)}


def attack_batch(url: str, direction: str) -> dict[str, Any]:
    bomb = png16_bomb()
    files = [("images", (f"{i}.png", bomb, "image/png")) for i in range(8)]
    r = post(f"{url}/translate/{direction}/batch", files=files)
    items = [i["status"] for i in r.json()["results"]] if isinstance(r, httpx.Response) and r.status_code == 200 else []
    return {"statuses": statuses([r]), "item_statuses": items}


def attack_truncated(url: str, direction: str) -> dict[str, Any]:
    data = truncated_jpeg()
    r = post(f"{url}/translate/{direction}", content=data, headers={"content-type": "image/jpeg"})
    return {"statuses": statuses([r]), "upload_bytes": len(data)}


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def attack_slow_headers(url: str, direction: str, count: int = 1100, hold_s: float = 15.0) -> dict[str, Any]:
    """``count`` connections send half a request line and hold; how many does the server close?"""
    socks, failed = [], 0
    for _ in range(count):
        try:
            s = socket.create_connection(_address(url), timeout=5)
            s.sendall(b"POST /translate/" + direction.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Ty")
            socks.append(s)
        except OSError:
            failed += 1
    time.sleep(hold_s)
    during = probe_ok(url, direction)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    return {
        "connections": count,
        "connect_failed": failed,
        "held_s": hold_s,
        "closed_by_server": closed,
        "normal_request_ok": during,
    }


def attack_trickle(url: str, direction: str, limit_s: float = 70.0) -> dict[str, Any]:
    """A declared 2 KB body sent one byte a second: does the server wait forever?"""
    body = small_jpeg()
    s = socket.create_connection(_address(url), timeout=5)
    s.sendall(
        f"POST /translate/{direction} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
    )
    start, sent, answer = time.monotonic(), 0, b""
    s.setblocking(False)
    while time.monotonic() - start < limit_s and sent < len(body):
        try:
            answer += s.recv(4096)
            if answer:
                break
        except BlockingIOError:
            pass
        try:
            s.sendall(body[sent : sent + 1])
            sent += 1
        except OSError:
            break
        time.sleep(1.0)
    s.close()
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "no answer"
    return {"answer": status, "after_s": round(time.monotonic() - start, 1), "bytes_sent": sent}


def attack_held_bodies(url: str, direction: str, count: int = 100, each: int = 10 * 1024 * 1024) -> dict[str, Any]:
    """``count`` connections each declare 10 MiB and send all but the last KiB, then hold."""
    chunk = b"\0" * (1024 * 1024)
    socks, refused = [], 0
    for _ in range(count):
        s = socket.create_connection(_address(url), timeout=10)
        s.sendall(
            f"POST /translate/{direction} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {each}\r\n\r\n".encode()
        )
        try:
            for _ in range(9):
                s.sendall(chunk)
            s.sendall(chunk[: 1024 * 1024 - 1024])
        except OSError:
            refused += 1
        socks.append(s)
    time.sleep(3)
    during = probe_ok(url, direction)
    answered = 0
    for s in socks:
        s.setblocking(False)
        try:
            answered += bool(s.recv(64))
        except (BlockingIOError, OSError):
            pass
        s.close()
    return {"connections": count, "send_failed": refused, "answered_early": answered, "normal_request_ok": during}


def noise_png(side: int) -> bytes:
    """Random pixels: the translation of such an image at its own size is a PNG of megabytes."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def attack_unread_responses(
    url: str, direction: str, count: int = 12, side: int = 1448, hold_s: float = 20.0
) -> dict[str, Any]:
    """``count`` clients (receive buffers of 4 KiB) each ask for a ``side`` x ``side`` translation at that
    size (responses of several MB, more than the kernel's socket buffers hold) and never read it."""
    body = noise_png(side)
    head = (
        f"POST /translate/{direction}?max_side={side} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(_address(url))
        s.sendall(head + body)
        socks.append(s)
    time.sleep(hold_s)
    metrics = httpx.get(url + "/metrics", timeout=30).text
    counted = re.search(r"^dclgan_request_memory_bytes (\S+)$", metrics, re.MULTILINE)
    during = probe_ok(url, direction)
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            while s.recv(1 << 20):  # drain what the kernel holds: an empty read is the server's close
                pass
            closed += 1
        except (BlockingIOError, OSError):
            pass
        s.close()
    return {
        "clients": count,
        "upload_mb": round(len(body) / 2**20, 1),
        "held_s": hold_s,
        "budget_counted_mb": round(float(counted.group(1)) / 2**20, 1) if counted else None,
        "closed_by_server": closed,
        "normal_request_ok": during,
    }


ATTACKS: dict[str, Callable[[str, str], dict[str, Any]]] = {
    "8 concurrent 16-bit PNG bombs (5000x5000)": attack_bombs,
    "/batch of 8 PNG bombs": attack_batch,
    "truncated JPEG declaring 5000x5000": attack_truncated,
    "1,100 half-sent request headers (fd limit 1,024)": attack_slow_headers,
    "body trickled 1 byte/s": attack_trickle,
    "100 unfinished 10 MiB bodies": attack_held_bodies,
    "12 clients never reading a 1448x1448 translation": attack_unread_responses,
}


def machine() -> dict[str, Any]:
    info = Path("/proc/cpuinfo").read_text()
    model = re.search(r"model name\s*:\s*(.+)", info)
    flags = re.search(r"flags\s*:\s*(.+)", info)
    return {
        "nproc": os.cpu_count(),
        "cpu": model.group(1) if model else platform.processor(),
        "flags": " ".join(f for f in (flags.group(1).split() if flags else []) if f.startswith(("avx", "amx", "fma"))),
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose service to attack")
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--direction", default="horse2zebra")
    parser.add_argument("--only", default="", help="comma-separated attack numbers (1-based); default all")
    parser.add_argument("--nofile", type=int, default=1024, help="the server's file-descriptor limit")
    parser.add_argument("--env", action="append", default=[], help="DCLGAN_KEY=VALUE for the server")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    chosen = {int(i) for i in args.only.split(",") if i} or set(range(1, len(ATTACKS) + 1))
    settings = dict(kv.split("=", 1) for kv in args.env)
    results: dict[str, Any] = {"machine": machine(), "code": str(args.code), "settings": settings, "attacks": {}}
    log = args.out.with_suffix(".server.log")
    with server(args.code.resolve(), args.models.resolve(), log, args.nofile, settings) as (url, proc):
        idle = rss_mb(proc.pid)
        results["idle_rss_mb"] = round(idle, 1)
        for number, (name, attack) in enumerate(ATTACKS.items(), 1):
            if number not in chosen:
                continue
            with Sampler(proc.pid) as sampler:
                outcome = attack(url, args.direction)
            time.sleep(2)
            after = round(rss_mb(proc.pid), 1) if proc.poll() is None else None
            outcome.update(peak_rss_mb=round(sampler.peak, 1), rss_after_mb=after)
            results["attacks"][name] = outcome
            emit(f"{name}: {json.dumps(outcome)}")
        log_mb = log.stat().st_size / 1e6
    results["log_mb"] = round(log_mb, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    emit(json.dumps(results))


if __name__ == "__main__":
    main()
