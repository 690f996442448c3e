"""Generator inference, engines and precisions side by side: onnxruntime float32 (the baseline), OpenVINO
float32 and bfloat16, ``auto``, and optionally PyTorch eager; latency, throughput, PSNR against the baseline.

    python bench/infer_speed.py --model models/horse2zebra --direction horse2zebra      # a model folder
    python bench/infer_speed.py --ngf 64 --n-blocks 9 --torch                            # a random generator
        [--engines onnxruntime:float32,openvino:float32,openvino:bfloat16,auto:auto] [--size 256]
        [--batches 1,4] [--threads 2] [--reps 10] [--images DIR --max-images 20]

Every runner comes from the service's one factory (``service.runtime.open_runner``), so what is timed is
what is served. Runs are round-robin (one run of each engine in turn, ``--reps`` times) so that a noisy
machine slows every engine alike; the figures are medians. PSNR is against onnxruntime float32 on a
structured probe image and, with ``--images``, on real photos (mean and minimum; nothing is written).
A precision the CPU cannot run (bfloat16 without native bf16) is skipped with the reason. With ``--ngf``
the generator's FLOPs are counted from its layers and reported as a fraction of the machine's fp32
matmul GFLOP/s measured in the same run. The last line is one JSON object with the CPU's model and flags.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from service.imaging import decode_image, to_input  # noqa: E402
from service.openvino_runner import NATIVE_BF16_FLAGS, cpu_flags, native_bf16, probe_input, psnr_db  # noqa: E402
from service.repository import LoadedModel, Provenance, load_model_dir  # noqa: E402
from service.runtime import Runner, RunnerConfig, open_runner  # noqa: E402
from service.translate import list_images  # noqa: E402

BASELINE = "onnxruntime:float32"
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_vnni", *sorted(NATIVE_BF16_FLAGS), "amx_tile", "amx_int8")


def emit(line: str) -> None:
    print(line, flush=True)  # noqa: T201


def finite(value: float | None) -> float | None:
    """Rounded for the report; None for the baseline's infinite PSNR against itself (JSON has no infinity)."""
    return None if value is None or value == float("inf") else round(value, 1)


