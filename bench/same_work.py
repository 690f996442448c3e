"""What every server in bench/versus_minimal.py's comparison does per request, so that only the serving
layer differs: one onnxruntime CPU session over the same ONNX file with the service's thread settings (all
usable cores, one inter-op thread, no spinning), and the service's own decode, preparation and PNG encode
(``service.imaging``, which imports neither onnxruntime nor FastAPI, so the benchmark venv can load it).
"""

from __future__ import annotations

import os

import onnxruntime as ort

from service.imaging import decode_image, encode_image, from_output, to_input

MAX_PIXELS = 25_000_000  # the service's default decode limit
MAX_SIDE = 1024  # the service's default working side


def open_session(onnx_path: str) -> ort.InferenceSession:
    """The session as ``service.runtime.session_options(None)`` makes it, built here without importing the
    service's settings and repository (which need the project's own venv)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])


def translate(session: ort.InferenceSession, body: bytes) -> bytes:
    """JPEG/PNG bytes in, PNG bytes out, one image."""
    prepared = to_input(decode_image(body, max_pixels=MAX_PIXELS), max_side=MAX_SIDE)
    out = session.run(None, {"image": prepared.array[None]})[0][0]
    return encode_image(from_output(out, prepared), "png")
