"""One optimisation iteration of the training loop: the task computes losses, this module trains on them.

The division follows timm's task API and nanoGPT's loop: :class:`training.task.DCLTask` only runs the
networks and returns its losses as a dict; zeroing gradients, the backward passes, averaging gradients
across data-parallel ranks and the optimiser steps happen here, in the authors' order (spec 8.4):

1. translate once (the fakes of this iteration);
2. the discriminators' loss, backward, average, one Adam step over D_A and D_B;
3. with the discriminators frozen, the generators' loss against the *updated* discriminators, reusing
   the fakes of step 1; backward, average, then the G step and the heads' step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from training.task import DCLTask, Optimizers, PatchIds

# Averages the gradients of the given modules across data-parallel ranks (see trainer.py).
GradSync = Callable[[Sequence[nn.Module]], None]
Autocast = Callable[[], contextlib.AbstractContextManager]


@contextlib.contextmanager
def frozen(modules: Sequence[nn.Module]) -> Iterator[None]:
    """No gradients for ``modules`` inside (the G loss must not fill the discriminators' .grad)."""
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def train_step(
    task: DCLTask,
    opt: Optimizers,
    real_a: torch.Tensor,
    real_b: torch.Tensor,
    *,
    autocast: Autocast = contextlib.nullcontext,
    grad_sync: GradSync | None = None,
    drawn_ids: Sequence[PatchIds] | None = None,
) -> dict[str, torch.Tensor]:
    """Train on one batch; returns the detached losses and ``images`` (real A, fake B, real B, fake A).

    Args:
        autocast: a context for the forward passes (bf16 autocast, or none); backward runs outside it.
        grad_sync: called with the modules whose gradients are complete, before each optimiser step.
        drawn_ids: replaces the random patch draws (see :meth:`DCLTask.g_losses`).
    """
    discs, gens = task.discriminators(), task.generators()
    with autocast():
        tr = task.translate(real_a, real_b)
        d = task.d_losses(real_a, real_b, tr)
    opt.d.zero_grad(set_to_none=True)
    (d["d/a"] + d["d/b"]).backward()
    if grad_sync:
        grad_sync(discs)
    opt.d.step()

    with frozen(discs):
        with autocast():
            g = task.g_losses(real_a, real_b, tr, drawn_ids)
        opt.g.zero_grad(set_to_none=True)
        opt.f.zero_grad(set_to_none=True)
        g["g/total"].backward()
    if grad_sync:
        grad_sync([*gens, *task.head_modules()])
    opt.g.step()
    opt.f.step()
    out = {k: v.detach() for k, v in {**d, **g}.items()}
    out["images"] = torch.stack([real_a[0], tr.fake_b[0].detach(), real_b[0], tr.fake_a[0].detach()])
    return out
