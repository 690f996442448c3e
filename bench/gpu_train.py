"""GPU training for a short loan of one CUDA machine with no network (run by ``bench/gpu_train.sh``).

In order, each step bounded so the whole stays inside ``--budget-s``:

1. the machine: torch and CUDA versions, the GPU's name;
2. parity: one DCL iteration of the authors' record (``dcl_step.pt``, packed beside the data) on
   CUDA with TF32 off, compared with the record's losses, gradients and post-step weights at the
   record's tolerances;
3. speed: training iterations per second at batch 1 and 8 of the configuration below, with bf16
   autocast and channels_last, the project's first GPU training figure (the paper quotes
   0.41 s/iteration on a P100 for its default model);
4. training on the packed data until the budget is spent, with TF32 and bf16 on, then the two
   generators' weights (authors' layout) and the metrics log are copied to ``--out``.

``--dry-run`` runs every step on the CPU with a tiny model, so the tests can run the script end to end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig  # noqa: E402
from training.step import train_step  # noqa: E402
from training.task import build_task  # noqa: E402
from training.trainer import Trainer  # noqa: E402


def parity(record_path: Path, device: torch.device) -> dict[str, Any]:
    """One recorded DCL step on ``device`` in exact fp32; ``ok`` and the first mismatch, if any."""
    from tests.training import reference_step as ref_step

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ref = torch.load(record_path, map_location="cpu", weights_only=True)
    task = ref_step.make_task(ref).to(device)
    opt = task.make_optimizers(OptimConfig())
    ids = [[i.to(device) for i in call] for call in ref_step.drawn_ids(ref["step_patch_calls"])]
    out, grads = ref_step.step(task, opt, ref["real_A"].to(device), ref["real_B"].to(device), ids)
    try:
        ref_step.assert_losses({k: v.cpu() for k, v in out.items()}, ref["step_losses"], 1e-5)
        ref_step.assert_grads(ref, {n: {k: g.cpu() for k, g in gs.items()} for n, gs in grads.items()})
        ref_step.assert_post_state(task.cpu(), ref)
    except AssertionError as exc:
        return {"ok": False, "mismatch": str(exc)[:500]}
    return {"ok": True}


def speed(model: ModelConfig, crop: int, batch: int, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Iterations per second of the full training step on random batches (bf16 autocast where native)."""
    torch.manual_seed(0)
    task = build_task(model).to(device)
    task.build_heads(min(crop, 64))
    task.initialize()
    task.to(memory_format=torch.channels_last)
    opt = task.make_optimizers(OptimConfig())
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def batch_pair() -> tuple[torch.Tensor, torch.Tensor]:
        a, b = (torch.rand(batch, 3, crop, crop, device=device) * 2 - 1 for _ in range(2))
        return a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)

    data = [batch_pair() for _ in range(4)]
    for i in range(warmup):
        train_step(task, opt, *data[i % 4], autocast=autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        train_step(task, opt, *data[i % 4], autocast=autocast)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / steps
    return {"batch": batch, "s_per_iter": round(seconds, 5), "iter_per_s": round(1 / seconds, 2),
            "images_per_s": round(batch / seconds, 1), "bf16": bf16}


def train(args: argparse.Namespace, model: ModelConfig, device: torch.device, seconds: float) -> Path:
    """Train on the pack for ``seconds`` (the trainer stops, checkpoints and returns as on SIGTERM)."""
    size = int(json.loads((args.pack / "pack.json").read_text())["size"])
    cfg = TrainConfig(
        name="gpu", checkpoints_dir=str(args.work), n_epochs=args.n_epochs, n_epochs_decay=args.n_epochs_decay,
        amp="auto", tf32=True, channels_last=True, device=str(device), save_latest_freq=2000,
        save_epoch_freq=10**6, print_freq=50,
        sample_freq=10**9, threads=args.threads, model=model, optim=OptimConfig(lr=args.lr),
        data=DataConfig(dataroot=str(args.pack), load_size=size, crop_size=args.crop, batch_size=args.batch_size),
    )
    trainer = Trainer(cfg)

    def stop() -> None:
        trainer.stop_signal = "time budget"

    timer = threading.Timer(seconds, stop)
    timer.start()
    try:
        trainer.fit()
    finally:
        timer.cancel()
    return trainer.run_dir


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", type=Path, required=True, help="folder made by gpu_train.sh --pack")
    p.add_argument("--out", type=Path, required=True, help="where the weights, log and results go")
    p.add_argument("--work", type=Path, required=True, help="scratch folder for the run's checkpoints")
    p.add_argument("--budget-s", type=float, default=540, help="seconds for the whole script")
    p.add_argument("--ngf", type=int, default=32)
    p.add_argument("--ndf", type=int, default=64)
    p.add_argument("--n-blocks", type=int, default=9)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=4e-4, help="2e-4 x sqrt(batch size)")
    p.add_argument("--n-epochs", type=int, default=200)
    p.add_argument("--n-epochs-decay", type=int, default=200)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, tiny sizes")
    args = p.parse_args()
    start = time.monotonic()
    results: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if args.dry_run:
        device = torch.device("cpu")
        model = ModelConfig(ngf=4, ndf=4, n_blocks=1, netf_nc=16, num_patches=16)
        sizes, steps, warmup = [1, 2], 2, 1
        args.crop = 32
    elif not torch.cuda.is_available():
        print("gpu_train: no CUDA device here (use --dry-run on a CPU)", file=sys.stderr)  # noqa: T201
        return 2
    else:
        device = torch.device("cuda")
        results["gpu"] = torch.cuda.get_device_name(device)
        model = ModelConfig(ngf=args.ngf, ndf=args.ndf, n_blocks=args.n_blocks)
        sizes, steps, warmup = [1, 8], 30, 5
    print(json.dumps(results))  # noqa: T201
    args.out.mkdir(parents=True, exist_ok=True)

    record = args.pack / "dcl_step.pt"
    try:
        results["parity"] = parity(record, device) if record.is_file() else {"ok": None, "why": f"no {record}"}
    except Exception:  # noqa: BLE001 - a failed check is reported, and training still runs
        results["parity"] = {"ok": False, "error": traceback.format_exc(limit=3)[-500:]}
    print(json.dumps({"parity": results["parity"]}))  # noqa: T201
    results["speed"] = []
    for batch in sizes:
        results["speed"].append(speed(model, args.crop, batch, device, steps, warmup))
        print(json.dumps(results["speed"][-1]))  # noqa: T201

    left = args.budget_s - (time.monotonic() - start) - 30  # 30 s to save and copy
    results["train_seconds"] = round(left, 1)
    run_dir = train(args, model, device, max(left, 1.0))
    state = torch.load(run_dir / "latest.pt", map_location="cpu", weights_only=True)
    results["iterations"] = state["iteration"]
    results["config"] = state["config"]
    for name in ("latest_net_G_A.pth", "latest_net_G_B.pth", "metrics.jsonl"):
        shutil.copy(run_dir / name, args.out / name)
    (args.out / "gpu_train_results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({"iterations": results["iterations"], "out": str(args.out)}))  # noqa: T201
    return 0 if results["parity"]["ok"] is not False else 1


if __name__ == "__main__":
    sys.exit(main())
