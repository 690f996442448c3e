"""Tracing (``service/tracing.py``, ``service/api/spans.py``): a translate request's server span and stage spans,
a caller's trace continued, error statuses, the trace id in the access log, the ``OTEL_*`` switch, OTLP export
to a real HTTP endpoint, and nothing of it when no endpoint is configured."""

from __future__ import annotations

import http.server
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import service_fakes
from service_fakes import Fakes, png, raw, running_app, write_fake_repo
from test_logs import server_timing

from service.config import Settings
from service.logs import json_formatter
from service.main import create_app
from service.tracing import install_tracing, otlp_endpoint, tracer_provider
from tests.requires import require_module

HINT = "pip install -e '.[otel]' (make test installs it)"
sdk_trace = require_module("opentelemetry.sdk.trace", HINT, allow_module_level=True)
sdk_export = require_module("opentelemetry.sdk.trace.export", HINT, allow_module_level=True)
in_memory = require_module("opentelemetry.sdk.trace.export.in_memory_span_exporter", HINT, allow_module_level=True)
require_module("opentelemetry.instrumentation.fastapi", HINT, allow_module_level=True)
otel_trace = require_module("opentelemetry.trace", HINT, allow_module_level=True)
spans_module = require_module("service.api.spans", HINT, allow_module_level=True)
trace_service = require_module(
    "opentelemetry.proto.collector.trace.v1.trace_service_pb2", HINT, allow_module_level=True
)

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = ["decode", "queue", "compute", "encode"]
OTEL_SWITCHES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_SDK_DISABLED",
    "OTEL_TRACES_EXPORTER",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
)
CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the variables that switch tracing on or shape it, whatever the developer's shell has."""
    for name in OTEL_SWITCHES:
        monkeypatch.delenv(name, raising=False)


def memory_provider() -> tuple[Any, Any]:
    """A tracer provider and the in-memory exporter it hands each span to as the span ends."""
    exporter = in_memory.InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(sdk_export.SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch, no_otel_env: None) -> Iterator[Any]:
    """Every app that ``running_app`` builds in the test is traced, with ``install_tracing`` called on it as
    ``create_app`` does when an endpoint is configured, into an in-memory exporter. The environment names no
    endpoint, so nothing else traces it; spans are exported as each one ends (no batching delay)."""
    provider, exporter = memory_provider()

    def traced_app(settings: Settings, runner_factory: Any = None) -> Any:
        app = create_app(settings, runner_factory=runner_factory)
        install_tracing(app, provider)
        return app

    monkeypatch.setattr(service_fakes, "create_app", traced_app)
    yield exporter
    provider.shutdown()


async def traced_post(
    exporter: Any, tmp_path: Path, fakes: Fakes, route: str = "/translate/a2b", **request: Any
) -> tuple[httpx.Response, list[Any]]:
    """POST ``request`` to ``route`` of a traced app over fake runners; the response and its spans only
    (not the readiness polls')."""
    async with running_app(Settings(models_dir=write_fake_repo(tmp_path / "models")), fakes.factory) as (_, client):
        exporter.clear()
        response = await client.post(route, **request)
    return response, list(exporter.get_finished_spans())


def server_span(spans: list[Any]) -> Any:
    (server,) = [span for span in spans if span.kind == otel_trace.SpanKind.SERVER]
    return server


def status_code(server: Any) -> Any:
    """The HTTP status on a server span, under the stable name (``OTEL_SEMCONV_STABILITY_OPT_IN=http``) or the
    old one (the instrumentation's default)."""
    return server.attributes.get("http.response.status_code", server.attributes.get("http.status_code"))


