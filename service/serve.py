"""``dclgan serve`` / ``python -m service``: run the app under uvicorn, drain gracefully on SIGTERM.

One process, one event loop, a pool of model instances (serving-notes §8.6): several uvicorn workers
would each load every model and split the traffic that dynamic batching needs to see together.

Shutdown follows what load balancers and Kubernetes expect. On the first SIGTERM (or Ctrl+C) the
process keeps listening but ``/readyz`` and new translate requests answer 503 at once, while
admitted requests finish; once none is left uvicorn shuts down and the process exits 0. If
``drain_timeout_s`` passes first, or a second signal arrives, every request still in flight is
answered with a JSON 503 (``not_ready``, with its request id) instead of uvicorn's plain-text 500,
and the process exits 1: the drain was incomplete.

SIGHUP reloads the model repository without a restart, as nginx and most daemons do: new versions are
loaded and warmed beside the served ones, switched to, and the old ones drained
(:mod:`service.lifecycle`); a failed reload is logged and the old versions keep serving.

Exit status: 0 clean drain; 1 incomplete drain, or a model instance that failed for good; 2 invalid
configuration; 3 startup failure (model repository, missing GPU).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import socket
import sys
import threading
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service import logs
from service.api.responses import CUT_OFF
from service.config import Settings, describe_invalid
from service.connections import guarded_protocol
from service.generation import RunnerFactory
from service.lifecycle import ModelLifecycle
from service.main import create_app
from service.state import AppState

logger = logging.getLogger("service.serve")

EXIT_INCOMPLETE = 1
EXIT_CONFIG = 2
# How long cut-off requests get to send their 503 before uvicorn closes what is left.
CUT_OFF_GRACE_S = 2.0


class _TracebackToDebug(logging.Filter):
    """Uvicorn logs a failed lifespan startup with the whole traceback at ERROR; the service has already
    logged the reason in one line, so the traceback is demoted to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "Traceback (most recent call last)" in record.getMessage():
            logger.debug("%s", record.getMessage())
            return False
        return True


