"""The training loop's step: heads built before their optimiser, and the G pass leaving D's gradients alone.

The numbers of a whole step are pinned by the reference tests (test_dcl_step, test_simdcl_step,
test_dcl_steps3); these check the structure those cannot see.
"""

from __future__ import annotations

import pytest
import torch

from training.config import ModelConfig, OptimConfig
from training.step import train_step
from training.task import DCLTask

TINY = ModelConfig(ngf=4, ndf=4, n_blocks=1, netf_nc=16, num_patches=16)


def test_heads_must_be_built_before_their_optimiser():
    task = DCLTask(TINY)
    with pytest.raises(RuntimeError, match="build_heads"):
        task.make_optimizers(OptimConfig())
    task.build_heads(32)
    opt = task.make_optimizers(OptimConfig())
    heads = {id(p) for m in task.head_modules() for p in m.parameters()}
    assert len(heads) == 2 * 4 * 2 * 2  # two heads x four levels x two linears x (weight, bias)
    assert {id(p) for group in opt.f.param_groups for p in group["params"]} == heads


def test_the_generator_pass_leaves_the_discriminators_gradients_as_their_loss_made_them():
    task = DCLTask(TINY)
    task.build_heads(32)
    opt = task.make_optimizers(OptimConfig())
    synced: list[list[torch.nn.Module]] = []
    at_d_step: dict[str, torch.Tensor] = {}

    def sync(modules):
        synced.append(list(modules))
        if len(synced) == 1:
            at_d_step.update({n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None})

    real = torch.rand(2, 1, 3, 32, 32) * 2 - 1
    out = train_step(task, opt, real[0], real[1], grad_sync=sync)
    assert [len(m) for m in synced] == [2, 4]  # D_A and D_B; then G_A, G_B and both heads
    assert at_d_step and all(n.startswith(("disc_a", "disc_b")) for n in at_d_step)
    for name, p in task.named_parameters():
        if name.startswith("disc"):
            assert p.requires_grad and torch.equal(p.grad, at_d_step[name]), name
    assert out["images"].shape == (4, 3, 32, 32) and torch.isfinite(out["g/total"])
