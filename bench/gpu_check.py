"""The Python half of ``bench/gpu_check.sh`` (run that, not this): one subcommand per step.

    engine          export the default generator (ngf 64, 9 blocks, random weights) to ONNX (+ float16),
                    write it as a one-direction model repository for the service, then
                    - onnxruntime: does a CUDA session really run on CUDAExecutionProvider, does its output
                      match the CPU's, and how fast is it at batch 1/8/32 in float32 and float16;
                    - PyTorch on CUDA (float32 with TF32 off, bfloat16 autocast; the compute reference,
                      and the only GPU number when onnxruntime has no CUDA provider).
                    Writes the results' markdown and ``engine.env`` (what the service step should run).
    wait-ready      wait for a started ``python -m service`` to log its URL and answer /readyz 200.
    service-report  turn bench/serve_load.py's JSON line and the server's /metrics into a markdown table.

``--dry-run`` shrinks everything (ngf 8, 1 block, 32x32, batch 1/2) and runs the "GPU" parts on the CPU,
so CI exercises every code path of the script without a GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

DIRECTION = "a2b"
# Parity acceptance against onnxruntime's CPU float32 output, in PSNR over the [-1, 1] range (peak 2).
# float32 on CUDA differs by TF32 convolutions and cuDNN's algorithm choice; float16 by its precision.
MIN_PSNR_DB = {"float32": 40.0, "float16": 30.0}


@dataclass(frozen=True)
class Plan:
    ngf: int
    n_blocks: int
    size: int
    batches: tuple[int, ...]
    parity_images: int
    min_time_s: float
    device: str  # where the "GPU" runs: cuda:0, or cpu in a dry run


REAL = Plan(
    ngf=64, n_blocks=9, size=256, batches=(1, 8, 32), parity_images=4, min_time_s=2.0, device="cuda:0"
)
DRY = Plan(ngf=8, n_blocks=1, size=32, batches=(1, 2), parity_images=2, min_time_s=0.05, device="cpu")


def emit(line: str = "") -> None:
    """Progress and verdicts go to stdout: they are this script's product, next to the markdown."""
    print(line, flush=True)  # noqa: T201


