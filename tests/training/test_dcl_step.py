"""One complete DCL iteration against the authors' recorded step (shared/reference/dclgan/dcl_step.pt).

This is the test that catches the torch 2.13 CPU InstanceNorm backward bug (spec 14): the
losses match either way, but the encoder gradients only match if the patch sampler hands a
contiguous gradient back to the residual blocks.
"""

from __future__ import annotations

import pytest
import torch

from tests.training.reference_step import (
    assert_close,
    assert_grads,
    assert_head_calls,
    assert_losses,
    assert_post_state,
    drawn_ids,
    make_task,
    record_head_calls,
    step,
)
from training.config import OptimConfig


@pytest.fixture(scope="module")
def step_ref(load_ref):
    return load_ref("dcl_step")


def test_initial_translations_and_losses(step_ref):
    task = make_task(step_ref)
    calls = record_head_calls(task)
    ra, rb = step_ref["real_A"], step_ref["real_B"]
    with torch.no_grad():
        tr = task.translate(ra, rb)
        losses = {**task.d_losses(ra, rb, tr), **task.g_losses(ra, rb, tr, drawn_ids(step_ref["init_patch_calls"]))}
    for ours, theirs in (("fake_b", "fake_B"), ("fake_a", "fake_A"), ("idt_a", "idt_A"), ("idt_b", "idt_B")):
        assert_close(getattr(tr, ours), step_ref[theirs], 1e-4, ours)
    assert_head_calls(calls, step_ref["init_patch_calls"])
    assert_losses(losses, step_ref["init_losses"], 1e-5)
    assert_close(losses["nce_per_layer"], step_ref["init_nce_per_layer"], 1e-5, "nce_per_layer")


def test_full_step_losses_gradients_and_weights(step_ref):
    task = make_task(step_ref)
    opt = task.make_optimizers(OptimConfig())
    assert opt.f.param_groups[0]["lr"] == 1e-3 and opt.f.param_groups[0]["betas"] == (0.9, 0.999)
    out, grads = step(task, opt, step_ref["real_A"], step_ref["real_B"], drawn_ids(step_ref["step_patch_calls"]))
    assert_losses(out, step_ref["step_losses"], 1e-5)
    assert_close(out["nce_per_layer"], step_ref["step_nce_per_layer"], 1e-5, "nce_per_layer")
    assert set(grads) == set(step_ref["step_grads"])
    assert_grads(step_ref, grads)
    assert_post_state(task, step_ref)