@pytest.mark.anyio
async def test_a_translation_is_a_server_span_with_its_stage_spans(spans: Any, tmp_path: Path) -> None:
    body = raw(png((24, 16)))
    body["headers"]["x-request-id"] = "req-1"
    response, finished = await traced_post(spans, tmp_path, Fakes(), **body)
    assert response.status_code == 200
    server = server_span(finished)
    assert server.name == "POST /translate/{direction}"
    assert server.parent is None  # no traceparent: a trace of its own
    assert server.attributes["http.route"] == "/translate/{direction}"
    assert status_code(server) == 200
    expected = {"dclgan.request_id": "req-1", "dclgan.direction": "a2b", "dclgan.model.version": "7"}
    assert {key: server.attributes.get(key) for key in expected} == expected

    stages = {span.name: span for span in finished if span is not server}
    assert len(finished) == 1 + len(STAGES) and sorted(stages) == sorted(STAGES)  # no receive/send spans either
    timing = server_timing(response.headers["server-timing"])
    image = {**expected, "dclgan.image.width": 24, "dclgan.image.height": 16}
    previous_end = server.start_time
    for name in STAGES:
        span = stages[name]
        assert span.context.trace_id == server.context.trace_id and span.parent.span_id == server.context.span_id
        assert dict(span.attributes) == {**image, **({"dclgan.batch.size": 1} if name == "compute" else {})}
        assert (span.end_time - span.start_time) / 1e6 == pytest.approx(timing[name], abs=0.06), name
        assert previous_end <= span.start_time <= span.end_time  # measured, in order, inside the server span
        previous_end = span.end_time
    assert previous_end <= server.end_time
    assert stages["queue"].end_time == stages["compute"].start_time  # the batch started as its wait ended


@pytest.mark.anyio
async def test_a_batch_request_has_stage_spans_for_each_image(spans: Any, tmp_path: Path) -> None:
    sizes = [(24, 16), (12, 20)]
    files = [("images", (f"{i}.png", png(size, seed=i), "image/png")) for i, size in enumerate(sizes)]
    response, finished = await traced_post(spans, tmp_path, Fakes(), route="/translate/a2b/batch", files=files)
    assert response.status_code == 200
    server = server_span(finished)
    stages = [span for span in finished if span is not server]
    assert len(stages) == len(sizes) * len(STAGES)
    for index, (width, height) in enumerate(sizes):
        mine = [span for span in stages if span.attributes["dclgan.image.index"] == index]
        assert sorted(span.name for span in mine) == sorted(STAGES)
        assert {(span.attributes["dclgan.image.width"], span.attributes["dclgan.image.height"]) for span in mine} == {
            (width, height)
        }
        assert all(span.parent.span_id == server.context.span_id for span in mine)


@pytest.mark.anyio
async def test_a_callers_traceparent_is_continued(spans: Any, tmp_path: Path) -> None:
    body = raw(png())
    body["headers"]["traceparent"] = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    response, finished = await traced_post(spans, tmp_path, Fakes(), **body)
    assert response.status_code == 200
    server = server_span(finished)
    assert (format(server.parent.span_id, "016x"), server.parent.is_remote) == (CALLER_SPAN, True)
    assert {format(span.context.trace_id, "032x") for span in finished} == {CALLER_TRACE}
    assert len(finished) == 1 + len(STAGES)


@pytest.mark.anyio
async def test_a_bad_image_records_its_400_and_no_stage(spans: Any, tmp_path: Path) -> None:
    response, finished = await traced_post(spans, tmp_path, Fakes(), **raw(png((64, 64))[:300]))
    assert response.status_code == 400
    (server,) = finished
    assert status_code(server) == 400
    assert server.attributes["dclgan.direction"] == "a2b"
    # A client's error is not the server's: the span's status stays unset (OpenTelemetry's HTTP conventions).
    assert server.status.status_code == otel_trace.StatusCode.UNSET


@pytest.mark.anyio
async def test_an_inference_failure_marks_the_server_span_as_an_error(spans: Any, tmp_path: Path) -> None:
    fakes = Fakes()
    fakes.fail = RuntimeError("cannot allocate")
    response, finished = await traced_post(spans, tmp_path, fakes, **raw(png()))
    assert response.status_code == 500
    (server,) = finished
    assert status_code(server) == 500
    assert server.status.status_code == otel_trace.StatusCode.ERROR