class Report:
    """Markdown lines, written to the results file as they come (a timeout still leaves what was done)."""

    def __init__(self, path: Path, append: bool = False) -> None:
        self.path = path
        if not append:
            path.write_text("")

    def add(self, *lines: str) -> None:
        with self.path.open("a") as f:
            f.writelines(line + "\n" for line in lines)

    def table(self, header: tuple[str, ...], rows: list[tuple[object, ...]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        self.add(*("| " + " | ".join(str(c) for c in row) + " |" for row in rows))
        self.add("")


def timed(run: Callable[[], object], batch: int, min_time_s: float) -> tuple[float, float]:
    """(images per second, median ms per batch), after two warm-up calls (cuDNN searches on the first)."""
    run()
    run()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return batch / median, median * 1000


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, 3, size, size) float32 in [-1, 1]: blocky noise, closer to photographs than white noise."""
    block = max(size // 32, 1)
    coarse = np.random.default_rng(seed).uniform(-1, 1, (n, 3, -(-size // block), -(-size // block)))
    return np.ascontiguousarray(
        coarse.repeat(block, 2).repeat(block, 3)[:, :, :size, :size], dtype=np.float32
    )


def export(plan: Plan, models: Path, report: Report) -> tuple[object, dict[str, Path]]:
    """The generator and its ONNX files, as a model repository ``models/gpucheck`` the service can load."""
    import torch

    from service.repository import DirectionSpec, InputContract, ModelCard, OnnxFile, Provenance, sha256_file
    from training.export import onnx_bytes, to_float16
    from training.nets import ResnetGenerator

    torch.manual_seed(0)
    gen = ResnetGenerator(ngf=plan.ngf, n_blocks=plan.n_blocks).eval()
    folder = models / "gpucheck"
    folder.mkdir(parents=True)
    data = onnx_bytes(gen)
    paths = {"float32": folder / f"{DIRECTION}.onnx"}
    paths["float32"].write_bytes(data)
    if importlib.util.find_spec("onnxconverter_common") and importlib.util.find_spec("onnx"):
        paths["float16"] = folder / f"{DIRECTION}.fp16.onnx"
        paths["float16"].write_bytes(to_float16(data))
        fp16 = "float16 from training.export.to_float16"
    else:
        fp16 = "**no float16** (onnxconverter-common or onnx is not installed)"
    ModelCard(
        name="gpucheck",
        version="1",
        description="random weights: a speed and parity check, not a translator",
        domains=("a", "b"),
        directions=[
            DirectionSpec(
                name=DIRECTION,
                source="a",
                target="b",
                generator="G_A",
                files={v: OnnxFile(path=p.name, sha256=sha256_file(p)) for v, p in paths.items()},
            )
        ],
        input=InputContract(native_size=plan.size),
        provenance=Provenance(
            model_type="dcl", ngf=plan.ngf, n_blocks=plan.n_blocks, antialias=True, source="test"
        ),
    ).write(folder)
    report.add(
        f"- generator: ResnetGenerator ngf={plan.ngf}, n_blocks={plan.n_blocks}, random weights (seed 0), "
        f"{plan.size}x{plan.size}; ONNX opset 17 via training.export.onnx_bytes; {fp16}",
        "",
    )
    return gen, paths


def onnxruntime_check(
    plan: Plan, paths: dict[str, Path], images: np.ndarray, reference: np.ndarray, report: Report
) -> bool:
    """Provider really used, parity with the CPU, throughput. False if any check failed."""
    from service.repository import load_model_dir
    from service.runtime import CPU, CUDA, RunnerConfig, open_runner
    from training.export import psnr

    wanted = CPU if plan.device == "cpu" else CUDA
    report.add(f"## onnxruntime on {plan.device}", "")
    ok, parity, speed = True, [], []
    model = load_model_dir(paths["float32"].parent)
    for precision in paths:
        # The service's own runner factory and defaults, so this measures what is served.
        config = RunnerConfig(device=plan.device, engine="onnxruntime", precision=precision)  # type: ignore[arg-type]
        runner = open_runner(model, DIRECTION, config)
        got = runner.session.get_providers()
        used = got[0] == wanted
        ok &= used
        report.add(
            f"- {precision}: session providers {got}: {wanted} {'in use' if used else '**NOT in use: FAIL**'}"
        )
        out = runner.run(images)
        db, diff = psnr(reference, out), float(np.abs(out - reference).max())
        passed = db >= MIN_PSNR_DB[precision]
        ok &= passed
        parity.append(
            (
                f"{precision} {plan.device} vs float32 CPU",
                f"{diff:.2e}",
                f"{db:.1f}",
                f">= {MIN_PSNR_DB[precision]:.0f} dB: {'PASS' if passed else 'FAIL'}",
            )
        )
        for batch in plan.batches:
            x = smooth_images(batch, plan.size, seed=1)
            img_s, ms = timed(lambda x=x, runner=runner: runner.run(x), batch, plan.min_time_s)
            speed.append((precision, batch, f"{img_s:.1f}", f"{ms:.2f}"))
            emit(f"onnxruntime {precision} batch {batch}: {img_s:.1f} img/s")
    report.add("", f"Parity on {len(images)} images at {plan.size}x{plan.size} (outputs in [-1, 1]):", "")
    report.table(("output", "max abs diff", "PSNR dB", "result"), parity)
    report.add("Throughput of `session.run()` on host numpy arrays (as in the service: copies included):", "")
    report.table(("precision", "batch", "img/s", "ms/batch"), speed)
    return ok


def torch_reference(
    plan: Plan, gen: object, images: np.ndarray, reference: np.ndarray, report: Report
) -> bool:
    """The same generator through PyTorch, float32 (TF32 off) and bfloat16 autocast; False without a GPU."""
    import torch

    from training.export import psnr

    device = "cpu" if plan.device == "cpu" else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        report.add("## PyTorch on CUDA", "", "**FAIL**: torch.cuda.is_available() is False: no GPU here.", "")
        emit("FAIL: PyTorch sees no CUDA device")
        return False
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    report.add(f"## PyTorch on {device} ({name}): the compute reference", "")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32: no TF32 tensor-core shortcut
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True  # fixed shapes per row: let cuDNN pick its fastest algorithm
    net = gen.to(device)  # type: ignore[attr-defined]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward(x: torch.Tensor, bf16: bool) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            y = net(x)
        sync()
        return y

    rows, parity = [], []
    for label, bf16 in (("float32 (TF32 off)", False), ("bfloat16 autocast", True)):
        out = forward(torch.from_numpy(images).to(device), bf16).float().cpu().numpy()
        parity.append(
            (
                f"torch {label} on {device} vs onnxruntime float32 CPU",
                f"{np.abs(out - reference).max():.2e}",
                f"{psnr(reference, out):.1f}",
            )
        )
        for batch in plan.batches:
            x = torch.from_numpy(smooth_images(batch, plan.size, seed=1)).to(device)
            img_s, ms = timed(lambda x=x, bf16=bf16: forward(x, bf16), batch, plan.min_time_s)
            rows.append((label, batch, f"{img_s:.1f}", f"{ms:.2f}"))
            emit(f"torch {label} batch {batch}: {img_s:.1f} img/s")
    report.table(("output", "max abs diff", "PSNR dB"), parity)
    report.add("Throughput with the batch already on the device (compute only, no host copies):", "")
    report.table(("precision", "batch", "img/s", "ms/batch"), rows)
    return True


def cuda_unusable(path: Path, providers: list[str]) -> str | None:
    """Why onnxruntime cannot run on CUDA here, or None if it can. onnxruntime-gpu lists the CUDA provider
    even when CUDA or cuDNN cannot be loaded (serving-notes §7.6), so only a real session tells."""
    from service.runtime import CUDA, ProviderUnavailable, create_session

    if CUDA not in providers:
        return f"this onnxruntime has no {CUDA} (providers {providers})"
    try:
        create_session(path, device=REAL.device, require_gpu=True)
    except ProviderUnavailable as exc:
        return str(exc)
    return None


def engine(args: argparse.Namespace) -> int:
    import onnxruntime as ort
    import torch

    from service.runtime import create_session

    plan = DRY if args.dry_run else REAL
    report = Report(args.results)
    providers = ort.get_available_providers()
    report.add(
        f"# GPU check{' (DRY RUN: tiny sizes on the CPU, not a GPU result)' if args.dry_run else ''}",
        "",
        f"- run: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.node()}, "
        f"Python {platform.python_version()}",
        f"- onnxruntime {ort.__version__}; available providers {providers}",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}",
    )
    gen, paths = export(plan, args.work / "models", report)
    images = smooth_images(plan.parity_images, plan.size)
    cpu = create_session(paths["float32"], device="cpu")
    reference = cpu.run(None, {cpu.get_inputs()[0].name: images})[0]

    missing = None if args.dry_run else cuda_unusable(paths["float32"], providers)
    if missing is None:
        ok = onnxruntime_check(plan, paths, images, reference, report)
    else:
        ok = True
        verdict = f"onnxruntime CUDA path UNVERIFIED: {missing}; PyTorch below is the only GPU measurement"
        report.add(f"## {verdict}", "")
        emit(f"!!! {verdict}")
    ok &= torch_reference(plan, gen, images, reference, report)

    serve = {
        "SERVE_DEVICE": plan.device if missing is None else "",
        "PRECISIONS": " ".join(paths),
        "MODELS_DIR": str(args.work / "models"),
        "DIRECTION": DIRECTION,
        "MAX_BATCH_SIZE": str(max(plan.batches)),
    }
    (args.work / "engine.env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in serve.items()))
    return 0 if ok else 1


def wait_ready(args: argparse.Namespace) -> int:
    """Print the server's URL once /readyz is 200; non-zero if it exits or the timeout passes."""
    import httpx  # here, not at the top: the engine step must run where the service's packages are missing

    deadline = time.monotonic() + args.timeout
    url = None
    while time.monotonic() < deadline:
        try:
            os.kill(args.pid, 0)
        except ProcessLookupError:
            sys.stderr.write(f"the server exited before it was ready:\n{args.log.read_text()}\n")
            return 1
        if url is None and (found := re.search(r"dclgan-serve at (http://\S+)", args.log.read_text())):
            url = found.group(1)
        if url is not None:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    emit(url)
                    return 0
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    sys.stderr.write(f"the server was not ready after {args.timeout:.0f} s:\n{args.log.read_text()}\n")
    return 1


def service_report(args: argparse.Namespace) -> int:
    """Append bench/serve_load.py's result and the server's own view (batch sizes, provider)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    lines = [line for line in args.load.read_text().splitlines() if line.startswith("{")]
    if not lines:
        sys.stderr.write(f"no JSON line in {args.load}\n")
        return 1
    load = json.loads(lines[-1])
    batches = {"sum": 0.0, "count": 0.0}
    providers = set()
    for family in text_string_to_metric_families(httpx.get(args.metrics_url, timeout=10).text):
        for sample in family.samples:
            if sample.name in ("dclgan_batch_size_sum", "dclgan_batch_size_count"):
                batches[sample.name.rsplit("_", 1)[1]] += sample.value
            elif sample.name == "dclgan_model_info":
                providers.add(f"{sample.labels['device']}: {sample.labels['provider']}")
    mean_batch = batches["sum"] / batches["count"] if batches["count"] else math.nan
    raw = load["raw_img_per_s"]
    report = Report(args.results, append=True)
    report.add(
        f"## Service under bench/serve_load.py: {args.label}",
        "",
        f"- provider per device (from /metrics): {', '.join(sorted(providers))}",
        f"- raw onnxruntime batch 1 on the same settings: {raw:.1f} img/s, {load['raw_latency_ms']:.1f} ms",
        f"- mean executed batch size since start-up (warm-up pass included): {mean_batch:.2f}",
        "",
    )
    report.table(
        ("concurrency", "img/s", "x raw", "p50 ms", "p95 ms", "p99 ms", "errors"),
        [
            (
                c,
                r["img_per_s"],
                f"{r['img_per_s'] / raw:.2f}",
                r["p50_ms"],
                r["p95_ms"],
                r["p99_ms"],
                r["errors"],
            )
            for c, r in load["levels"].items()
        ],
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("engine")
    p.add_argument("--work", type=Path, required=True, help="scratch folder (the model repository goes here)")
    p.add_argument("--results", type=Path, required=True, help="markdown file to (over)write")
    p.add_argument("--dry-run", action="store_true")
    p = sub.add_parser("wait-ready")
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--timeout", type=float, required=True)
    p = sub.add_parser("service-report")
    p.add_argument("--load", type=Path, required=True, help="bench/serve_load.py's output")
    p.add_argument("--metrics-url", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--results", type=Path, required=True, help="markdown file to append to")
    args = parser.parse_args()
    return {"engine": engine, "wait-ready": wait_ready, "service-report": service_report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
