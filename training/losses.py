"""Losses of DCL and SimDCL: GAN (hinge/least-squares), PatchNCE, L1 identity, SimDCL similarity.

Pure functions over tensors; no optimisers and no networks here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

GanMode = Literal["hinge", "lsgan"]


def gan_loss(logits: torch.Tensor, target_real: bool, mode: GanMode = "hinge") -> torch.Tensor:
    """Mean GAN loss of a logit map.

    Hinge: real -> mean(relu(1 - p)), fake -> mean(relu(1 + p)). The generator uses the
    *real* form too (authors' choice, spec 5), not -mean(p).
    """
    if mode == "hinge":
        return F.relu(1 - logits).mean() if target_real else F.relu(1 + logits).mean()
    if mode == "lsgan":
        target = torch.ones_like(logits) if target_real else torch.zeros_like(logits)
        return F.mse_loss(logits, target)
    raise ValueError(f"unknown GAN mode {mode!r}")


def patch_nce(feat_q: torch.Tensor, feat_k: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """DCL's PatchNCE: each query against every key of the minibatch, its own key the positive.

    Args:
        feat_q, feat_k: (N, C) rows for one layer (N = batch * patches). Keys are detached.

    Returns:
        (N,) per-row cross-entropy. Equivalent to the authors' broadcast cosine similarity
        (an N x N x C intermediate), computed here as one matrix product of normalised rows.
        The diagonal of the negatives is set to -10 *before* the division by T.
    """
    feat_k = feat_k.detach()
    # Always fp32: logits are scaled by 1/T ~ 14, which would magnify bf16 rounding.
    q = feat_q.float()
    k = feat_k.float()
    eps = 1e-8  # torch.cosine_similarity clamps each norm at eps
    q = q / q.norm(dim=1, keepdim=True).clamp_min(eps)
    k = k / k.norm(dim=1, keepdim=True).clamp_min(eps)
    sim = q @ k.t()
    positives = sim.diagonal().unsqueeze(1)
    negatives = sim.masked_fill(torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device), -10.0)
    logits = torch.cat([positives, negatives], dim=1) / temperature
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target, reduction="none")


def identity_l1(translated: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between G(y) and y for an image y already in the target domain."""
    return F.l1_loss(translated, original)


def similarity_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SimDCL's similarity term: the *mean* |a - b| over the 64 entries.

    The authors write L1Loss('sum'), but that string lands in the deprecated size_average slot,
    so the reduction they actually run is the mean (spec 9.2).
    """
    return (a - b).abs().mean()
