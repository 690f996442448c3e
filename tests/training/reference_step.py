"""Replaying the authors' recorded training steps (``dcl_step.pt``, ``simdcl_step.pt``, ``dcl_steps3.pt``).

Shared by the step tests: build the tiny task from a record, replay its patch ids, run one full
iteration while capturing the gradients each optimiser sees, and compare against the record with the
tolerances of ``shared/reference/dclgan/README.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from training.config import ModelConfig
from training.step import train_step
from training.task import OFFICIAL_NAMES, DCLTask, Optimizers, PatchIds, build_task

LOSS_NAMES = {  # authors' name -> ours
    "D_A": "d/b",
    "D_B": "d/a",
    "G_A": "g/gan_ab",
    "G_B": "g/gan_ba",
    "NCE1": "g/nce_ab",
    "NCE2": "g/nce_ba",
    "idt_A": "g/idt_a",
    "idt_B": "g/idt_b",
    "G": "g/total",
}
SIM_HEADS = {"F3": "sim_real_a", "F4": "sim_fake_b", "F5": "sim_real_b", "F6": "sim_fake_a"}
Grads = dict[str, dict[str, torch.Tensor]]


def make_task(ref: dict[str, Any]) -> DCLTask:
    """The record's tiny model at its initial weights; only the options the record names are set."""
    c = ref["config"]
    cfg = ModelConfig(
        model=c["model"], ngf=c["ngf"], ndf=c["ndf"], n_blocks=c["n_blocks"], netf_nc=c["netF_nc"],
        num_patches=c["num_patches"], nce_layers=tuple(c["nce_layers"]), nce_t=c["nce_T"],
        gan_mode=c["gan_mode"], lambda_gan=c["lambda_GAN"],
        # The weights the record's model applies; the SimDCL record names lambda_NCE "_option" (unused).
        lambda_nce=c.get("lambda_NCE"), lambda_idt=c.get("lambda_IDT"), lambda_sim=c.get("lambda_SIM"),
    )  # fmt: skip
    task = build_task(cfg)
    task.build_heads(c["image_size"])
    for name, state in ref["init_state"].items():
        getattr(task, OFFICIAL_NAMES[name]).load_state_dict(state, strict=True)
    return task


def drawn_ids(calls: Sequence[dict[str, Any]]) -> list[PatchIds]:
    """The ids of the calls that drew them, in order; each call given ids must reuse the latest draw."""
    draws: list[PatchIds] = []
    for call in calls:
        if call["ids_given"]:
            assert all(torch.equal(a, b) for a, b in zip(call["ids"], draws[-1], strict=True))
        else:
            draws.append(call["ids"])
    return draws


def record_head_calls(task: DCLTask) -> list[tuple[str, list[torch.Tensor]]]:
    """(official head name, patch ids used) for every PatchSampleF call from now on, in order."""
    calls: list[tuple[str, list[torch.Tensor]]] = []
    for name, attr in (("F1", "head_a"), ("F2", "head_b")):
        getattr(task, attr).register_forward_hook(lambda _m, _a, out, name=name: calls.append((name, out[1])))
    return calls


def assert_head_calls(calls: list[tuple[str, list[torch.Tensor]]], want: Sequence[dict[str, Any]]) -> None:
    """Same heads in the same order, each on the recorded patch ids (so fresh draws are really fresh)."""
    assert [name for name, _ in calls] == [c["head"] for c in want]
    for i, ((_, ids), c) in enumerate(zip(calls, want, strict=True)):
        assert all(torch.equal(a, b) for a, b in zip(ids, c["ids"], strict=True)), f"head call {i}"


def record_sim_outputs(task: DCLTask) -> dict[str, torch.Tensor]:
    """The latest output of each similarity head, by official name (F3..F6)."""
    out: dict[str, torch.Tensor] = {}
    for name, attr in SIM_HEADS.items():
        getattr(task, attr).register_forward_hook(lambda _m, _a, y, name=name: out.__setitem__(name, y.detach()))
    return out


def step(
    task: DCLTask, opt: Optimizers, real_a: torch.Tensor, real_b: torch.Tensor, draws: Sequence[PatchIds]
) -> tuple[dict[str, torch.Tensor], Grads]:
    """One training iteration through the training loop's step; returns its losses and the gradients of every
    network as its optimiser saw them (captured at the gradient-averaging point, before the step)."""
    grads: Grads = {}
    names = {id(net): name for name, net in task.networks().items()}

    def capture(modules: Sequence[nn.Module]) -> None:
        for m in modules:
            grads[names[id(m)]] = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}

    out = train_step(task, opt, real_a, real_b, grad_sync=capture, drawn_ids=draws)
    return out, grads


def assert_losses(out: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float) -> None:
    for theirs, value in want.items():
        ours = LOSS_NAMES.get(theirs, "g/sim")
        assert abs(out[ours].item() - value.item()) <= tol, f"{theirs}: {out[ours].item()} vs {value.item()}"


def assert_grads(ref: dict[str, Any], grads: Grads) -> None:
    """Relative L2 error <= 1e-3 per tensor, skipping the zero-gradient biases the README names."""
    checked: set[str] = set()
    for net, ref_grads in ref["step_grads"].items():
        skip = set(ref["zero_grad_bias_keys"].get(net, []))
        for key, want in ref_grads.items():
            if key in skip or want.abs().max() == 0:
                continue
            got = grads[net][key]
            rel = ((got - want).norm() / want.norm()).item()
            assert rel <= 1e-3, f"{net}.{key}: relative L2 error {rel:.2e}"
            checked.add(net)
    assert checked == set(ref["step_grads"])  # every network contributes; guards against a vacuous loop


def assert_post_state(task: DCLTask, ref: dict[str, Any]) -> None:
    """<= 1e-6 on every element whose reference gradient exceeds 1e-6 (Adam's first step is ~lr*sign).

    The zero-gradient biases are skipped: their recorded gradient is round-off noise, so Adam moves
    them by +-lr in a direction no implementation can reproduce, with no effect on any output.
    """
    for net, state in ref["post_state"].items():
        ours = getattr(task, OFFICIAL_NAMES[net]).state_dict()
        skip = set(ref["zero_grad_bias_keys"].get(net, []))
        for key, want in state.items():
            if key in skip:
                continue
            grad = ref["step_grads"][net].get(key)
            mask = grad.abs() > 1e-6 if grad is not None else torch.ones_like(want, dtype=torch.bool)
            if mask.any():
                assert (ours[key] - want)[mask].abs().max().item() <= 1e-6, f"{net}.{key}"


def assert_close(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.2e} > {tol:.0e}"
