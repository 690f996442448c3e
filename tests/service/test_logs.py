"""``DCLGAN_LOG_FORMAT``: text stays as it was; json makes every record one JSON line, and each request's
access record carries its id, route, status and stage times as fields (the same times as ``Server-Timing``)."""

from __future__ import annotations

import io
import json
import logging
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_server import png, raw, run_server
from service_fakes import Fakes, running_app, write_fake_repo

from service import logs
from service.config import Settings

TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"


@pytest.fixture
def root_output() -> Iterator[io.StringIO]:
    """The root logger writing, at INFO, only to a text handler on a string (as ``basicConfig`` sets it up);
    the root logger's handlers and level are restored afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root.handlers = [handler]
    root.setLevel(logging.INFO)  # setLevel, not assignment: it clears the loggers' cached isEnabledFor answers
    try:
        yield out
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)


def records(text: str) -> list[dict[str, Any]]:
    """Every line as JSON (fails on a line that is not)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_mode_makes_every_record_one_json_line(root_output: io.StringIO) -> None:
    logs.configure("json")
    log = logging.getLogger("service.example")
    log.info("served %s", "a2b", extra={"status": 200})
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        log.exception("it failed")
    first, second = records(root_output.getvalue())
    assert {k: first[k] for k in ("level", "logger", "message", "status")} == {
        "level": "INFO",
        "logger": "service.example",
        "message": "served a2b",
        "status": 200,
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00", first["time"])
    assert second["level"] == "ERROR" and "ValueError: bad\nvalue" in second["exc_info"]


def test_text_mode_leaves_the_lines_as_they_were(root_output: io.StringIO) -> None:
    logs.configure("text")
    logging.getLogger("service.example").info("served %s", "a2b", extra={"status": 200})
    assert root_output.getvalue() == "INFO service.example: served a2b\n"


def server_timing(header: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r"(\w+);dur=([\d.]+)", header)}


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_each_request_logs_one_access_record_with_its_stage_times(
    root_output: io.StringIO, tmp_path: Path, anyio_backend: str
) -> None:
    logs.configure("json")
    fakes = Fakes()
    async with running_app(Settings(models_dir=write_fake_repo(tmp_path / "models")), fakes.factory) as (_, c):
        start = len(root_output.getvalue())
        translated = await c.post("/translate/a2b", **raw(png((24, 16)), **{"x-request-id": "req-1"}))
        health = await c.get("/healthz", headers={"x-request-id": "req-2"})
        missing = await c.post("/translate/nope", **raw(png((8, 8)), **{"x-request-id": "req-3"}))
    assert (translated.status_code, health.status_code, missing.status_code) == (200, 200, 404)
    access = {r["request_id"]: r for r in records(root_output.getvalue()[start:]) if r["logger"] == "service.access"}
    assert sorted(access) == ["req-1", "req-2", "req-3"]

    one = access["req-1"]
    assert {k: one[k] for k in ("method", "path", "route", "direction", "status", "batch_size")} == {
        "method": "POST",
        "path": "/translate/a2b",
        "route": "/translate/{direction}",
        "direction": "a2b",
        "status": 200,
        "batch_size": 1,
    }
    timing = server_timing(translated.headers["server-timing"])
    assert sorted(timing) == ["compute", "decode", "encode", "queue"]
    for stage, ms in timing.items():
        assert one[f"{stage}_ms"] == pytest.approx(ms, abs=0.06), stage  # the header rounds to 0.1 ms
    assert one["duration_ms"] >= sum(timing.values()) - 0.2
    assert "trace_id" not in one  # tracing is off (no OTLP endpoint): no trace, no id (test_tracing.py has it on)

    for rid, route, status in (("req-2", "/healthz", 200), ("req-3", "/translate/{direction}", 404)):
        line = access[rid]
        assert (line["route"], line["status"]) == (route, status)
        assert not {"direction", "batch_size", "queue_ms", "compute_ms", "decode_ms", "encode_ms"} & set(line)


def test_the_server_logs_only_json_lines_with_log_format_json(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()  # the gated runners compute while it exists
    log = tmp_path / "server.log"
    with run_server(write_fake_repo(tmp_path / "models"), log, gate=gate, log_format="json") as server:
        assert server.post("/translate/b2a", **raw(png((16, 16)), **{"x-request-id": "e2e-1"})).status_code == 200
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
    lines = records(log.read_text())  # uvicorn's own records included
    assert {"uvicorn.error", "service.serve", "service.access"} <= {line["logger"] for line in lines}
    assert not any("color_message" in line for line in lines)  # uvicorn's copy with terminal colours
    (access,) = [line for line in lines if line.get("request_id") == "e2e-1"]
    assert (access["route"], access["direction"], access["status"]) == ("/translate/{direction}", "b2a", 200)
