"""The service against a 20-line FastAPI app, LitServe and Ray Serve, all serving the same ONNX file with the
same thread settings, decode and PNG encode (bench/same_work.py), side by side in one run.

    python3 -m venv runs/compare-venv   # LitServe and Ray Serve are benchmark tools, not project dependencies
    runs/compare-venv/bin/pip install litserve python-multipart 'ray[serve]' onnxruntime pillow numpy simplejpeg
    python bench/versus_minimal.py --rounds 2 --seconds 8 [--servers ...] [--env DCLGAN_X=Y ...] [--variant L=DIR]

Each round starts every server in turn on 127.0.0.1 (the round after in the reverse order, so that a drift in
the machine's load falls on all of them alike) and, for each image size, measures: p50 latency with one
client (closed loop), the CPU seconds per request of the server's whole process tree at one client (from
``/proc``; Ray's and LitServe's helper processes included), and throughput with ``--clients`` clients (closed
loop, the server saturated). Every measurement is bounded by ``--seconds`` and ``--max-requests``. The
service runs from ``--code`` (default this checkout) in this interpreter's venv, with the onnxruntime engine
the others use, and as deployed by default (``DCLGAN_ENGINE=auto``: the faster of OpenVINO and onnxruntime
on a probe image at start, where OpenVINO is installed); LitServe and
Ray Serve run in ``--compare-python``'s venv; ``--variant`` adds the service from another source tree (a
proposed change), on onnxruntime. Prints one JSON line per measurement, then a table of the
medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from attack import machine  # type: ignore[import-not-found]
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Server:
    """How to start one server: ``cmd`` with ``env`` (``COMPARE_PORT`` or ``DCLGAN_PORT`` added at start)."""

    cmd: list[str]
    env: dict[str, str]
    multipart: bool = False  # LitServe reads a form, the others the raw body


def emit(line: str) -> None:
    print(line, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_tree(root: int) -> list[int]:
    """``root`` and every process descending from it, from ``/proc``'s parent links."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children[pid])
    return tree


def tree_cpu_s(root: int) -> float:
    """User + system CPU seconds of ``root``'s process tree, reaped children included."""
    total = 0
    for pid in process_tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return total / TICKS


