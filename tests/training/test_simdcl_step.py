"""One complete SimDCL iteration against the authors' recorded step (shared/reference/dclgan/simdcl_step.pt).

What it pins beyond DCL's step: the NCE and identity terms carry no lambda, the fake-side similarity
rows come from fresh patch ids (six head calls, in the authors' order), each similarity head reads the
right rows and is compared with the right partner, the real-side rows are not detached (so the real
encoder passes and the key-side heads get gradients), and one Adam at lr 2e-4, betas (0.5, 0.999)
trains all six heads.
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
    record_sim_outputs,
    step,
)
from training.config import ModelConfig, OptimConfig


@pytest.fixture(scope="module")
def ref(load_ref):
    return load_ref("simdcl_step")


def test_initial_translations_losses_and_similarity_outputs(ref):
    task = make_task(ref)
    heads, sims = record_head_calls(task), record_sim_outputs(task)
    ra, rb = ref["real_A"], ref["real_B"]
    with torch.no_grad():
        tr = task.translate(ra, rb)
        losses = {**task.d_losses(ra, rb, tr), **task.g_losses(ra, rb, tr, drawn_ids(ref["init_patch_calls"]))}
    for ours, theirs in (("fake_b", "fake_B"), ("fake_a", "fake_A"), ("idt_a", "idt_A"), ("idt_b", "idt_B")):
        assert_close(getattr(tr, ours), ref[theirs], 1e-4, ours)
    assert_head_calls(heads, ref["init_patch_calls"])
    for name, want in ref["init_sim_outputs"].items():
        assert_close(sims[name], want, 1e-6, name)
    assert_close(losses["nce_per_layer"], ref["init_nce_per_layer"], 1e-5, "nce_per_layer")
    assert_losses(losses, ref["init_losses"], 1e-5)


def test_full_step_losses_gradients_and_all_ten_networks(ref):
    task = make_task(ref)
    opt = task.make_optimizers(OptimConfig())
    heads = {id(p) for m in task.head_modules() for p in m.parameters()}
    assert {id(p) for g in opt.f.param_groups for p in g["params"]} == heads and len(task.head_modules()) == 6
    assert (opt.f.param_groups[0]["lr"], opt.f.param_groups[0]["betas"]) == (2e-4, (0.5, 0.999))
    calls, sims = record_head_calls(task), record_sim_outputs(task)

    out, grads = step(task, opt, ref["real_A"], ref["real_B"], drawn_ids(ref["step_patch_calls"]))

    assert_head_calls(calls, ref["step_patch_calls"])
    for name, want in ref["step_sim_outputs"].items():
        assert_close(sims[name], want, 1e-6, name)
    assert_close(out["nce_per_layer"], ref["step_nce_per_layer"], 1e-5, "nce_per_layer")
    assert_losses(out, ref["step_losses"], 1e-5)
    assert set(grads) == set(ref["step_grads"])  # all ten networks, the key-side heads F1 and F2 included
    assert_grads(ref, grads)
    assert_post_state(task, ref)


def test_simdcl_needs_256_patches_but_any_head_width():
    # The similarity heads read 256 patch rows per layer; their weights do not depend on netF_nc
    # (the record above uses 32, the authors' default is 256).
    assert ModelConfig(model="simdcl", netf_nc=32).netf_nc == 32
    with pytest.raises(ValueError, match="num_patches=256"):
        ModelConfig(model="simdcl", num_patches=128)
