"""SIGHUP reloads the model repository of a real server (``python -m service`` under uvicorn), and its
handler is in place from before the first load until the server has stopped.

The runners compute only while a gate file exists (``gated_serve.py``), so the requests in flight at the
switch are a fact, not a race with the machine's speed. Waits are bounded polls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import uvicorn
from live_server import Server, png, raw, run_server
from service_fakes import StampRunner, Stamps, write_fake_repo

from service.config import Settings
from service.main import create_app
from service.repository import MODEL_JSON, LoadedModel
from service.serve import DrainingServer

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


def test_sighup_is_handled_from_before_the_first_load_and_the_previous_handler_comes_back(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGHUP while the models load is the server's (a reload, refused as not ready or run once the load is
    done), not the end of the process; once the server has stopped, SIGHUP goes to the handler installed
    before it (here one that records)."""
    received: list[int] = []
    stamps = Stamps()

    def hangup_during_load(model: LoadedModel, direction: str, device: str) -> StampRunner:
        if not stamps.warming and not received:
            signal.raise_signal(signal.SIGHUP)
        return stamps.factory(model, direction, device)

    app = create_app(Settings(models_dir=repo), runner_factory=hangup_during_load)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on")
    server = DrainingServer(config, app.state.service, app.state.lifecycle)

    async def serve_until_started() -> None:
        serving = asyncio.ensure_future(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        server.should_exit = True
        await serving

    previous = signal.signal(signal.SIGHUP, lambda sig, frame: received.append(sig))
    try:
        with caplog.at_level(logging.INFO, logger="service"):
            asyncio.run(serve_until_started())
        after = signal.getsignal(signal.SIGHUP)
        signal.raise_signal(signal.SIGHUP)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert "reload requested by SIGHUP" in caplog.text  # not by the recording handler, nor the default action
    assert received == [signal.SIGHUP] and after is not None  # only the signal sent after the stop