@contextmanager
def launched(server: Server, port: int, url: str, body: bytes, log: Path) -> Iterator[int]:
    """Start ``server``, wait until it translates ``body``, yield its pid; stop its whole tree afterwards."""
    env = {**server.env, "COMPARE_PORT": str(port), "DCLGAN_PORT": str(port)}
    with log.open("wb") as sink:
        proc = subprocess.Popen(server.cmd, env=env, stdout=sink, stderr=sink, cwd=BENCH, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not ready(url, body, server.multipart):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{server.cmd} did not start:\n{log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        yield proc.pid
    finally:
        tree = process_tree(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        for pid in tree[1:]:  # helpers that outlived their parent (Ray's actors)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def ready(url: str, body: bytes, multipart: bool) -> bool:
    try:
        return post(httpx, url, body, multipart).status_code == 200  # type: ignore[arg-type]
    except httpx.TransportError:
        return False


def post(http: httpx.Client, url: str, body: bytes, multipart: bool) -> httpx.Response:
    if multipart:
        return http.post(url, files={"image": ("image.jpg", body, "image/jpeg")}, timeout=300)
    return http.post(url, content=body, headers={"content-type": "image/jpeg"}, timeout=300)


async def closed_loop(
    url: str, body: bytes, multipart: bool, clients: int, seconds: float, max_requests: int
) -> tuple[list[float], int]:
    """``clients`` clients sending ``body`` back to back for ``seconds`` or ``max_requests`` in all:
    (latencies of the successes, errors)."""
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + seconds
    raw = {"content": body, "headers": {"content-type": "image/jpeg"}}
    files = {"files": {"image": ("image.jpg", body, "image/jpeg")}} if multipart else raw

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.monotonic() < stop and len(latencies) + errors < max_requests:
            start = time.perf_counter()
            r = await http.post(url, **files)  # type: ignore[arg-type]
            if r.status_code == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors += 1

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, errors


def measure(url: str, pid: int, body: bytes, multipart: bool, args: argparse.Namespace) -> dict[str, Any]:
    asyncio.run(closed_loop(url, body, multipart, 1, 2.0, args.max_requests))  # warm
    cpu0 = tree_cpu_s(pid)
    lat1, errors1 = asyncio.run(closed_loop(url, body, multipart, 1, args.seconds, args.max_requests))
    cpu_per_request = (tree_cpu_s(pid) - cpu0) / max(len(lat1), 1)
    start = time.monotonic()
    latn, errors = asyncio.run(closed_loop(url, body, multipart, args.clients, args.seconds, args.max_requests))
    elapsed = time.monotonic() - start
    return {
        "p50_ms_1_client": round(statistics.median(lat1) * 1000, 1),
        "cpu_ms_per_request_1_client": round(cpu_per_request * 1000, 1),
        "img_per_s_saturated": round(len(latn) / elapsed, 2),
        "requests": len(lat1) + len(latn),
        "errors": errors1 + errors,
    }


def jpeg(side: int) -> bytes:
    yy, xx = np.mgrid[0:side, 0:side] / max(side - 1, 1)
    noise = np.random.default_rng(0).normal(0, 12, (side, side, 3))
    rgb = np.clip(np.stack([xx * 200 + 30, yy * 180 + 40, (1 - xx) * 150 + 50], -1) + noise, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def servers(args: argparse.Namespace) -> dict[str, Server]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DCLGAN_", "COMPARE_"))}
    onnx = args.models.resolve() / args.model / f"{args.direction}.onnx"
    shared = {**base, "OMP_WAIT_POLICY": "PASSIVE", "COMPARE_ONNX": str(onnx), "COMPARE_DIRECTION": args.direction}
    imaging = {**shared, "PYTHONPATH": f"{BENCH}:{REPO}"}
    service = {
        **base,
        "OMP_WAIT_POLICY": "PASSIVE",
        "PYTHONPATH": str(args.code.resolve()),
        "DCLGAN_MODELS_DIR": str(args.models.resolve()),
        **dict(kv.split("=", 1) for kv in args.env),
    }
    py, other = sys.executable, str(args.compare_python)
    uvicorn = [py, "-m", "uvicorn", "minimal_app:app", "--host", "127.0.0.1", "--port"]
    onnxruntime = {**service, "DCLGAN_ENGINE": "onnxruntime"}
    variants = {
        f"dclgan-serve {label} (onnxruntime)": Server([py, "-m", "service"], {**onnxruntime, "PYTHONPATH": code})
        for label, code in (item.split("=", 1) for item in args.variant)
    }
    for label, settings in (item.split("=", 1) for item in args.env_variant):
        env = {**onnxruntime, **dict(kv.split("=", 1) for kv in settings.split(","))}
        engine = "default engine" if env["DCLGAN_ENGINE"] == "auto" else env["DCLGAN_ENGINE"]
        variants[f"dclgan-serve {label} ({engine})"] = Server([py, "-m", "service"], env)
    return {
        "dclgan-serve (onnxruntime)": Server([py, "-m", "service"], onnxruntime),
        **variants,
        "dclgan-serve (default engine)": Server([py, "-m", "service"], service),
        "20-line FastAPI": Server(["sh", "-c", f'exec {" ".join(uvicorn)} "$COMPARE_PORT"'], imaging),
        "LitServe": Server([other, "litserve_app.py"], imaging, multipart=True),
        "Ray Serve": Server([other, "ray_app.py"], {**imaging, "RAY_USAGE_STATS_ENABLED": "0"}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", type=Path, default=REPO)
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--model", default="horse2zebra")
    parser.add_argument("--direction", default="horse2zebra")
    parser.add_argument("--sizes", default="64,256")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--max-requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--servers", default="", help="comma-separated names (default: all)")
    parser.add_argument("--compare-python", type=Path, default=REPO / "runs" / "compare-venv" / "bin" / "python")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="LABEL=DIR", help="another service source tree to compare"
    )
    parser.add_argument(
        "--env-variant", action="append", default=[], metavar="LABEL=KEY=VALUE[,KEY=VALUE]",
        help="the service (--code, onnxruntime unless DCLGAN_ENGINE is among them) with more settings, "
        "e.g. two=DCLGAN_INSTANCES_PER_DEVICE=2",
    )
    parser.add_argument("--logs", type=Path, default=REPO / "runs")
    args = parser.parse_args()
    args.logs.mkdir(parents=True, exist_ok=True)
    every = servers(args)
    chosen = [s for s in args.servers.split(",") if s] or list(every)
    bodies = {int(s): jpeg(int(s)) for s in args.sizes.split(",")}
    emit(json.dumps({"machine": machine(), "service_env": args.env, "clients": args.clients}))
    rows: list[dict[str, Any]] = []
    for round_ in range(args.rounds):
        for name in chosen if round_ % 2 == 0 else chosen[::-1]:
            server, port = every[name], free_port()
            url = f"http://127.0.0.1:{port}/translate/{args.direction}"
            log = args.logs / f"versus-{name.split()[0].lower()}.log"
            with launched(server, port, url, bodies[min(bodies)], log) as pid:
                for side, body in bodies.items():
                    row = {"round": round_, "server": name, "side": side}
                    row.update(measure(url, pid, body, server.multipart, args))
                    rows.append(row)
                    emit(json.dumps(row))
    emit("| image | server | p50 ms, 1 client | img/s, saturated | server CPU ms per request, 1 client |")
    emit("|---|---|---|---|---|")
    for side in bodies:
        for name in chosen:
            mine = [r for r in rows if r["server"] == name and r["side"] == side]
            cells = [statistics.median(r[k] for r in mine) for k in ("p50_ms_1_client", "img_per_s_saturated",
                                                                      "cpu_ms_per_request_1_client")]  # fmt: skip
            emit(f"| {side}x{side} | {name} | {cells[0]:.1f} | {cells[1]:.2f} | {cells[2]:.1f} |")


if __name__ == "__main__":
    main()
