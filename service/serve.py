"""``dclgan serve`` / ``python -m service``: run the app under uvicorn, drain gracefully on SIGTERM.

One process, one event loop, a pool of model instances (serving-notes §8.6): several uvicorn workers
would each load every model and split the traffic that dynamic batching needs to see together.

Shutdown follows what load balancers and Kubernetes expect. On the first SIGTERM (or Ctrl+C) the
process keeps listening but ``/readyz`` and new translate requests answer 503 at once, while
admitted requests finish; once none is left (or ``drain_timeout_s`` passed) uvicorn shuts down and
the process exits 0. A second signal hands over to uvicorn's own shutdown, which still waits for
the remaining drain time and then ends the process with the signal's status.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from service.config import Settings
from service.main import create_app
from service.state import AppState

logger = logging.getLogger("service.serve")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first exit signal drains the app before uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.instance_failed = False

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

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain is not None or self._loop is None:
            super().handle_exit(sig, frame)  # a second signal, or one before startup: uvicorn's behaviour
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
        self.should_exit = True


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


def main(argv: list[str] | None = None) -> int:
    """Run the service until SIGTERM/SIGINT; 0 after a clean drain, non-zero if startup failed."""
    args = _parse(argv)
    overrides = {k: v for k, v in vars(args).items() if v is not None}
    logging.basicConfig(format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", stream=sys.stderr)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        logger.error("invalid configuration:\n%s", exc)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the root logging set up above
        log_level=settings.log_level,
        access_log=False,  # service.access logs each request with its id and queue/compute times
        lifespan="on",
        # The drain above already waited for translate requests; this only bounds the stragglers.
        timeout_graceful_shutdown=1,
    )
    server = DrainingServer(config, app.state.service)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits this way when the lifespan (model loading) fails
        return exc.code if isinstance(exc.code, int) else 1
    return 0 if server.started and not server.instance_failed else 1
