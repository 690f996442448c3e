"""LitServe serving what bench/same_work.py does, for bench/versus_minimal.py (runs in runs/compare-venv).

LitServe hands a request to ``decode_request`` as JSON or a form, never as raw bytes, so clients send the
image as a multipart file field ``image``. Its one inference worker process does decode, inference and
encode in turn, as LitServe's image examples do; the API server process only moves bytes.
"""

import os

import litserve as ls
from fastapi import Request, Response
from same_work import open_session, translate


class TranslateAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.session = open_session(os.environ["COMPARE_ONNX"])

    def decode_request(self, request: Request) -> bytes:
        return request["image"].file.read()  # type: ignore[index, no-any-return]

    def predict(self, body: bytes) -> bytes:
        return translate(self.session, body)

    def encode_response(self, png: bytes) -> Response:
        return Response(png, media_type="image/png")


if __name__ == "__main__":
    api = TranslateAPI(api_path=f"/translate/{os.environ['COMPARE_DIRECTION']}")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=300)
    server.run(host="127.0.0.1", port=int(os.environ["COMPARE_PORT"]), generate_client_file=False)
