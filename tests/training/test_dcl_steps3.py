"""Three consecutive DCL iterations against the authors' trajectory (shared/reference/dclgan/dcl_steps3.pt).

One step cannot tell the optimisers' hyper-parameters apart (Adam's first update is about lr*sign(g));
three steps with one set of optimisers pin every learning rate and both betas of G's, D's and the
heads' Adam: the README measured a wrong beta1 or learning rate at >= 5e-5 in ``post_state`` and a wrong
beta2 at >= 6e-4 in the cumulative update, against tolerances of 5e-6 and 2e-4.
"""

from __future__ import annotations

import pytest
import torch

from tests.training.reference_step import (
    assert_close,
    assert_head_calls,
    assert_losses,
    drawn_ids,
    make_task,
    record_head_calls,
    step,
)
from training.config import OptimConfig
from training.task import OFFICIAL_NAMES


@pytest.fixture(scope="module")
def ref(load_ref):
    return load_ref("dcl_steps3")


def compared(ref, net: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The learnable tensors the README compares: no ``filt`` buffers, no zero-gradient biases."""
    skip = set(ref["zero_grad_bias_keys"].get(net, []))
    return {k: v for k, v in state.items() if not k.endswith("filt") and k not in skip}


def test_three_steps_with_one_set_of_optimisers(ref):
    task = make_task(ref)
    opt = task.make_optimizers(OptimConfig())
    init = {net: compared(ref, net, sd) for net, sd in ref["init_state"].items()}
    calls = record_head_calls(task)
    for i, rec in enumerate(ref["steps"]):
        done = len(calls)
        with torch.no_grad():
            tr = task.translate(rec["real_A"], rec["real_B"])
        for ours, theirs in (("fake_b", "fake_B"), ("fake_a", "fake_A"), ("idt_a", "idt_A"), ("idt_b", "idt_B")):
            assert_close(getattr(tr, ours), rec[theirs], 1e-4, f"step {i + 1} {ours}")
        out, _ = step(task, opt, rec["real_A"], rec["real_B"], drawn_ids(rec["patch_calls"]))
        assert_head_calls(calls[done:], rec["patch_calls"])
        assert_losses(out, rec["losses"], 5e-5)
        assert_close(out["nce_per_layer"], rec["nce_per_layer"], 5e-5, f"step {i + 1} nce_per_layer")
        for net, want_state in rec["post_state"].items():
            ours = compared(ref, net, getattr(task, OFFICIAL_NAMES[net]).state_dict())
            want = compared(ref, net, want_state)
            assert ours.keys() == want.keys()
            for key in want:
                assert_close(ours[key], want[key], 5e-6, f"step {i + 1} {net}.{key}")
            # The cumulative update pins beta2: relative L2 error <= 2e-4 over the network.
            got_delta = torch.cat([(ours[k] - init[net][k]).flatten() for k in want])
            want_delta = torch.cat([(want[k] - init[net][k]).flatten() for k in want])
            rel = ((got_delta - want_delta).norm() / want_delta.norm()).item()
            assert rel <= 2e-4, f"step {i + 1} {net}: cumulative update off by {rel:.2e} (relative L2)"
