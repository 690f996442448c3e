"""Load benchmark of a running ``dclgan serve``, next to the raw onnxruntime speed of the same model.

    python bench/serve_load.py --url http://127.0.0.1:8000 --direction horse2zebra \
        --concurrency 1,4,16 --seconds 20

1. Raw: opens the direction's ONNX file (found through ``GET /models`` in ``--models-dir``) with the
   server's settings (the same ``DCLGAN_*`` environment: device, threads, engine, precision) and, as the
   baseline, with onnxruntime float32, and times batch-1 runs of both in turn at the working resolution
   while the server is idle. The engine, precision and PSNR the server's instances report are printed.
2. Service: for each concurrency level, that many clients each send the same image back to back (a
   closed loop) for ``--seconds``, then waits for its last requests. Throughput is every success
   over the whole time, tail included: the server stays saturated until the last response (its
   queue drains at full speed), so this avoids the +-1 request error of counting inside a window.

Prints a table, then one JSON line: ``raw_img_per_s``, ``raw_latency_ms``, the same for the baseline
(``baseline_img_per_s``, ``baseline_latency_ms``), the server's ``instances`` and, under ``levels``, for
each concurrency ``img_per_s``, ``p50_ms``, ``p95_ms``, ``p99_ms`` and ``errors``. The goal on CPU:
throughput at saturation >= 0.95 x raw, p50 at concurrency 1 within 5% of raw latency.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from service.config import Settings
from service.imaging import to_input
from service.repository import load_model_dir
from service.runtime import Runner, RunnerConfig, open_runner


def emit(line: str) -> None:
    """The report goes to stdout: a bench script's output is its product."""
    print(line, flush=True)  # noqa: T201


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--direction", required=True)
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=20.0, help="measuring time per level")
    parser.add_argument(
        "--raw-seconds", type=float, default=None, help="raw measuring time (default --seconds)"
    )
    parser.add_argument(
        "--size", type=int, default=None, help="square image side (default: the model's native)"
    )
    parser.add_argument(
        "--image", type=Path, default=None, help="send this file instead of a generated image"
    )
    parser.add_argument("--models-dir", type=Path, default=None, help="default: DCLGAN_MODELS_DIR or models")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request client timeout (s)")
    return parser.parse_args()


def find_model(models: dict[str, Any], direction: str) -> tuple[str, int, list[dict[str, Any]]]:
    """(model name, native size, instances) of the model serving ``direction``, from ``GET /models``."""
    for model in models["models"]:
        for served in model["directions"]:
            if served["name"] == direction:
                return model["name"], model["native_size"], served["instances"]
    served = [d["name"] for m in models["models"] for d in m["directions"]]
    raise SystemExit(f"the server has no direction {direction!r}; it serves {served}")


def make_image(size: int) -> Image.Image:
    """A smooth image with mild texture: realistic JPEG size and decode cost, deterministic."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    noise = np.random.default_rng(0).normal(0, 12, (size, size, 3))
    rgb = np.stack([xx * 200 + 30, yy * 180 + 40, (1 - xx) * 150 + 50], -1) + noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def measure_raw(runners: list[Runner], batch: np.ndarray, seconds: float) -> list[tuple[float, float]]:
    """(images per second, median latency in ms) of each runner's batch-1 runs, taken in turn (so a noisy
    machine slows them alike) for about ``seconds`` in all."""
    for runner in runners:
        runner.run(batch)  # warm-up
    latencies: list[list[float]] = [[] for _ in runners]
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies[0]) < 3:
        for runner, times in zip(runners, latencies, strict=True):
            t0 = time.perf_counter()
            runner.run(batch)
            times.append(time.perf_counter() - t0)
    return [(1 / statistics.mean(times), statistics.median(times) * 1000) for times in latencies]


async def closed_loop(
    client: httpx.AsyncClient, path: str, body: bytes, concurrency: int, seconds: float
) -> dict[str, float]:
    """``concurrency`` clients sending back to back for ``seconds``; the level's stats."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    window_end = start + seconds

    async def one_client() -> None:
        nonlocal errors
        while time.perf_counter() < window_end:
            t0 = time.perf_counter()
            try:
                response = await client.post(path, content=body, headers={"content-type": "image/jpeg"})
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "img_per_s": round(len(latencies) / elapsed, 4),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p95_ms": round(float(np.percentile(ms, 95)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "errors": errors,
    }


