"""The 20-line FastAPI app that bench/versus_minimal.py compares the service with: same ONNX file, thread
settings, decode, preparation and encode (bench/same_work.py), inference in Starlette's thread pool; no
batching, limits or metrics."""

import os

from fastapi import FastAPI, Request, Response
from same_work import open_session, translate
from starlette.concurrency import run_in_threadpool

session = open_session(os.environ["COMPARE_ONNX"])
app = FastAPI()


@app.post("/translate/{direction}")
async def translate_route(direction: str, request: Request) -> Response:
    return Response(await run_in_threadpool(translate, session, await request.body()), media_type="image/png")