@pytest.fixture
def access_lines() -> Iterator[list[dict[str, Any]]]:
    """The access log's records as the JSON log writes them (``DCLGAN_LOG_FORMAT=json``), parsed back."""
    lines: list[dict[str, Any]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(self.format(record)))

    handler = Collect()
    handler.setFormatter(json_formatter())
    access = logging.getLogger("service.access")
    saved_level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        access.removeHandler(handler)
        access.setLevel(saved_level)


def access_line(lines: list[dict[str, Any]], request_id: str) -> dict[str, Any]:
    (line,) = [line for line in lines if line["request_id"] == request_id]
    return line


@pytest.mark.anyio
async def test_the_json_access_line_carries_the_trace_id(
    spans: Any, tmp_path: Path, access_lines: list[dict[str, Any]]
) -> None:
    body = raw(png())
    body["headers"]["x-request-id"] = "req-9"
    _, finished = await traced_post(spans, tmp_path, Fakes(), **body)
    assert access_line(access_lines, "req-9")["trace_id"] == format(server_span(finished).context.trace_id, "032x")


@pytest.mark.anyio
async def test_an_unsampled_callers_trace_records_nothing_but_logs_its_id(
    spans: Any, tmp_path: Path, access_lines: list[dict[str, Any]]
) -> None:
    body = raw(png())
    body["headers"].update({"x-request-id": "req-10", "traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"})
    response, finished = await traced_post(spans, tmp_path, Fakes(), **body)
    assert response.status_code == 200 and finished == []
    assert access_line(access_lines, "req-10")["trace_id"] == CALLER_TRACE


@pytest.mark.anyio
async def test_a_request_that_never_completes_its_response_still_gets_its_attributes() -> None:
    """An error after the response started escapes every handler (only its headers went out): the server span
    ends as the exception leaves, and must carry the request's facts all the same."""
    provider, exporter = memory_provider()
    tracer = provider.get_tracer("test")

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        scope["state"].update(request_id="req-11", direction="a2b")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-model-version", b"3")]})
        raise RuntimeError("lost half-way")

    async def send(message: dict[str, Any]) -> None:
        pass

    middleware = spans_module.StageSpansMiddleware(app, tracer)
    with tracer.start_as_current_span("server", kind=otel_trace.SpanKind.SERVER) as server:
        with pytest.raises(RuntimeError):
            await middleware({"type": "http"}, send, send)
    expected = {"dclgan.request_id": "req-11", "dclgan.direction": "a2b", "dclgan.model.version": "3"}
    assert {key: server.attributes.get(key) for key in expected} == expected
    assert [span.name for span in exporter.get_finished_spans()] == ["server"]


@pytest.mark.anyio
async def test_an_untraced_request_passes_through_with_no_trace_id() -> None:
    """No server span around it (an excluded URL, ``OTEL_PYTHON_FASTAPI_EXCLUDED_URLS``): no span, no id."""
    provider, exporter = memory_provider()
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(dict(scope.get("state", {})))

    await spans_module.StageSpansMiddleware(app, provider.get_tracer("test"))({"type": "http"}, None, None)
    assert seen == [{}] and exporter.get_finished_spans() == ()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": " "}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, "http://collector:4318"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4318/v1/traces"}, "http://traces:4318/v1/traces"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://any:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x"},
            "http://t:1/x",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "TRUE"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "false"}, "http://c:4318"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "otlp"}, "http://c:4318"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, None),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "http://c:4318",
        ),
    ],
)
def test_the_otel_variables_switch_tracing(environ: dict[str, str], expected: str | None) -> None:
    assert otlp_endpoint(environ) == expected


