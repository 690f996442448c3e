"""Ray Serve serving what bench/same_work.py does, for bench/versus_minimal.py (runs in runs/compare-venv).

One replica (Ray Serve's default), raw image bytes as the body, as the service takes them; the synchronous
method runs in the replica's thread pool. Ray's own processes (GCS, raylet, the HTTP proxy actor) start with
it on the same cores; the dashboard is off.
"""

import asyncio
import os
import signal
import sys
import threading

import ray
from ray import serve
from same_work import open_session, translate
from starlette.requests import Request
from starlette.responses import Response


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Translator:
    def __init__(self, onnx_path: str) -> None:
        self.session = open_session(onnx_path)

    async def __call__(self, request: Request) -> Response:
        body = await request.body()
        # Off the replica's event loop, in its default thread pool, as Starlette's run_in_threadpool does.
        png = await asyncio.get_running_loop().run_in_executor(None, translate, self.session, body)
        return Response(png, media_type="image/png")


if __name__ == "__main__":
    ray.init(num_cpus=len(os.sched_getaffinity(0)), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": int(os.environ["COMPARE_PORT"])})
    route = f"/translate/{os.environ['COMPARE_DIRECTION']}"
    serve.run(Translator.bind(os.environ["COMPARE_ONNX"]), route_prefix=route)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # Ray's actors and daemons go with it, not only this driver
    ray.shutdown()
    sys.exit(0)
