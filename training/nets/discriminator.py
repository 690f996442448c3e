"""NLayerDiscriminator: the anti-aliased 3-layer PatchGAN of the authors' code.

Stride-1 4x4 convs each followed by a blur-pool; a 256x256 input gives a 30x30 logit map.
"""

from __future__ import annotations

import torch
from torch import nn

from training.nets.layers import Downsample, instance_norm


class NLayerDiscriminator(nn.Module):
    """PatchGAN returning raw logits (N, 1, h, w); no sigmoid (hinge or least-squares loss)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, 4, padding=1),
            nn.LeakyReLU(0.2, True),
            Downsample(ndf),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, padding=1, bias=True),
                instance_norm(ndf * mult),
                nn.LeakyReLU(0.2, True),
                Downsample(ndf * mult),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, 4, padding=1, bias=True),
            instance_norm(ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, 4, padding=1),
        ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
