"""Where the service's CPU goes per request: py-spy samples the running server while one client sends the
same small JPEG back to back, and each sample is put in the part of the request path it was spent in.

    runs/compare-venv/bin/pip install py-spy   # a sampling profiler, outside the project's dependencies
    python bench/profile_request.py --side 64 --seconds 20 [--env DCLGAN_X=Y ...]

py-spy reads the server's stacks from outside (``--nonblocking``, so the server is not paused) and keeps
only threads holding the GIL (``--gil``): Python code at work, not threads waiting in epoll, on a condition
or in onnxruntime (which releases the GIL), whose waits py-spy cannot always tell from work. A sample is
counted in the first part found walking its stack from the innermost frame out (a log line written from
the middleware counts as logging). Prints one JSON line: the server's user and system CPU milliseconds per
request (from ``/proc``), the GIL-holding milliseconds per request (samples / rate / requests) and each
part's share of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from attack import machine  # type: ignore[import-not-found]
from versus_minimal import TICKS, Server, closed_loop, free_port, jpeg, launched  # type: ignore[import-not-found]

REPO = Path(__file__).resolve().parents[1]

# (part, a pattern on one "function (file:line)" frame); the first part matching from the leaf out wins.
PARTS = [
    ("inference (onnxruntime/OpenVINO run)", r"^(OnnxRunner|OpenVinoRunner|WidthAdaptiveRunner)\.run \("),
    ("decode + prepare (service.imaging)", r"(^|\.)(probe_image|decode_image|check_jpeg|to_input|prepare|to_rgb) \("),
    ("encode (service.imaging)", r"(^|\.)(encode_image|from_output|finish) \("),
    ("logging (access log, formatters, handlers)", r"logging/|service/logs\.py"),
    ("metrics (prometheus_client)", r"prometheus_client/"),
    ("tracing spans", r"service/api/spans\.py|opentelemetry/"),
    ("middlewares (request id, body limit, headers)", r"service/api/middleware\.py"),
    ("worker thread, batcher, futures", r"service/(workers|batching)\.py|concurrent/futures"),
    ("thread hand-offs (anyio pool, wakeups)", r"anyio/|threading\.py|queue\.py|call_soon_threadsafe"),
    ("route handler and dependencies (service.api)", r"service/api/|service/admission\.py|service/state\.py"),
    ("FastAPI/Starlette routing, request, response", r"fastapi/|starlette/"),
    ("HTTP parsing and writing (uvicorn, h11)", r"uvicorn/|h11/|service/connections\.py"),
    ("asyncio event loop", r"asyncio/"),
]


def part_of(stack: str) -> str:
    frames = stack.split(";")[::-1]  # innermost first
    for frame in frames:
        for name, pattern in PARTS:
            if re.search(pattern, frame):
                return name
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--direction", default="horse2zebra")
    parser.add_argument("--py-spy", type=Path, default=REPO / "runs" / "compare-venv" / "bin" / "py-spy")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the service")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "profile-request.txt")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCLGAN_")}
    env.update(OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO), DCLGAN_MODELS_DIR=str(REPO / "models"))
    env.update(dict(kv.split("=", 1) for kv in args.env))
    body, port = jpeg(args.side), free_port()
    url = f"http://127.0.0.1:{port}/translate/{args.direction}"
    server = Server([sys.executable, "-m", "service"], env)
    with launched(server, port, url, body, args.out.with_suffix(".server.log")) as pid:
        asyncio.run(closed_loop(url, body, False, 1, 2.0, 10_000))  # warm
        spy = subprocess.Popen(
            [str(args.py_spy), "record", "-p", str(pid), "--nonblocking", "--format", "raw", "--rate", str(args.rate),
             "--gil", "--duration", str(int(args.seconds)), "-o", str(args.out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)  # py-spy attached
        user0, sys0 = user_system_s(pid)
        latencies, errors = asyncio.run(closed_loop(url, body, False, 1, args.seconds - 2, 100_000))
        user1, sys1 = user_system_s(pid)
        spy.wait(args.seconds + 30)
    n = max(len(latencies), 1)
    parts: Counter[str] = Counter()
    for line in args.out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        parts[part_of(stack)] += int(count)
    total = sum(parts.values())
    # The samples cover the whole py-spy window; the requests only the client's: scale to requests per second.
    gil_ms = total / args.rate * 1000 / (n * args.seconds / (args.seconds - 2))
    print(json.dumps({
        "machine": machine(), "side": args.side, "requests": len(latencies), "errors": errors,
        "user_cpu_ms_per_request": round((user1 - user0) * 1000 / n, 2),
        "system_cpu_ms_per_request": round((sys1 - sys0) * 1000 / n, 2),
        "gil_held_ms_per_request": round(gil_ms, 2), "service_env": args.env,
        "parts": {name: {"share": round(k / total, 3), "gil_ms_per_request": round(k / total * gil_ms, 3)}
                  for name, k in parts.most_common()},
    }), flush=True)  # fmt: skip


def user_system_s(pid: int) -> tuple[float, float]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


if __name__ == "__main__":
    main()
