"""The training loop: optimisers, linear-decay schedule, AMP, data parallelism, checkpoints, logs.

Data parallelism: ``torchrun --nproc-per-node N dclgan train ...`` starts N processes; each
trains on its shard of every epoch and gradients are averaged across processes after each of
the iteration's two backward passes (D, then G and heads) before the optimiser steps, with
NCCL on GPUs and gloo on CPU. This is what DistributedDataParallel's reducer does; we call the
collective ourselves because one DCL iteration runs two backward passes through networks that
are each used several times, a pattern DDP's per-forward bookkeeping does not support without
``find_unused_parameters`` and static-graph workarounds. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from service.contract import atomic_write_text
from training.checkpoint import CheckpointError, atomic_torch_save, read_checkpoint, rng_state, set_rng_state
from training.config import TrainConfig
from training.data import UnalignedDataset, epoch_order, to_uint8
from training.step import train_step
from training.task import OFFICIAL_NAMES, build_task, iter_official_state

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The logged losses stopped being finite numbers: training has diverged and further steps are waste."""


def lr_multiplier(epoch: int, n_epochs: int, n_epochs_decay: int) -> float:
    """The authors' ``linear`` policy: full rate for n_epochs, then linear decay (spec 2).

    Epoch n_epochs + k trains at (1 - k / (n_epochs_decay + 1)) of the base rate.
    """
    return 1.0 - max(0, epoch - n_epochs) / (n_epochs_decay + 1)


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` -> this rank's GPU if there is one, else CPU; a bare ``cuda`` -> this rank's GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        requested = f"cuda:{local_rank}"
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested}: no CUDA device is usable here (CPU-only PyTorch or no GPU visible)")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 convolutions run on native kernels here (CUDA with bf16, AVX-512 BF16 or AMX CPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_amp(requested: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where :func:`native_bf16`, else ``none``; an explicit ``bf16`` without it is refused.

    Without bf16 kernels torch runs bf16 convolutions through its reference path, measured 25x
    slower per step than fp32 on an AVX2-only EPYC: refusing beats crawling.
    """
    if requested == "auto":
        return "bf16" if native_bf16(device) else "none"
    if requested == "bf16" and not native_bf16(device):
        raise ValueError(f"--amp bf16: {device.type} here has no native bf16 kernels (needs AVX-512 BF16 or AMX)")
    return requested


def _init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) when not launched by it.

    NCCL when this process trains on a GPU, gloo on CPU (decided by the device, not by whether
    the machine happens to have a GPU).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world


def _average_gradients(modules: Sequence[nn.Module]) -> None:
    """All-reduce every gradient of ``modules`` in one flat buffer and divide by the world size."""
    grads = [p.grad for m in modules for p in m.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over every parameter and buffer, to check that ranks hold identical weights."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_sample_grid_image(grid: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def save_sample_grid(images: torch.Tensor, path: Path) -> None:
    """(4, C, H, W) in [-1, 1] -> one PNG: real A | fake B | real B | fake A."""
    save_sample_grid_image(np.concatenate(list(to_uint8(images)), axis=1), path)


def open_tensorboard(folder: Path) -> Any:
    """A TensorBoard SummaryWriter when the optional ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard not installed (pip install 'dclgan-serve[tensorboard]'): logging to metrics.jsonl only")
        return None
    return SummaryWriter(str(folder))


class Trainer:
    """Owns one run: ``Trainer(cfg).fit()``; ``resume=True`` continues from ``latest.pt``."""

    def __init__(self, cfg: TrainConfig, resume: bool = False) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.rank, self.world = _init_distributed(self.device)
        self.is_main = self.rank == 0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # TF32 for training speed; --no-tf32 gives true fp32 (the reference tolerances assume it).
            torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
            torch.backends.cudnn.allow_tf32 = cfg.tf32
            torch.backends.cudnn.benchmark = True  # fixed crop sizes: pick the fastest conv algorithms once
        self.amp = resolve_amp(cfg.amp, self.device)
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.run_dir = Path(cfg.checkpoints_dir) / cfg.name
        torch.manual_seed(cfg.seed)
        self.task = build_task(cfg.model).to(self.device)
        self.task.build_heads(min(cfg.data.crop_size, 64))
        self.task.initialize()
        self.task.to(memory_format=self.memory_format)
        if self.world > 1:
            for tensor in self.task.state_dict().values():
                dist.broadcast(tensor, 0)
        self.opt = self.task.make_optimizers(cfg.optim)
        self.dataset = UnalignedDataset(cfg.data, seed=cfg.seed, n_epochs=cfg.n_epochs)
        self.batches_per_epoch = len(self.dataset) // (cfg.data.batch_size * self.world)
        if self.batches_per_epoch == 0:
            raise ValueError("fewer images than batch_size x processes: nothing to train on")
        self.epoch, self.epoch_iter, self.iteration = cfg.epoch_count, 0, 0
        self.skipped_images = 0
        self.best_score = math.inf  # the validation score (lower is better) of best.pt
        # Compute spent on this run across resumes (process CPU seconds, wall seconds in fit):
        # the x axis of quality-per-CPU-hour curves.
        self.cpu_seconds, self.wall_seconds = 0.0, 0.0
        self._clock = (time.process_time(), time.perf_counter())
        self.stop_signal: str | None = None
        self.validator = None
        if cfg.eval_every and self.is_main:
            from training.validation import Validator  # imports the Inception network's loader

            self.validator = Validator(
                self.dataset.val_a,
                self.dataset.val_b,
                cfg.val_side or cfg.data.crop_size,
                self.device,
                self.run_dir / "validation",
            )
        self.tb = open_tensorboard(self.run_dir / "tensorboard") if self.is_main else None
        if resume:
            self._load(self.run_dir / "latest.pt")
        else:
            torch.manual_seed(cfg.seed + self.rank)

    # -- state ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "config": self.cfg.to_dict(),
            "epoch": self.epoch,
            "epoch_iter": self.epoch_iter,
            "iteration": self.iteration,
            "networks": {name: sd for name, sd in iter_official_state(self.task)},
            "optimizers": {k: o.state_dict() for k, o in zip("gdf", self.opt.all(), strict=True)},
            "rng": rng_state(),
            "skipped_images": self.skipped_images,
            "best_score": self.best_score,
            **dict(zip(("cpu_seconds", "wall_seconds"), self._spent(), strict=True)),
        }

    def _load(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        state = read_checkpoint(path)
        try:
            for name, sd in state["networks"].items():
                getattr(self.task, OFFICIAL_NAMES[name]).load_state_dict(sd, strict=True)
            for key, opt in zip("gdf", self.opt.all(), strict=True):
                opt.load_state_dict(state["optimizers"][key])
        except (KeyError, AttributeError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(
                f"--resume: {path} does not hold this run's networks ({self.cfg.model.model}, as config.json says)"
            ) from exc
        self.epoch, self.epoch_iter, self.iteration = state["epoch"], state["epoch_iter"], state["iteration"]
        self.skipped_images = state.get("skipped_images", 0)
        self.best_score = state.get("best_score", math.inf)
        self.cpu_seconds, self.wall_seconds = state.get("cpu_seconds", 0.0), state.get("wall_seconds", 0.0)
        self._clock = (time.process_time(), time.perf_counter())
        set_rng_state(state["rng"])
        if self.rank:
            torch.manual_seed(self.cfg.seed + self.rank + self.iteration)
        log.info("resumed %s at epoch %d, iteration %d", path, self.epoch, self.iteration)

    def _spent(self) -> tuple[float, float]:
        """(CPU, wall) seconds of this run so far, previous sessions included."""
        return (
            round(self.cpu_seconds + time.process_time() - self._clock[0], 1),
            round(self.wall_seconds + time.perf_counter() - self._clock[1], 1),
        )

    def save(self, label: str = "latest") -> None:
        """``<label>.pt`` plus the authors' ``<label>_net_<name>.pth`` (their epoch label is the bare number)."""
        self._check_finite()
        if not self.is_main:
            return
        atomic_torch_save(self.state(), self.run_dir / f"{label}.pt")
        official_label = label.removeprefix("epoch_")
        for name, sd in iter_official_state(self.task):
            atomic_torch_save(sd, self.run_dir / f"{official_label}_net_{name}.pth")

    def _check_finite(self) -> None:
        """Raise :class:`TrainingDiverged` if a weight is NaN or infinite. Called before every checkpoint and
        validation (one host sync each): losses are only read at log lines, and a checkpoint written between
        two of them must not hold diverged weights."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.task.parameters()]).all()
        if not bool(finite):
            raise TrainingDiverged(
                f"weights became non-finite by iteration {self.iteration}; no checkpoint was written from them "
                "(lower the learning rate, or check the data)"
            )

    # -- loop -----------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _set_lr(self) -> float:
        mult = lr_multiplier(self.epoch, self.cfg.n_epochs, self.cfg.n_epochs_decay)
        for opt in self.opt.all():
            for group in opt.param_groups:
                group.setdefault("initial_lr", group["lr"])
                group["lr"] = group["initial_lr"] * mult
        return mult

    def _loader(self) -> DataLoader:
        bs = self.cfg.data.batch_size
        order = epoch_order(len(self.dataset), self.cfg.seed, self.epoch, self.rank, self.world)
        self.dataset.set_epoch(self.epoch)
        return DataLoader(
            self.dataset,
            batch_size=bs,
            sampler=order[self.epoch_iter * bs :],
            num_workers=self.cfg.data.num_workers,
            drop_last=True,
            # A private generator: creating the iterator must not draw from the global RNG, or
            # a resumed run (which creates one more loader) would diverge from an uninterrupted one.
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def _write_record(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _log_window(self, window: dict[str, torch.Tensor], count: int, mult: float, seconds: float) -> dict[str, Any]:
        """One log line: the losses averaged over the last ``count`` iterations.

        The sums stay on the device between log lines; reading them here is the loop's only
        host-device synchronisation.
        """
        names = sorted(window)
        means = (torch.stack([window[k] for k in names]).float() / count).tolist()
        diverged = [k for k, v in zip(names, means, strict=True) if not math.isfinite(v)]
        if diverged:
            raise TrainingDiverged(
                f"losses {', '.join(diverged)} became non-finite by iteration {self.iteration}; no checkpoint is "
                "written from non-finite weights (lower the learning rate, or check the data)"
            )
        record = {
            "iteration": self.iteration,
            "epoch": self.epoch,
            "lr_mult": round(mult, 6),
            "s_per_iter": round(seconds / count, 4),
            "skipped_images": self.skipped_images,
            **{k: round(v, 6) for k, v in zip(names, means, strict=True)},
        }
        self._write_record(record)
        if self.tb:
            for key, value in record.items():
                if "/" in key:
                    self.tb.add_scalar(f"loss/{key}", value, self.iteration)
            self.tb.add_scalar("lr", self.cfg.optim.lr * mult, self.iteration)
        return record

    def evaluate(self) -> dict[str, Any] | None:
        """Validation FID/KID of both directions; keeps ``best.pt`` by the KID sum (see validation.py)."""
        if self.validator is None:
            return None
        self._check_finite()  # a minute of FID on NaN weights tells nothing
        t0 = time.perf_counter()
        scores, grid = self.validator(self.task)
        cpu, wall = self._spent()
        record = {"iteration": self.iteration, "epoch": self.epoch, "event": "eval", "cpu_hours": round(cpu / 3600, 5)}
        record.update(wall_hours=round(wall / 3600, 5), **scores)
        record["eval_seconds"] = round(time.perf_counter() - t0, 2)
        if scores["score"] < self.best_score:
            self.best_score = scores["score"]
            record["best"] = True
            self.save("best")
        self._write_record(record)
        save_sample_grid_image(grid, self.run_dir / "samples" / f"eval_{self.iteration:07d}.png")
        if self.tb:
            for key, value in scores.items():
                self.tb.add_scalar(f"val/{key}", value, self.iteration)
            self.tb.add_image("val/samples", grid, self.iteration, dataformats="HWC")
            self.tb.flush()
        log.info("validation at iteration %d: %s", self.iteration, json.dumps(scores))
        return record

    def _trim_log(self) -> None:
        """After a resume, drop log lines past the checkpoint so each iteration appears once."""
        path = self.run_dir / "metrics.jsonl"
        if not (self.is_main and path.is_file()):
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["iteration"] <= self.iteration:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # the half-written last line of a killed process
                log.warning("dropping an unreadable line of %s: %.60s", path, line)
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT ask the loop to stop after the current iteration and checkpoint.

        A stopped run then loses at most one iteration and ``--resume`` continues it exactly. A second
        signal stops at once, without a checkpoint (``latest.pt`` stays the last one written): for a user
        who will not wait for a validation in progress, a minute or two.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum: int, _frame: Any) -> None:
            name = signal.Signals(signum).name
            if self.stop_signal is not None:
                log.warning("%s again: stopping now, without a checkpoint", name)
                raise KeyboardInterrupt(name)
            self.stop_signal = name
            log.info("%s: stopping after this iteration with a checkpoint (again: stop at once, without)", name)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _should_stop(self) -> bool:
        if self._done():  # the same iteration on every rank
            return True
        if self.world == 1:
            return self.stop_signal is not None
        # A signal may reach the ranks at different iterations, and every rank must leave at the same one
        # or the next all_reduce hangs: they agree at log lines only, so the step itself never syncs.
        if self.iteration % self.cfg.print_freq:
            return False
        flag = torch.tensor(float(self.stop_signal is not None), device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def fit(self) -> dict[str, Any] | None:
        """Train until the schedule ends, ``max_iters``, or SIGTERM/SIGINT; returns the last log record.

        Log lines go to ``metrics.jsonl`` every ``print_freq`` iterations (losses averaged over
        them), validation lines every ``eval_every``; nothing per iteration is kept in memory.
        """
        cfg = self.cfg
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.run_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))
            self._trim_log()
            layout = "channels_last" if cfg.channels_last else "NCHW"
            log.info("training on %s, amp %s, %s", self.device, self.amp, layout)
        sync = _average_gradients if self.world > 1 else None
        last_epoch = cfg.n_epochs + cfg.n_epochs_decay
        record: dict[str, Any] | None = None
        window: dict[str, torch.Tensor] = {}
        count, seconds = 0, 0.0
        self.task.train()
        start = self.iteration
        with self._stop_on_signals():
            stopped = self._done()  # max_iters already reached (a resume at it): not one more step
            while self.epoch <= last_epoch and not stopped:
                mult = self._set_lr()
                bar = tqdm(
                    total=self.batches_per_epoch,
                    initial=self.epoch_iter,
                    desc=f"epoch {self.epoch}/{last_epoch}",
                    disable=not self.is_main,
                    dynamic_ncols=True,
                )
                for batch in self._loader():
                    t0 = time.perf_counter()
                    real_a = batch["A"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                    real_b = batch["B"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                    out = train_step(self.task, self.opt, real_a, real_b, autocast=self._autocast, grad_sync=sync)
                    self.iteration += 1
                    self.epoch_iter += 1
                    self.skipped_images += int(batch["skipped"].sum())
                    for key, value in out.items():
                        if key.startswith(("d/", "g/")):
                            window[key] = window[key] + value if key in window else value.clone()
                    count, seconds = count + 1, seconds + time.perf_counter() - t0
                    bar.update(1)
                    if self.iteration % cfg.print_freq == 0:
                        record = self._log_window(window, count, mult, seconds)
                        window, count, seconds = {}, 0, 0.0
                        losses = {k.split("/")[-1]: f"{v:.3f}" for k, v in record.items() if "/" in k}
                        bar.set_postfix(losses, refresh=False)
                    if self.is_main and self.iteration % cfg.sample_freq == 0:
                        save_sample_grid(out["images"], self.run_dir / "samples" / f"iter_{self.iteration:07d}.png")
                    if self.iteration % cfg.save_latest_freq == 0:
                        self.save("latest")
                    if cfg.eval_every and self.iteration % cfg.eval_every == 0:
                        self.evaluate()
                    if self._should_stop():
                        stopped = True
                        break
                bar.close()
                if self.epoch_iter >= self.batches_per_epoch:
                    if self.epoch % cfg.save_epoch_freq == 0:
                        self.save(f"epoch_{self.epoch}")
                    self.epoch, self.epoch_iter = self.epoch + 1, 0
        if count:
            record = self._log_window(window, count, mult, seconds)
        if cfg.eval_every and self.iteration % cfg.eval_every and self.stop_signal is None and self.iteration > start:
            self.evaluate()  # the final weights are scored too, unless a signal asked us to hurry or none trained
        self.save("latest")
        if self.tb:
            self.tb.close()
        if self.stop_signal:
            log.info("%s: stopped at iteration %d; --resume continues from latest.pt", self.stop_signal, self.iteration)
        log.info(
            "rank %d finished at iteration %d; weights sha256 %s", self.rank, self.iteration, weights_digest(self.task)
        )
        return record

    def _done(self) -> bool:
        return self.cfg.max_iters is not None and self.iteration >= self.cfg.max_iters
