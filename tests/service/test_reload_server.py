"""SIGHUP reloads the model repository of a real server (``python -m service`` under uvicorn).

The runners compute only while a gate file exists (``gated_serve.py``), so the requests in flight at the
switch are a fact, not a race with the machine's speed. Waits are bounded polls.
"""

from __future__ import annotations

import json
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from live_server import Server, png, raw, run_server
from service_fakes import write_fake_repo

from service.repository import MODEL_JSON

pytestmark = pytest.mark.slow


def default_version(server: Server) -> str:
    (default,) = [m["version"] for m in server.get("/models").json()["models"] if m["default"]]
    return str(default)


def test_sighup_reloads_without_losing_a_request_and_a_failed_one_keeps_serving(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    models = write_fake_repo(tmp_path / "models")  # the flat layout, version 7
    card_path = models / "tiny" / MODEL_JSON
    with run_server(models, tmp_path / "server.log", gate=gate, max_batch_size=1) as server:
        gate.unlink()  # hold the runners: one request computes, the rest queue on version 7
        with ThreadPoolExecutor(30) as pool:
            first = [pool.submit(server.post, "/translate/a2b", **raw(png((16, 16), s))) for s in range(30)]
            server.wait_for(lambda: server.metric("dclgan_queue_depth", direction="a2b") == 29, "a queue")
            card = json.loads(card_path.read_text())
            card_path.write_text(json.dumps(card | {"version": "8"}))
            server.process.send_signal(signal.SIGHUP)
            server.wait_for(lambda: default_version(server) == "8", "the switch to version 8")
            assert server.get("/readyz").status_code == 200
            gate.touch()
            responses = [f.result() for f in first]
        assert [(r.status_code, r.headers["x-model-version"]) for r in responses] == [(200, "7")] * 30
        after = server.post("/translate/a2b", **raw(png((16, 16))))
        assert (after.status_code, after.headers["x-model-version"]) == (200, "8")
        server.wait_for(lambda: server.metric("dclgan_reloads_total", result="loaded") == 1, "the count")

        card_path.write_text("{")
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(lambda: server.metric("dclgan_reloads_total", result="failed") == 1, "the failed reload")
        assert "reload failed, the versions served before keep serving" in server.log.read_text()
        again = server.post("/translate/a2b", **raw(png((16, 16))))
        assert (again.status_code, again.headers["x-model-version"]) == (200, "8")
        assert server.get("/healthz").status_code == 200
