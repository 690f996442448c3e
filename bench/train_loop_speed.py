"""Seconds per training iteration, data included, for the loop's speed options side by side.

    python bench/train_loop_speed.py --dataroot ../shared/data/horse2zebra \
        [--ngf 32 --ndf 32 --n-blocks 6 --load-size 143 --crop-size 128] [--threads 2] [--iters 12]

Variants, measured round-robin in one process (one iteration of each in turn, so that a noisy
machine slows them alike):

* ``before``: the loop as it was before the speed work: decode and resize every image at every
  iteration, NCHW, fp32, every loss read back (``.item()``) at every iteration;
* ``fp32``: decoded images cached in RAM, channels_last, losses left on the device;
* ``fp32-nchw``: the same without channels_last (the cache and the sync alone);
* ``bf16``: the same with bf16 autocast, only where the CPU has native bf16 kernels (else skipped);
* ``bf16-nchw``: bf16 without channels_last, to show what the layout alone is worth.

Prints one JSON line per variant (median wall and process-CPU seconds per iteration, ratio to
``before``) and the CPU's model and flags.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, replace

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from training.config import DataConfig, ModelConfig, OptimConfig  # noqa: E402
from training.data import UnalignedDataset  # noqa: E402
from training.step import train_step  # noqa: E402
from training.task import DCLTask, Optimizers, build_task  # noqa: E402
from training.trainer import native_bf16  # noqa: E402


@dataclass
class Variant:
    name: str
    cache: bool
    channels_last: bool
    bf16: bool
    sync_every_iter: bool
    task: DCLTask | None = None
    opt: Optimizers | None = None
    data: UnalignedDataset | None = None

    def setup(self, model: ModelConfig, data: DataConfig) -> None:
        torch.manual_seed(0)
        self.task = build_task(model)
        self.task.build_heads(64)
        self.task.initialize()
        if self.channels_last:
            self.task.to(memory_format=torch.channels_last)
        self.opt = self.task.make_optimizers(OptimConfig())
        self.data = UnalignedDataset(replace(data, cache_mb=data.cache_mb if self.cache else 0), seed=0)

    def iteration(self, index: int) -> None:
        item = self.data[index % len(self.data)]
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        a, b = (item[k][None].contiguous(memory_format=layout) for k in ("A", "B"))

        def autocast():
            return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

        out = train_step(self.task, self.opt, a, b, autocast=autocast)
        if self.sync_every_iter:
            {k: v.item() for k, v in out.items() if k.startswith(("d/", "g/"))}


def cpu_description() -> dict[str, str]:
    model, flags = platform.processor(), ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                flags = " ".join(x for x in line.split(":", 1)[1].split() if x in wanted)
                break
    return {"cpu": model, "flags": flags, "nproc": str(os.cpu_count())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataroot", required=True)
    p.add_argument("--ngf", type=int, default=32)
    p.add_argument("--ndf", type=int, default=32)
    p.add_argument("--n-blocks", type=int, default=6)
    p.add_argument("--load-size", type=int, default=143)
    p.add_argument("--crop-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = ModelConfig(ngf=args.ngf, ndf=args.ndf, n_blocks=args.n_blocks)
    data = DataConfig(dataroot=args.dataroot, load_size=args.load_size, crop_size=args.crop_size)
    variants = [
        Variant("before", False, False, False, True),
        Variant("fp32", True, True, False, False),
        Variant("fp32-nchw", True, False, False, False),
    ]
    if native_bf16(torch.device("cpu")):
        variants += [Variant("bf16", True, True, True, False), Variant("bf16-nchw", True, False, True, False)]
    for v in variants:
        v.setup(model, data)
    wall: dict[str, list[float]] = {v.name: [] for v in variants}
    cpu: dict[str, list[float]] = {v.name: [] for v in variants}
    for i in range(args.warmup + args.iters):
        for v in variants:
            w0, c0 = time.perf_counter(), time.process_time()
            v.iteration(i)
            if i >= args.warmup:
                wall[v.name].append(time.perf_counter() - w0)
                cpu[v.name].append(time.process_time() - c0)
    config = f"ngf {args.ngf} ndf {args.ndf} blocks {args.n_blocks} load {args.load_size} crop {args.crop_size}"
    info = {**cpu_description(), "torch": torch.__version__, "threads": args.threads, "iters": args.iters}
    info["config"] = config
    print(json.dumps(info))
    base = statistics.median(wall["before"])
    for v in variants:
        w, c = statistics.median(wall[v.name]), statistics.median(cpu[v.name])
        print(json.dumps({"variant": v.name, "wall_s_per_iter": round(w, 4), "cpu_s_per_iter": round(c, 4),
                          "speedup_vs_before": round(base / w, 2)}))


if __name__ == "__main__":
    main()
