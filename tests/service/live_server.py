"""A live server for tests: ``python -m service`` under uvicorn on a free 127.0.0.1 port.

Shared by the end-to-end tests (``test_server.py``) and the schemathesis run (``test_schema.py``).
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from service_fakes import sample

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


GATED_SERVE = Path(__file__).resolve().parent / "gated_serve.py"


def spawn_server(
    models: Path, log: Path, *, gate: Path | None = None, **settings: object
) -> subprocess.Popen[bytes]:
    """``python -m service`` on a free port (DCLGAN_PORT=0), its output going to ``log``.

    With ``gate``, the service runs ``gated_serve.py`` instead: its runners compute only while the file
    ``gate`` exists (see there).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCLGAN_")}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        OMP_WAIT_POLICY="PASSIVE",
        DCLGAN_MODELS_DIR=str(models),
        DCLGAN_PORT="0",
        DCLGAN_INTRA_OP_THREADS="1",
        DCLGAN_INSTANCES_PER_DEVICE="1",  # gated runners hold a direction's one instance; override to test two
        DCLGAN_HOST="127.0.0.1",
    )
    env.update({f"DCLGAN_{key.upper()}": str(value) for key, value in settings.items()})
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "service"] if gate is None else [sys.executable, str(GATED_SERVE), str(gate)],
            cwd=REPO_ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


@contextmanager
def run_server(models: Path, log: Path, *, gate: Path | None = None, **settings: object) -> Iterator[Server]:
    """Start the service (the URL is read from its log) and wait until it is ready."""
    process = spawn_server(models, log, gate=gate, **settings)
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
