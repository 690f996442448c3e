"""Seconds per complete training iteration (D step + G/heads step, batch 1), ours vs the authors' math.

    python bench/train_speed.py --model dcl --dataroot ../shared/data/horse2zebra \
        --load-size 143 --crop-size 128 [--ngf 64] [--threads 1] [--iters 6] [--warmup 2] \
        [--amp bf16] [--baseline]

``--baseline`` also times, in the same process and on the same batches, the step as the authors
compute it: PatchNCE through a broadcast N x N x C cosine similarity, four separate generator
passes, and the key-side encoder passes recomputed. The last line is one JSON object with
``median_cpu_s_per_iter`` (process CPU time: robust when the machine is shared) and
``median_wall_s_per_iter`` (and the same for the baseline, plus the ratio).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Iterator
from unittest import mock

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from training import task as task_module  # noqa: E402
from training.config import DataConfig, ModelConfig, OptimConfig  # noqa: E402
from training.data import UnalignedDataset  # noqa: E402
from training.step import train_step  # noqa: E402
from training.task import Translations, build_task  # noqa: E402


def authors_patch_nce(feat_q: torch.Tensor, feat_k: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """PatchNCE as the authors compute it: cosine similarity broadcast over an N x N x C tensor."""
    feat_k = feat_k.detach()
    n = feat_q.shape[0]
    l_pos = F.cosine_similarity(feat_q, feat_k, dim=1).unsqueeze(1)
    l_neg = F.cosine_similarity(feat_q.unsqueeze(1), feat_k.unsqueeze(0), dim=2)
    l_neg = l_neg.masked_fill(torch.eye(n, dtype=torch.bool, device=feat_q.device), -10.0)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(n, dtype=torch.long, device=feat_q.device), reduction="none")


def authors_translate(self, real_a: torch.Tensor, real_b: torch.Tensor) -> Translations:
    """Four separate generator passes, then the key-side encoder passes run again."""
    layers = self.cfg.nce_layers
    fake_b, fake_a = self.gen_ab(real_a), self.gen_ba(real_b)
    idt_a, idt_b = self.gen_ab(real_b), self.gen_ba(real_a)
    return Translations(
        fake_b, fake_a, idt_a, idt_b, self.gen_ab.encode(real_a, layers), self.gen_ba.encode(real_b, layers)
    )


@contextlib.contextmanager
def authors_math() -> Iterator[None]:
    with (
        mock.patch.object(task_module, "patch_nce", authors_patch_nce),
        mock.patch.object(task_module.DCLTask, "translate", authors_translate),
    ):
        yield


def time_steps(args: argparse.Namespace, batches: list, baseline: bool) -> tuple[float, float]:
    torch.manual_seed(0)
    cfg = ModelConfig(model=args.model, ngf=args.ngf, ndf=args.ndf)
    task = build_task(cfg)
    task.build_heads(64)
    task.initialize()
    opt = task.make_optimizers(OptimConfig())
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.amp == "bf16" else contextlib.nullcontext
    cpu, wall = [], []
    with authors_math() if baseline else contextlib.nullcontext():
        for i, (a, b) in enumerate(batches):
            c0, w0 = time.process_time(), time.perf_counter()
            train_step(task, opt, a, b, autocast=amp)
            if i >= args.warmup:
                cpu.append(time.process_time() - c0)
                wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["dcl", "simdcl"], default="dcl")
    p.add_argument("--dataroot", required=True)
    p.add_argument("--load-size", type=int, default=143)
    p.add_argument("--crop-size", type=int, default=128)
    p.add_argument("--ngf", type=int, default=64)
    p.add_argument("--ndf", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp", choices=["none", "bf16"], default="none")
    p.add_argument("--baseline", action="store_true", help="also time the authors' formulation")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = UnalignedDataset(DataConfig(dataroot=args.dataroot, load_size=args.load_size, crop_size=args.crop_size))
    batches = [(data[i]["A"][None], data[i]["B"][None]) for i in range(args.warmup + args.iters)]
    result = {
        "model": args.model,
        "crop_size": args.crop_size,
        "ngf": args.ngf,
        "threads": args.threads,
        "amp": args.amp,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "iters": args.iters,
    }
    result["median_cpu_s_per_iter"], result["median_wall_s_per_iter"] = time_steps(args, batches, False)
    if args.baseline:
        cpu, wall = time_steps(args, batches, True)
        result["baseline_median_cpu_s_per_iter"], result["baseline_median_wall_s_per_iter"] = cpu, wall
        result["speedup_cpu"] = round(cpu / result["median_cpu_s_per_iter"], 3)
    print(json.dumps(result))  # noqa: T201 - a benchmark's report


if __name__ == "__main__":
    main()
