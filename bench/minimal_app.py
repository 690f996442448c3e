"""The 20-line FastAPI app that bench/versus_minimal.py compares the service with: same ONNX file, same decode,
preparation and encode (service.imaging), inference in Starlette's thread pool; no batching, limits or metrics."""

import os

import onnxruntime as ort
from fastapi import FastAPI, Request, Response
from starlette.concurrency import run_in_threadpool

from service.imaging import decode_image, encode_image, from_output, to_input

options = ort.SessionOptions()
options.intra_op_num_threads = len(os.sched_getaffinity(0))
options.add_session_config_entry("session.intra_op.allow_spinning", "0")
session = ort.InferenceSession(os.environ["MINIMAL_ONNX"], options, providers=["CPUExecutionProvider"])
app = FastAPI()


def work(body: bytes) -> bytes:
    prepared = to_input(decode_image(body, max_pixels=25_000_000), max_side=1024)
    out = session.run(None, {"image": prepared.array[None]})[0][0]
    return encode_image(from_output(out, prepared), "png")


@app.post("/translate/{direction}")
async def translate(direction: str, request: Request) -> Response:
    return Response(await run_in_threadpool(work, await request.body()), media_type="image/png")