class _Collector(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector's trace endpoint that keeps each request's path, content type and body."""

    received: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((self.path, self.headers["content-type"], body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:  # keep the test's output clean
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A local OTLP/HTTP endpoint (its base URL) and what it received."""
    received: list[tuple[str, str, bytes]] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


def test_the_provider_exports_to_the_configured_endpoint_over_otlp_http(
    monkeypatch: pytest.MonkeyPatch, no_otel_env: None, collector: tuple[str, list[tuple[str, str, bytes]]]
) -> None:
    assert tracer_provider() is None
    url, received = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    provider = tracer_provider()
    assert provider is not None
    try:
        provider.get_tracer("test").start_span("probe").end()
        assert provider.force_flush(10_000)
    finally:
        provider.shutdown()
    ((path, content_type, body),) = received
    assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
    request = trace_service.ExportTraceServiceRequest.FromString(body)
    (resource_spans,) = request.resource_spans
    resource = {attr.key: attr.value.string_value for attr in resource_spans.resource.attributes}
    assert (resource["service.name"], resource["deployment.environment"]) == ("dclgan-serve", "test")
    assert [span.name for scope in resource_spans.scope_spans for span in scope.spans] == ["probe"]


@pytest.mark.anyio
async def test_create_app_traces_to_the_configured_endpoint(
    monkeypatch: pytest.MonkeyPatch, no_otel_env: None, collector: tuple[str, list[tuple[str, str, bytes]]],
    tmp_path: Path,
) -> None:
    """The endpoint in the environment is all it takes: create_app installs tracing, and a translation's server
    span and stage spans reach the collector over OTLP/HTTP."""
    url, received = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # milliseconds between the batch processor's exports
    async with running_app(Settings(models_dir=write_fake_repo(tmp_path / "models")), Fakes().factory) as (_, client):
        assert (await client.post("/translate/a2b", **raw(png()))).status_code == 200
        names: set[str] = set()
        for _ in range(200):  # the exports arrive on the processor's thread; bounded wait, no timing asserted
            for _, _, body in list(received):
                request = trace_service.ExportTraceServiceRequest.FromString(body)
                names |= {
                    span.name for rs in request.resource_spans for scope in rs.scope_spans for span in scope.spans
                }
            if set(STAGES) <= names:
                break
            await anyio.sleep(0.05)
    assert set(STAGES) <= names and any(name.startswith("POST /translate") for name in names), names


def test_otel_service_name_overrides_ours(monkeypatch: pytest.MonkeyPatch, no_otel_env: None) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "zebra-maker")
    provider = tracer_provider()
    assert provider is not None
    provider.shutdown()
    assert provider.resource.attributes["service.name"] == "zebra-maker"


_OFF_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
sys.path.insert(0, "tests/service")
import fastapi  # from 0.16x its native telemetry imports opentelemetry-api, whatever the app does
before = {name for name in sys.modules if name.startswith("opentelemetry")}
import service_fakes
from service_fakes import Fakes, png, raw, running_app, write_fake_repo
from service.config import Settings

async def main(models):
    async with running_app(Settings(models_dir=write_fake_repo(models)), Fakes().factory) as (app, client):
        for _ in range(3):
            assert (await client.post("/translate/a2b", **raw(png()))).status_code == 200
    return [m.cls.__name__ for m in app.user_middleware]

middleware = asyncio.run(main(Path(sys.argv[1])))
imported = sorted({name for name in sys.modules if name.startswith("opentelemetry")} - before)
print(json.dumps({"imported": imported, "spans": "service.api.spans" in sys.modules, "middleware": middleware}))
"""


@pytest.mark.slow
def test_with_no_endpoint_nothing_of_opentelemetry_is_imported_or_run(tmp_path: Path) -> None:
    """In a fresh interpreter, an app from create_app serving translations with no OTEL endpoint:
    not one OpenTelemetry module more than FastAPI imports itself, and none of our tracing middleware."""
    environ = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", _OFF_SCRIPT, str(tmp_path / "models")],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["imported"] == [] and not report["spans"]
    assert "RequestContextMiddleware" in report["middleware"]  # the app's own middleware is there
    assert "StageSpansMiddleware" not in report["middleware"]
