"""Projection heads: PatchSampleF (DCL's H_X / H_Y) and MappingF (SimDCL's similarity heads)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Row-wise x / (||x||_2 + 1e-7): the epsilon is added to the norm, as the authors do.

    The norm is the authors' ``sqrt(sum(x**2))``, except that an all-zero row gets norm 0 through a
    branch with a zero gradient: sqrt's gradient there is inf * 0 = NaN. Such rows occur (a patch of
    post-ReLU zeros through an MLP with zero biases, the training init), and one NaN gradient poisons
    every weight at the next step. Other rows take exactly the authors' operations, in value and gradient.
    """
    squares = x.pow(2).sum(1, keepdim=True)
    nonzero = squares > 0
    norm = torch.where(nonzero, torch.where(nonzero, squares, 1.0).sqrt(), 0.0)
    return x / (norm + 1e-7)


class PatchSampleF(nn.Module):
    """Samples patch positions from each feature map and embeds them with a per-level 2-layer MLP.

    The MLPs (``mlp_0`` ... ``mlp_{L-1}``, Linear C_l->nc, ReLU, Linear nc->nc) depend on the
    feature widths, so :meth:`build` must create them before an optimiser or a checkpoint sees the
    head. The authors create them on the first forward instead (spec 6); here an unbuilt head
    refuses to run, because an optimiser made before a lazy build would silently never train them.
    """

    def __init__(self, nc: int = 256) -> None:
        super().__init__()
        self.nc = nc
        self.num_levels = 0

    @property
    def built(self) -> bool:
        return self.num_levels > 0

    def build(self, channels: Sequence[int], device: torch.device | None = None) -> None:
        for level, c in enumerate(channels):
            mlp = nn.Sequential(nn.Linear(c, self.nc), nn.ReLU(), nn.Linear(self.nc, self.nc))
            setattr(self, f"mlp_{level}", mlp.to(device) if device is not None else mlp)
        self.num_levels = len(channels)

    def forward(
        self,
        feats: Sequence[torch.Tensor],
        num_patches: int = 256,
        patch_ids: Sequence[torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Embed sampled patches.

        Args:
            feats: L maps (B, C_l, H_l, W_l).
            num_patches: positions per level (all of them if the map is smaller).
            patch_ids: ids to reuse (the query side), one int64 tensor per level; drawn
                uniformly without replacement when None (the key side).

        Returns:
            L tensors (B * P_l, nc), image-major, rows L2-normalised; and the ids used.
        """
        if not self.built:
            raise RuntimeError("PatchSampleF.build() must run before the head is used (and before its optimiser)")
        out, ids_used = [], []
        for level, feat in enumerate(feats):
            b, c, h, w = feat.shape
            if patch_ids is not None:
                ids = patch_ids[level].to(feat.device)
            else:
                ids = torch.randperm(h * w, device=feat.device)[: min(num_patches, h * w)]
            # Gather through a channel-first flatten rather than permute(0, 2, 3, 1): the index
            # backward then writes a fresh contiguous gradient. A channels-last gradient reaching
            # InstanceNorm at batch size 1 gets wrong input gradients on torch 2.13 CPU (spec 14).
            rows = feat.flatten(2)[:, :, ids].transpose(1, 2).reshape(b * ids.numel(), c)
            out.append(l2_normalize(getattr(self, f"mlp_{level}")(rows)))
            ids_used.append(ids)
        return out, ids_used


class MappingF(nn.Module):
    """SimDCL similarity head: (L=4, P=256, nc=256) patch embeddings -> one 64-d unit vector.

    The stacked embeddings are read as a 4-channel 256x256 image: conv 3x3/2, ReLU, global
    average pool, Linear, ReLU, Linear, L2-normalise. Output (1, 64).
    """

    def __init__(self, in_channels: int = 4, width: int = 64) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, width),
        )

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        return l2_normalize(self.model(stacked.unsqueeze(0)))