def count_flops(gen: Any, size: int) -> float:
    """FLOPs of one forward pass at size x size: 2 x the multiply-adds of every (transposed) conv."""
    from torch import nn, no_grad, zeros

    macs = 0

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        nonlocal macs
        k = module.weight.shape[2] * module.weight.shape[3]
        if isinstance(module, nn.ConvTranspose2d):
            macs += inputs[0].numel() * (module.out_channels // module.groups) * k
        else:
            macs += output.numel() * (module.in_channels // module.groups) * k

    handles = [m.register_forward_hook(hook) for m in gen.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    with no_grad():
        gen(zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    # The fixed blur filters run as functional convs inside Downsample/Upsample modules.
    return 2.0 * macs + blur_flops(gen, size)


def blur_flops(gen: Any, size: int) -> float:
    """Depthwise blur FLOPs; layer index -> its output resolution relative to the input."""
    total = 0.0
    for name, buf in gen.named_buffers():
        if name.endswith("filt"):
            c, _, kh, kw = buf.shape
            index = int(name.split(".")[1])
            # Output pixels of that layer: Downsample halves, Upsample doubles its input size.
            scale = {7: 1 / 2, 11: 1 / 4, 21: 1 / 2, 25: 1.0}.get(index, 1.0)
            total += 2.0 * c * kh * kw * (size * scale) ** 2
    return total


def matmul_gflops(threads: int, n: int = 2048, reps: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def random_model(ngf: int, n_blocks: int, size: int, root: Path) -> tuple[LoadedModel, Any]:
    """A model folder holding one random generator (speed only: its images mean nothing), and the generator."""
    import torch

    from training.export import export_model
    from training.nets import ResnetGenerator

    torch.manual_seed(0)
    gen = ResnetGenerator(ngf=ngf, n_blocks=n_blocks).eval()
    provenance = Provenance(model_type="dcl", ngf=ngf, n_blocks=n_blocks, antialias=True, source="test", license="n/a")
    export_model(
        {"G_A": gen, "G_B": gen},
        name="bench",
        domains=("a", "b"),
        out_root=root,
        provenance=provenance,
        native_size=size,
        parity_sizes=[(64, 64)],
    )
    return load_model_dir(root / "bench"), gen


def open_engines(
    model: LoadedModel, direction: str, specs: list[str], threads: int
) -> tuple[dict[str, Runner], dict[str, str]]:
    """``engine:precision`` -> runner (no PSNR floor: the bench reports PSNR itself), and the skipped ones."""
    runners: dict[str, Runner] = {}
    skipped: dict[str, str] = {}
    for spec in specs:
        engine, precision = spec.split(":")
        config = RunnerConfig(engine=engine, precision=precision, intra_op_threads=threads, psnr_floor_db=0.0)
        try:
            runner = open_runner(model, direction, config)  # type: ignore[arg-type]
        except ValueError as exc:
            skipped[spec] = str(exc)
            continue
        label = spec if engine != "auto" and precision != "auto" else f"{spec}={runner.engine}:{runner.precision}"
        runners[label] = runner
    return runners, skipped


def round_robin(calls: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Median seconds of each call, timed in turn ``reps`` times after one warm-up each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def image_psnrs(runners: dict[str, Runner], folder: Path, count: int, size: int) -> dict[str, tuple[float, float]]:
    """(mean, min) PSNR of each runner against the baseline over ``count`` photos scaled to ``size``."""
    values: dict[str, list[float]] = {name: [] for name in runners}
    for path in list_images(folder)[:count]:
        batch = to_input(decode_image(path.read_bytes(), max_pixels=64 * 2**20), max_side=size).array[None]
        reference = runners[BASELINE].run(batch)
        for name, runner in runners.items():
            values[name].append(psnr_db(runner.run(batch), reference))
    return {name: (statistics.fmean(v), min(v)) for name, v in values.items() if v}


def machine() -> dict[str, Any]:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )  # fmt: skip
    flags = cpu_flags()
    return {
        "cpu": model,
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "flags": [f for f in REPORTED_FLAGS if f in flags],
        "native_bf16": native_bf16(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="a model folder (default: a random generator, see --ngf)")
    p.add_argument("--direction", help="the model's direction (default: its first)")
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--n-blocks", type=int, default=9)
    p.add_argument("--torch", action="store_true", help="also PyTorch eager (random generator only)")
    p.add_argument("--engines", default=f"{BASELINE},openvino:float32,openvino:bfloat16,auto:auto")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batches", default="1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--images", type=Path, help="PSNR on real photos from this folder too")
    p.add_argument("--max-images", type=int, default=20)
    args = p.parse_args()
    specs = args.engines.split(",")
    if specs[0] != BASELINE:
        p.error(f"the first engine must be the baseline, {BASELINE}")
    with tempfile.TemporaryDirectory() as tmp:
        gen = None
        if args.model is None:
            model, gen = random_model(args.ngf, args.n_blocks, args.size, Path(tmp))
        else:
            model = load_model_dir(args.model)
        direction = args.direction or model.card.direction_names[0]
        runners, skipped = open_engines(model, direction, specs, args.threads)
    for spec, reason in skipped.items():
        emit(f"skipped {spec}: {reason}")
    probe = probe_input(args.size)
    reference = runners[BASELINE].run(probe)
    psnr = {name: psnr_db(r.run(probe), reference) for name, r in runners.items()}
    photos = image_psnrs(runners, args.images, args.max_images, args.size) if args.images else {}
    flops = peak = None
    if gen is not None:
        flops, peak = count_flops(gen, args.size), matmul_gflops(args.threads)
    rows = []
    for bs in (int(b) for b in args.batches.split(",")):
        x = np.random.default_rng(0).uniform(-1, 1, (bs, 3, args.size, args.size)).astype(np.float32)
        calls: dict[str, Callable[[], Any]] = {name: (lambda r=r, x=x: r.run(x)) for name, r in runners.items()}
        if args.torch and gen is not None:
            import torch

            torch.set_num_threads(args.threads)
            xt = torch.from_numpy(x)
            calls["torch:float32"] = lambda xt=xt: torch.no_grad()(gen)(xt)
        medians = round_robin(calls, args.reps)
        for name, seconds in medians.items():
            row = {
                "engine": name,
                "batch": bs,
                "latency_ms": round(seconds * 1000, 1),
                "img_per_s": round(bs / seconds, 3),
                "x_baseline": round(medians[BASELINE] / seconds, 2),
                "psnr_db": finite(psnr.get(name)),
            }
            if name in photos:
                row["photo_psnr_db_mean"], row["photo_psnr_db_min"] = (finite(v) for v in photos[name])
            if flops is not None and peak is not None:
                row["fraction_of_matmul"] = round(bs / seconds * flops / 1e9 / peak, 3)
            rows.append(row)
    emit(f"{'engine':>40} {'batch':>5} {'ms':>8} {'img/s':>8} {'x ORT f32':>9} {'PSNR dB':>8}")
    for r in rows:
        shown = "-" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}"
        emit(
            f"{r['engine']:>40} {r['batch']:>5} {r['latency_ms']:8.1f} {r['img_per_s']:8.3f} "
            f"{r['x_baseline']:9.2f} {shown:>8}"
        )
    source = str(args.model) if args.model else f"random ngf {args.ngf}, {args.n_blocks} blocks"
    summary = {"model": source, "direction": direction, "size": args.size, "threads": args.threads}
    summary |= {"reps": args.reps, "machine": machine(), "skipped": skipped, "rows": rows}
    if flops is not None:
        summary |= {"gflop_per_image": round(flops / 1e9, 2), "matmul_gflops": round(peak or 0, 1)}
    emit(json.dumps(summary))


if __name__ == "__main__":
    main()
