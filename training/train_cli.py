"""``dclgan train``: command-line options (named like the authors', with hyphens) -> TrainConfig."""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import Any

from training.config import APPLIED_WEIGHTS, DataConfig, ModelConfig, OptimConfig, TrainConfig
from training.data import DataError

log = logging.getLogger(__name__)


def field_default(cls: type, name: str) -> Any:
    """The default of a config dataclass field: the one source of ``dclgan train``'s defaults."""
    (found,) = [f for f in fields(cls) if f.name == name]
    return found.default_factory() if found.default is MISSING else found.default  # type: ignore[misc]


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _weight_help(name: str, what: str) -> str:
    """``--lambda-*`` help from :data:`APPLIED_WEIGHTS`: which model applies the weight, at what default."""
    applied = {model: weights[name] for model, weights in APPLIED_WEIGHTS.items() if name in weights}
    defaults = ", ".join(f"{value} with {model}" for model, value in applied.items())
    return f"{what}, used by {' and '.join(applied)} only: an error with any other model (None: {defaults})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dclgan train",
        description="Train DCLGAN (dcl) or SimDCL (simdcl). Defaults are the authors' code defaults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def add(group: Any, cls: type, flag: str, help_text: str, **kwargs: Any) -> None:
        """An option whose destination is the field of ``cls`` named like the flag, defaulting to that field."""
        dest = kwargs.pop("dest", flag.lstrip("-").replace("-", "_").lower())
        group.add_argument(flag, dest=dest, default=field_default(cls, dest), help=help_text, **kwargs)

    p.add_argument("--dataroot", required=True, default=argparse.SUPPRESS, help="folder with trainA/ and trainB/")
    add(p, TrainConfig, "--name", "run name: checkpoints go to CHECKPOINTS_DIR/NAME")
    add(p, TrainConfig, "--checkpoints-dir", "folder holding one folder per run")
    add(p, ModelConfig, "--model", "dcl (DCLGAN) or simdcl (SimDCL)", choices=["dcl", "simdcl"])
    p.add_argument("--resume", action="store_true", help="continue from CHECKPOINTS_DIR/NAME/latest.pt")
    m, o, d, t = (p.add_argument_group(g) for g in ("networks and losses", "optimiser", "data", "run"))
    add(m, ModelConfig, "--ngf", "generator filters in the first convolution", type=int)
    add(m, ModelConfig, "--ndf", "discriminator filters in the first convolution", type=int)
    add(m, ModelConfig, "--n-blocks", "generator residual blocks (resnet_9blocks = 9)", type=int)
    add(m, ModelConfig, "--netF-nc", "features of the patch projection heads (netF)", type=int)
    nce_layers = "generator layers whose features PatchNCE compares"
    add(m, ModelConfig, "--nce-layers", nce_layers, type=_int_tuple, metavar="N,N,...")
    add(m, ModelConfig, "--num-patches", "patches sampled per layer for PatchNCE", type=int)
    add(m, ModelConfig, "--nce-T", "PatchNCE temperature", type=float)
    add(m, ModelConfig, "--gan-mode", "adversarial loss", choices=["hinge", "lsgan"])
    add(m, ModelConfig, "--lambda-GAN", "weight of the adversarial loss", type=float)
    add(m, ModelConfig, "--lambda-NCE", _weight_help("lambda_nce", "weight of the PatchNCE loss"), type=float)
    add(m, ModelConfig, "--lambda-IDT", _weight_help("lambda_idt", "weight of the identity loss"), type=float)
    add(m, ModelConfig, "--lambda-SIM", _weight_help("lambda_sim", "weight of the similarity loss"), type=float)
    add(o, OptimConfig, "--lr", "Adam learning rate of G and D", type=float)
    add(o, OptimConfig, "--beta1", "Adam beta1 of G and D", type=float)
    add(o, OptimConfig, "--beta2", "Adam beta2 of G and D", type=float)
    add(o, OptimConfig, "--head-lr", "learning rate of the projection heads (None: DCL 1e-3, SimDCL --lr)", type=float)
    add(d, DataConfig, "--load-size", "images are resized to this before the random crop", type=int)
    add(d, DataConfig, "--crop-size", "training crop (a multiple of 4)", type=int)
    add(d, DataConfig, "--no-flip", "no random horizontal flips", action="store_true")
    add(d, DataConfig, "--max-dataset-size", "at most this many images per domain (None: all)", type=int)
    add(d, DataConfig, "--batch-size", "images per domain per iteration", type=int)
    add(d, DataConfig, "--num-workers", "DataLoader worker processes (images are cached in RAM)", type=int)
    d.add_argument(
        "--val-size",
        type=int,
        default=None,
        help="images per domain held out of trainA/trainB for validation (None: 100 with --eval-every, else 0)",
    )
    add(d, DataConfig, "--cache-mb", "RAM for decoded, resized training images", type=int)
    add(t, TrainConfig, "--n-epochs", "epochs at the full learning rate", type=int)
    add(t, TrainConfig, "--n-epochs-decay", "epochs of linear decay to ~0", type=int)
    add(t, TrainConfig, "--epoch-count", "number the first epoch gets (the authors' option for restarts)", type=int)
    add(t, TrainConfig, "--max-iters", "stop after this many iterations (None: train every epoch)", type=int)
    add(t, TrainConfig, "--seed", "seed of weights, data order and augmentation", type=int)
    add(
        t,
        TrainConfig,
        "--amp",
        "bf16 autocast; auto uses it where the device has native bf16 kernels (GPUs, AVX-512 BF16/AMX CPUs)",
        choices=["auto", "none", "bf16"],
    )
    add(t, TrainConfig, "--channels-last", "NHWC memory layout", action=argparse.BooleanOptionalAction)
    add(t, TrainConfig, "--tf32", "CUDA: TF32 matmuls and convolutions", action=argparse.BooleanOptionalAction)
    add(t, TrainConfig, "--threads", "torch intra-op threads (None: torch's default)", type=int)
    add(t, TrainConfig, "--device", "auto, cpu, cuda or cuda:N")
    add(t, TrainConfig, "--save-latest-freq", "iterations between latest.pt saves", type=int)
    add(t, TrainConfig, "--save-epoch-freq", "epochs between epoch_<E>.pt saves", type=int)
    add(t, TrainConfig, "--print-freq", "iterations between progress-bar loss updates", type=int)
    add(t, TrainConfig, "--sample-freq", "iterations between sample grids", type=int)
    add(
        t,
        TrainConfig,
        "--eval-every",
        "iterations between validation FID/KID runs on held-out images; keeps best.pt (0: never)",
        type=int,
    )
    add(t, TrainConfig, "--val-side", "side validation translates held-out images at (None: --crop-size)", type=int)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    raw = vars(args)

    def pick(cls, **extra):
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw and f.name not in extra}, **extra)

    model = pick(ModelConfig)
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
        val_side=args.val_side,
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
    try:
        stored = TrainConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--resume: {path} is not a readable run configuration ({exc})") from exc
    if "eval_every" in given and cli.eval_every and stored.data.val_size < 2:
        raise ValueError(
            "--eval-every: this run holds out no validation images (it started without --eval-every), and "
            "images cannot be held out of a run half-way; start a new run with --eval-every to validate"
        )
    # The run is the folder given: a copied or moved run continues where it is now, never in the folder
    # its config.json was first written to.
    changes = {name: getattr(cli, name) for name in ("name", "checkpoints_dir", "max_iters", "threads", "device")}
    changes.update({name: getattr(cli, name) for name in RUN_CONTROL if name in given})
    local = cli.data
    data = replace(stored.data, dataroot=local.dataroot, num_workers=local.num_workers, cache_mb=local.cache_mb)
    return replace(stored, data=data, **changes)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Imported here: they import torch, which --help does not need.
    from training.metrics_fid import InceptionWeightsError
    from training.trainer import Trainer, TrainingDiverged

    try:
        try:  # what is wrong with the command, its run folder or its checkpoint: one line, exit 2
            cfg = config_from_args(args)
            if args.resume:
                cfg = resumed_config(cfg, argv)
            else:
                refuse_to_overwrite(Path(cfg.checkpoints_dir) / cfg.name)
            trainer = Trainer(cfg, resume=args.resume)
        except (DataError, ValueError, FileNotFoundError, InceptionWeightsError) as exc:
            log.error("%s", exc)
            return 2
        try:  # while training only the data and the Inception weights are the user's; anything else is a bug
            trainer.fit()
        except (DataError, InceptionWeightsError) as exc:
            log.error("%s", exc)
            return 2
    except TrainingDiverged as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:  # a second SIGINT/SIGTERM (see Trainer._stop_on_signals), or one before training
        log.error("interrupted; --resume continues from the last latest.pt")
        return 130
    log.info("checkpoints in %s", trainer.run_dir)
    return 0


def refuse_to_overwrite(run_dir: Path) -> None:
    """A new run never starts over a folder holding a run's checkpoints: without ``--resume`` it would
    overwrite ``latest.pt`` and trim the old run's log to nothing."""
    held = sorted(p.name for p in run_dir.glob("*.pt")) if run_dir.is_dir() else []
    if held:
        raise ValueError(
            f"{run_dir} already holds a run ({', '.join(held[:3])}): --resume continues it; "
            "choose another --name (or --checkpoints-dir), or remove the folder to start over"
        )
