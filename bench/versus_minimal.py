"""The service against the 20-line FastAPI app (bench/minimal_app.py) on the same ONNX file and image.

    python bench/versus_minimal.py --seconds 20 [--code DIR] [--env DCLGAN_INTRA_OP_THREADS=2 ...]

Starts each server in turn on 127.0.0.1 (the service from ``--code``, default this checkout), then for
each: p50 latency with one client (closed loop), throughput with ``--clients`` clients (closed loop,
the server saturated), and the server process's CPU seconds per request at one client (from
``/proc/PID/stat``), which is the request path's cost on top of the same inference. Prints a table and
one JSON line; records the machine (nproc, CPU model, flags).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from attack import machine  # type: ignore[import-not-found]
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def emit(line: str) -> None:
    print(line, flush=True)


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


@contextmanager
def launched(cmd: list[str], env: dict[str, str], log: Path, url_pattern: str) -> Iterator[tuple[str, int]]:
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=sink, cwd=REPO)
    try:
        deadline = time.monotonic() + 120
        while not (m := re.search(url_pattern, log.read_text(errors="replace"))):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{cmd} did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield m.group(1), proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


async def closed_loop(url: str, body: bytes, clients: int, seconds: float) -> tuple[int, list[float], int]:
    """``clients`` clients sending ``body`` back to back for ``seconds``: (successes, latencies, errors)."""
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.monotonic() < stop:
            start = time.perf_counter()
            r = await http.post(url, content=body, headers={"content-type": "image/jpeg"})
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return len(latencies), latencies, errors


def measure(url: str, pid: int, body: bytes, clients: int, seconds: float) -> dict[str, Any]:
    asyncio.run(closed_loop(url, body, 1, 2.0))  # warm
    cpu0 = cpu_s(pid)
    n1, lat1, _ = asyncio.run(closed_loop(url, body, 1, seconds))
    cpu_per_request = (cpu_s(pid) - cpu0) / max(n1, 1)
    start = time.monotonic()
    n, _, errors = asyncio.run(closed_loop(url, body, clients, seconds))
    elapsed = time.monotonic() - start
    return {
        "p50_ms_1_client": round(statistics.median(lat1) * 1000, 1),
        "cpu_ms_per_request_1_client": round(cpu_per_request * 1000, 1),
        f"img_per_s_{clients}_clients": round(n / elapsed, 3),
        "errors": errors,
    }


def jpeg(side: int) -> bytes:
    yy, xx = np.mgrid[0:side, 0:side] / max(side - 1, 1)
    noise = np.random.default_rng(0).normal(0, 12, (side, side, 3))
    rgb = np.clip(np.stack([xx * 200 + 30, yy * 180 + 40, (1 - xx) * 150 + 50], -1) + noise, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=REPO)
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--model", default="horse2zebra")
    parser.add_argument("--direction", default="horse2zebra")
    parser.add_argument("--sizes", default="64,256")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service")
    parser.add_argument("--logs", type=Path, default=Path("runs"))
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("DCLGAN_")}
    base.update(OMP_WAIT_POLICY="PASSIVE")
    service_env = {
        **base,
        "PYTHONPATH": str(args.code.resolve()),
        "DCLGAN_MODELS_DIR": str(args.models.resolve()),
        "DCLGAN_PORT": "0",
        **dict(kv.split("=", 1) for kv in args.env),
    }
    onnx = args.models.resolve() / args.model / f"{args.direction}.onnx"
    minimal_env = {**base, "PYTHONPATH": f"{REPO / 'bench'}:{args.code.resolve()}", "MINIMAL_ONNX": str(onnx)}
    servers = {
        "dclgan-serve": (
            [sys.executable, "-m", "service"],
            service_env,
            r"dclgan-serve at (http://\S+)",
        ),
        "20-line FastAPI": (
            [sys.executable, "-m", "uvicorn", "minimal_app:app", "--host", "127.0.0.1", "--port", "0"],
            minimal_env,
            r"Uvicorn running on (http://\S+) ",
        ),
    }
    results: dict[str, Any] = {"machine": machine(), "service_env": args.env, "rows": []}
    for side in (int(s) for s in args.sizes.split(",")):
        body = jpeg(side)
        for name, (cmd, env, pattern) in servers.items():
            with launched(cmd, env, args.logs / f"versus-{name.split()[0]}.log", pattern) as (url, pid):
                if name == "dclgan-serve":
                    while httpx.get(url + "/readyz", timeout=10).status_code != 200:
                        time.sleep(0.1)
                numbers = measure(f"{url}/translate/{args.direction}", pid, body, args.clients, args.seconds)
                row = {"server": name, "side": side, **numbers}
            results["rows"].append(row)
            emit(json.dumps(row))
    emit(json.dumps(results))


if __name__ == "__main__":
    main()
