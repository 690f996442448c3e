"""Schemathesis against the real server: every check, bounded in examples and time.

The server is ``python -m service`` under uvicorn (with runners held at an open gate, so each request
is cheap), and schemathesis reads its ``/openapi.json``: the document must describe every status,
header and body the server really sends, and no generated request may get a 500.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from live_server import run_server
from service_fakes import write_fake_repo

from tests.requires import unavailable

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parent / "schemathesis.toml"
EXAMPLES_PER_OPERATION = 40
TIME_LIMIT_S = 240


def test_the_server_conforms_to_its_openapi_document(tmp_path: Path) -> None:
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        unavailable("schemathesis is not installed (it is in the `dev` extra)")
    gate = tmp_path / "gate"
    gate.touch()
    with run_server(write_fake_repo(tmp_path / "models"), tmp_path / "server.log", gate=gate) as server:
        done = subprocess.run(
            [
                cli,
                "--config-file",
                str(CONFIG),
                "run",
                f"{server.url}/openapi.json",
                "--checks",
                "all",
                "--max-examples",
                str(EXAMPLES_PER_OPERATION),
                "--seed",
                "1",
                "--workers",
                "1",
                "--request-timeout",
                "30",
                "--generation-database",
                "none",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=TIME_LIMIT_S,
            cwd=tmp_path,  # schemathesis keeps a crash cache in its working directory
        )
    assert done.returncode == 0, done.stdout[-12000:] + done.stderr[-3000:]