async def drive(args: argparse.Namespace, body: bytes, levels: list[int]) -> dict[str, dict[str, float]]:
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(levels), max_keepalive_connections=max(levels))
    async with httpx.AsyncClient(
        base_url=args.url, headers=headers, timeout=args.timeout, limits=limits
    ) as client:
        path = f"/translate/{args.direction}"
        (await client.post(path, content=body, headers={"content-type": "image/jpeg"})).raise_for_status()
        return {str(c): await closed_loop(client, path, body, c, args.seconds) for c in levels}


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = Settings()
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    name, native, instances = find_model(
        httpx.get(f"{args.url}/models", headers=headers, timeout=30).raise_for_status().json(), args.direction
    )
    image = Image.open(args.image).convert("RGB") if args.image else make_image(args.size or native)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    body = buf.getvalue()

    model = load_model_dir((args.models_dir or settings.models_dir) / name)
    contract = model.card.input
    config = RunnerConfig(
        device=settings.devices[0],
        engine=settings.engine,
        precision=settings.precision,
        intra_op_threads=settings.intra_op_threads or None,
        require_gpu=settings.require_gpu,
        conv_algo_search=settings.cudnn_conv_algo_search,
    )
    baseline = replace(config, engine="onnxruntime", precision="float32")
    runners = [open_runner(model, args.direction, config), open_runner(model, args.direction, baseline)]
    prepared = to_input(
        image, max_side=settings.max_side, multiple_of=contract.multiple_of, min_size=contract.min_size
    )
    (raw_img_per_s, raw_latency_ms), (base_img_per_s, base_latency_ms) = measure_raw(
        runners, prepared.array[None], args.raw_seconds or args.seconds
    )
    del runners  # free their threads and memory before loading the server

    results = asyncio.run(drive(args, body, levels))
    h, w = prepared.array.shape[1:]
    emit(
        f"{name}/{args.direction}, {image.width}x{image.height} JPEG ({len(body)} bytes), working {w}x{h}, "
        f"device {settings.devices[0]}, intra_op_threads {settings.intra_op_threads or 'all'}"
    )
    served = ", ".join(f"{i['engine']} {i['precision']} (PSNR {i['psnr_db']})" for i in instances)
    emit(f"server instances: {served}; raw: {settings.engine}/{settings.precision}")
    emit(f"{'':>12} {'img/s':>8} {'x raw':>6} {'x ORT32':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for label, img_per_s, latency_ms in (
        ("raw ORT f32", base_img_per_s, base_latency_ms),
        ("raw", raw_img_per_s, raw_latency_ms),
    ):
        emit(
            f"{label:>12} {img_per_s:8.3f} {img_per_s / raw_img_per_s:6.2f} {img_per_s / base_img_per_s:7.2f} "
            f"{latency_ms:8.1f}"
        )
    for level, r in results.items():
        emit(
            f"{'conc ' + level:>12} {r['img_per_s']:8.3f} {r['img_per_s'] / raw_img_per_s:6.2f} "
            f"{r['img_per_s'] / base_img_per_s:7.2f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['p99_ms']:8.1f} "
            f"{r['errors']:6d}"
        )
    emit(
        json.dumps(
            {
                "raw_img_per_s": round(raw_img_per_s, 4),
                "raw_latency_ms": round(raw_latency_ms, 1),
                "baseline_img_per_s": round(base_img_per_s, 4),
                "baseline_latency_ms": round(base_latency_ms, 1),
                "instances": instances,
                "levels": results,
            }
        )
    )


if __name__ == "__main__":
    main()
