"""``dclgan train``: command-line options (named like the authors', with hyphens) -> TrainConfig."""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import fields, replace
from pathlib import Path

from training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig
from training.data import DataError

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dclgan train", description="Train DCLGAN (dcl) or SimDCL (simdcl).")
    p.add_argument("--dataroot", required=True, help="folder with trainA/ and trainB/")
    p.add_argument("--name", default="experiment", help="run name: checkpoints go to CHECKPOINTS_DIR/NAME")
    p.add_argument("--checkpoints-dir", default="checkpoints")
    p.add_argument("--model", choices=["dcl", "simdcl"], default="dcl")
    p.add_argument("--resume", action="store_true", help="continue from CHECKPOINTS_DIR/NAME/latest.pt")
    m, o, d, t = (p.add_argument_group(g) for g in ("networks and losses", "optimiser", "data", "run"))
    m.add_argument("--ngf", type=int, default=64)
    m.add_argument("--ndf", type=int, default=64)
    m.add_argument("--n-blocks", type=int, default=9, help="residual blocks (resnet_9blocks = 9)")
    m.add_argument("--netF-nc", dest="netf_nc", type=int, default=256)
    m.add_argument("--nce-layers", default="4,8,12,16")
    m.add_argument("--num-patches", type=int, default=256)
    m.add_argument("--nce-T", dest="nce_t", type=float, default=0.07)
    m.add_argument("--gan-mode", choices=["hinge", "lsgan"], default="hinge")
    m.add_argument("--lambda-GAN", dest="lambda_gan", type=float, default=1.0)
    m.add_argument("--lambda-NCE", dest="lambda_nce", type=float, default=None, help="dcl only (default 2.0)")
    m.add_argument("--lambda-IDT", dest="lambda_idt", type=float, default=None, help="dcl only (default 1.0)")
    m.add_argument("--lambda-SIM", dest="lambda_sim", type=float, default=None, help="simdcl only (default 10.0)")
    o.add_argument("--lr", type=float, default=2e-4)
    o.add_argument("--beta1", type=float, default=0.5)
    o.add_argument("--beta2", type=float, default=0.999)
    o.add_argument("--head-lr", type=float, default=None, help="default: the authors' (DCL 1e-3, SimDCL --lr)")
    d.add_argument("--load-size", type=int, default=286)
    d.add_argument("--crop-size", type=int, default=256)
    d.add_argument("--no-flip", action="store_true")
    d.add_argument("--max-dataset-size", type=int, default=None)
    d.add_argument("--batch-size", type=int, default=1)
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (images are cached in RAM)")
    d.add_argument(
        "--val-size",
        type=int,
        default=None,
        help="images per domain held out of trainA/trainB for validation (default: 100 with --eval-every, else 0)",
    )
    d.add_argument("--cache-mb", type=int, default=2048, help="RAM for decoded, resized training images")
    t.add_argument("--n-epochs", type=int, default=200, help="epochs at the full learning rate")
    t.add_argument("--n-epochs-decay", type=int, default=200, help="epochs of linear decay to ~0")
    t.add_argument("--epoch-count", type=int, default=1)
    t.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--amp",
        choices=["auto", "none", "bf16"],
        default="auto",
        help="bf16 autocast; auto uses it where the device has native bf16 kernels (GPUs, AVX-512 BF16/AMX CPUs)",
    )
    t.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC memory layout for networks and batches",
    )
    t.add_argument(
        "--tf32",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA: allow TF32 matmuls and convolutions (--no-tf32: exact fp32)",
    )
    t.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    t.add_argument("--save-latest-freq", type=int, default=5000, help="iterations between latest.pt saves")
    t.add_argument("--save-epoch-freq", type=int, default=50)
    t.add_argument("--print-freq", type=int, default=10, help="iterations between progress-bar loss updates")
    t.add_argument("--sample-freq", type=int, default=400, help="iterations between sample grids")
    t.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="iterations between validation FID/KID runs on held-out images; keeps best.pt (0: never)",
    )
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    raw = vars(args)

    def pick(cls, **extra):
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw and f.name not in extra}, **extra)

    model = pick(ModelConfig, nce_layers=tuple(int(x) for x in args.nce_layers.split(",")))
    if raw["val_size"] is None:
        raw["val_size"] = 100 if args.eval_every else 0
    return TrainConfig(
        name=args.name,
        checkpoints_dir=args.checkpoints_dir,
        n_epochs=args.n_epochs,
        n_epochs_decay=args.n_epochs_decay,
        epoch_count=args.epoch_count,
        max_iters=args.max_iters,
        seed=args.seed,
        amp=args.amp,
        channels_last=args.channels_last,
        tf32=args.tf32,
        eval_every=args.eval_every,
        threads=args.threads,
        device=args.device,
        save_latest_freq=args.save_latest_freq,
        save_epoch_freq=args.save_epoch_freq,
        print_freq=args.print_freq,
        sample_freq=args.sample_freq,
        model=model,
        optim=pick(OptimConfig),
        data=pick(DataConfig),
    )


# What ``--resume`` takes from the command line. The machine's options always come from it; the
# run's options only when given; any other option is what the run trains and is refused.
LOCAL = ("dataroot", "name", "checkpoints_dir", "resume", "max_iters", "threads", "device", "num_workers", "cache_mb")
RUN_CONTROL = (
    "amp",
    "channels_last",
    "tf32",
    "save_latest_freq",
    "save_epoch_freq",
    "print_freq",
    "sample_freq",
    "eval_every",
    "n_epochs",
    "n_epochs_decay",
)


def given_options(argv: list[str]) -> set[str]:
    """The destinations of the options ``argv`` sets, whatever their spelling (``--n-epochs=300`` too)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    return set(vars(parser.parse_args(argv)))


def resumed_config(cli: TrainConfig, argv: list[str]) -> TrainConfig:
    """The run's stored configuration, with the machine's options and any given run-control options.

    Networks, losses, optimiser and data options come from the checkpoint's run, so ``--resume``
    needs none of the original flags and cannot silently train something else; giving one is an
    error rather than an option that is accepted and ignored.
    """
    path = Path(cli.checkpoints_dir) / cli.name / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no run at {path.parent} (config.json missing)")
    given = given_options(argv)
    refused = sorted(given - set(LOCAL) - set(RUN_CONTROL))
    if refused:
        names = ", ".join("--" + name.replace("_", "-") for name in refused)
        raise ValueError(f"--resume continues the run as it was configured; start a new run to change {names}")
    stored = TrainConfig.from_dict(json.loads(path.read_text()))
    changes = {name: getattr(cli, name) for name in ("max_iters", "threads", "device")}
    changes.update({name: getattr(cli, name) for name in RUN_CONTROL if name in given})
    local = cli.data
    data = replace(stored.data, dataroot=local.dataroot, num_workers=local.num_workers, cache_mb=local.cache_mb)
    return replace(stored, data=data, **changes)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from training.trainer import Trainer  # imports torch

    try:
        cfg = config_from_args(args)
        if args.resume:
            cfg = resumed_config(cfg, argv)
        trainer = Trainer(cfg, resume=args.resume)
    except (DataError, ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    trainer.fit()
    log.info("checkpoints in %s", trainer.run_dir)
    return 0
