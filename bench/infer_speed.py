"""Generator inference throughput: PyTorch eager vs onnxruntime (CPU), batch 1/4/8 at 256x256.

    python bench/infer_speed.py [--ngf 64] [--n-blocks 9] [--size 256] [--batches 1,4,8]
        [--threads 2] [--reps 3]

Also measures the machine's fp32 matmul GFLOP/s in the same run and reports the fraction of it
each engine achieves, with the generator's FLOPs counted from its layers (a multiply-add = 2).
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from service.runtime import OnnxRunner, create_session  # noqa: E402
from training.export import onnx_bytes  # noqa: E402
from training.nets import ResnetGenerator  # noqa: E402


def count_flops(gen: nn.Module, size: int) -> float:
    """FLOPs of one forward pass at size x size: 2 x the multiply-adds of every (transposed) conv."""
    macs = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal macs
        k = module.weight.shape[2] * module.weight.shape[3]
        if isinstance(module, nn.ConvTranspose2d):
            macs += inputs[0].numel() * (module.out_channels // module.groups) * k
        else:
            macs += output.numel() * (module.in_channels // module.groups) * k

    handles = [m.register_forward_hook(hook) for m in gen.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
    with torch.no_grad():
        gen(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    # The fixed blur filters run as functional convs inside Downsample/Upsample modules.
    return 2.0 * macs + blur_flops(gen, size)


def blur_flops(gen: nn.Module, size: int) -> float:
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
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def time_it(fn, reps: int) -> float:
    fn()  # warm-up (allocations, oneDNN primitive creation)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--n-blocks", type=int, default=9)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    gen = ResnetGenerator(ngf=args.ngf, n_blocks=args.n_blocks).eval()
    flops = count_flops(gen, args.size)
    peak = matmul_gflops(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.onnx"
        path.write_bytes(onnx_bytes(gen))
        runner = OnnxRunner(create_session(path, device="cpu", intra_op_threads=args.threads), device="cpu")
        torch.set_num_threads(args.threads)
        rows = []
        for bs in (int(b) for b in args.batches.split(",")):
            x = torch.rand(bs, 3, args.size, args.size) * 2 - 1
            xn = x.numpy()
            with torch.no_grad():
                t_torch = time_it(lambda x=x: gen(x), args.reps)
            t_ort = time_it(lambda xn=xn: runner.run(xn), args.reps)
            for engine, t in (("torch", t_torch), ("onnxruntime", t_ort)):
                ips = bs / t
                rows.append(
                    {
                        "engine": engine,
                        "batch": bs,
                        "img_per_s": round(ips, 3),
                        "s_per_img": round(t / bs, 4),
                        "gflops": round(ips * flops / 1e9, 1),
                        "fraction_of_matmul": round(ips * flops / 1e9 / peak, 3),
                    }
                )
    for r in rows:
        print(
            f"{r['engine']:>12} batch {r['batch']:>2}: {r['img_per_s']:7.3f} img/s  "  # noqa: T201
            f"{r['gflops']:6.1f} GFLOP/s  {100 * r['fraction_of_matmul']:5.1f}% of matmul"
        )
    print(
        json.dumps(
            {
                "gflop_per_image": round(flops / 1e9, 2),
                "matmul_gflops": round(peak, 1),  # noqa: T201
                "threads": args.threads,
                "size": args.size,
                "ngf": args.ngf,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