class QuietCutOffs(logging.Filter):
    """Drops uvicorn's ERROR "returned without completing response" for a client the service cut off on
    purpose (it read nothing of its response, see :mod:`service.api.responses`): that was logged once, as a
    warning with the reason, and an ERROR per slow client would page an operator for nothing. The same line
    for any other response still gets through: there it means a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (CUT_OFF.get() and "without completing response" in record.getMessage())


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the app before uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, state: AppState, lifecycle: ModelLifecycle) -> None:
        super().__init__(config)
        self.state = state
        self.lifecycle = lifecycle
        self._reloads: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.instance_failed = False
        self.drain_incomplete = False

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        """SIGHUP reloads from before the models load until the server has stopped, then its previous handler
        is back. Before: a SIGHUP during a long first load would kill the process (the default action); a
        reload asked for then answers not ready (logged). After: the loop is closed, nothing could run."""
        if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
            await super().serve(sockets)
            return
        loop = asyncio.get_running_loop()
        previous = signal.signal(signal.SIGHUP, lambda sig, frame: self._hangup(loop))
        try:
            await super().serve(sockets)
        finally:
            signal.signal(signal.SIGHUP, previous)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        self._watch = asyncio.ensure_future(self._exit_on_instance_failure())
        if self.started and self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            base = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            logger.info(
                "dclgan-serve at %s  docs: %s/docs  redoc: %s/redoc  metrics: %s/metrics",
                base,
                base,
                base,
                base,
            )

    async def _exit_on_instance_failure(self) -> None:
        """An instance that failed to warm up will never serve: exit non-zero, so that Docker's restart
        policy or an orchestrator restarts the process instead of keeping a container that only says 503."""
        while not self.should_exit:
            pool = self.state.pool
            if pool is not None and pool.failure is not None:
                logger.error("exiting: %s", pool.failure)
                self.instance_failed = True
                self.should_exit = True
                return
            await asyncio.sleep(0.25)

    def _hangup(self, loop: asyncio.AbstractEventLoop) -> None:
        # Signal handlers run between bytecodes of the loop's thread: hand the work to the loop itself.
        loop.call_soon_threadsafe(self._start_reload)

    def _start_reload(self) -> None:
        task = asyncio.ensure_future(self.lifecycle.reload_logged("SIGHUP"))
        self._reloads.add(task)  # the loop keeps only weak references to its tasks
        task.add_done_callback(self._reloads.discard)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is None:
            super().handle_exit(sig, frame)  # a signal before startup: uvicorn's behaviour
            return
        if self._drain is not None or self.state.draining:
            logger.warning("%s received again: cutting the drain short", signal.Signals(sig).name)
            self._loop.call_soon_threadsafe(self._start_cut_off)
            return
        self.state.begin_drain()
        logger.info(
            "%s received: draining for up to %.1f s (send it again to exit now)",
            signal.Signals(sig).name,
            self.state.settings.drain_timeout_s,
        )
        # Signal handlers run between bytecodes of the loop's thread: hand the work to the loop itself.
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        if not await self.state.wait_idle(self.state.drain_timeout_left()):
            logger.warning("drain timeout: %d translate requests still in flight", self.state.inflight)
            await self._cut_off()
        self.should_exit = True

    def _start_cut_off(self) -> None:
        asyncio.ensure_future(self._cut_off_then_exit())

    async def _cut_off_then_exit(self) -> None:
        await self._cut_off()
        self.should_exit = True

    async def _cut_off(self) -> None:
        """Answer every request still in flight with a JSON 503 and wait (briefly) for the answers to go."""
        count = self.state.cut_off()
        if count:
            self.drain_incomplete = True
            logger.warning("drain incomplete: %d requests answered 503", count)
            await self.state.wait_idle(CUT_OFF_GRACE_S)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dclgan serve",
        description="Serve every model under the model repository over HTTP. Every setting is also a "
        "DCLGAN_* environment variable (see the README); options given here win.",
    )
    parser.add_argument("--host", help="bind address (DCLGAN_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port, 0 for a free one (DCLGAN_PORT, default 8000)")
    parser.add_argument("--models-dir", help="model repository (DCLGAN_MODELS_DIR, default models)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, runner_factory: RunnerFactory | None = None) -> int:
    """Run the service until SIGTERM/SIGINT; 0 after a clean drain, non-zero otherwise (see the module doc).

    ``runner_factory``: how runners are made (default onnxruntime sessions); tests pass runners held at a
    gate, so that queues and deadlines do not depend on the machine's speed.
    """
    args = _parse(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    logging.basicConfig(format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        logger.error("invalid configuration: %s", describe_invalid(exc))
        return EXIT_CONFIG
    # An invalid configuration (the log format included) is logged above as text: the format is not known yet.
    logs.configure(settings.log_format)
    logging.getLogger().setLevel(settings.log_level.upper())
    logging.getLogger("uvicorn.error").addFilter(_TracebackToDebug())
    logging.getLogger("uvicorn.error").addFilter(QuietCutOffs())
    _raise_file_limit()
    app = create_app(settings, runner_factory=runner_factory)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the root logging set up above
        log_level=settings.log_level,
        access_log=False,  # service.access logs each request with its id and queue/compute times
        lifespan="on",
        http=guarded_protocol(header_timeout_s=settings.header_timeout_s, max_connections=settings.max_connections),
        timeout_keep_alive=max(1, round(settings.keep_alive_s)),
        # The drain above already answered every translate request; this only bounds the stragglers.
        timeout_graceful_shutdown=1,
    )
    server = DrainingServer(config, app.state.service, app.state.lifecycle)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when the lifespan (model loading) fails
        return exc.code if isinstance(exc.code, int) else 1
    if not server.started or server.instance_failed or server.drain_incomplete:
        return EXIT_INCOMPLETE
    return 0


def _raise_file_limit() -> None:
    """Lift the soft file-descriptor limit to the hard one: every connection costs one, and 1,024 (a
    common default) is below what ``max_connections`` plus models and logs need."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            logger.debug("cannot raise the file-descriptor limit from %d", soft)
