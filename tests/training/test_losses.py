"""PatchNCE (DCL form) against the authors' values, and the pieces that distinguish it from CUT's."""

from __future__ import annotations

import torch

from training.losses import gan_loss, patch_nce


def test_patch_nce_matches_reference_rows_and_mean(load_ref):
    ref = load_ref("patchnce")
    rows = patch_nce(ref["feat_q"], ref["feat_k"], ref["config"].get("nce_T", 0.07))
    assert (rows - ref["loss_per_row"]).abs().max().item() <= 1e-5
    assert abs(rows.mean().item() - ref["loss_mean"].item()) <= 1e-6
    # It is DCL's all-minibatch-negatives loss, not CUT's per-image variant.
    assert abs(rows.mean().item() - ref["cut_style_loss_mean"].item()) > 0.1


def test_patch_nce_single_image(load_ref):
    ref = load_ref("patchnce")
    rows = patch_nce(ref["feat_q"][:256], ref["feat_k"][:256])
    assert (rows - ref["loss_per_row_first_image_only"]).abs().max().item() <= 1e-5
    assert abs(rows.mean().item() - ref["loss_mean_first_image_only"].item()) <= 1e-6


def test_patch_nce_gives_keys_no_gradient():
    q = torch.randn(8, 4, requires_grad=True)
    k = torch.randn(8, 4, requires_grad=True)
    patch_nce(q, k).mean().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


def test_generator_hinge_is_the_real_form():
    logits = torch.tensor([[-2.0, 0.5, 3.0]])
    assert gan_loss(logits, True).item() == torch.relu(1 - logits).mean().item()
    assert gan_loss(logits, False).item() == torch.relu(1 + logits).mean().item()
