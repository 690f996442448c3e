"""ResnetGenerator: the DCL generator, layer for layer as the authors build it.

Indices into ``self.model`` matter: NCE features are taken by index (4, 8, 12, 16 by default)
and the state-dict keys (``model.1.weight`` ... ``model.30.bias``, ``model.7.filt``) must match
the authors' released checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from training.nets.layers import Downsample, Upsample, instance_norm

DEFAULT_NCE_LAYERS = (4, 8, 12, 16)


class ResnetBlock(nn.Module):
    """x + [pad, conv3, IN, ReLU, pad, conv3, IN](x); no activation after the sum."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            instance_norm(dim),
            nn.ReLU(True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(dim, dim, 3, bias=True),
            instance_norm(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class ResnetGenerator(nn.Module):
    """Encoder (7x7 conv, two anti-aliased downsamplings), residual blocks, mirrored decoder.

    Args:
        input_nc, output_nc: image channels.
        ngf: width of the first layer; every other width scales with it.
        n_blocks: residual blocks at 1/4 resolution (9 in the paper).

    Input (N, input_nc, H, W) in [-1, 1] with H, W multiples of 4 (at least 8); output
    (N, output_nc, H, W) in (-1, 1).
    """

    def __init__(self, input_nc: int = 3, output_nc: int = 3, ngf: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        self.ngf, self.n_blocks = ngf, n_blocks
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, 7, bias=True),
            instance_norm(ngf),
            nn.ReLU(True),
        ]
        for mult in (1, 2):  # conv -> IN -> ReLU -> blur-pool, twice
            c_in, c_out = ngf * mult, ngf * mult * 2
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=True),
                instance_norm(c_out),
                nn.ReLU(True),
                Downsample(c_out),
            ]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]
        for mult in (4, 2):  # blur-upsample -> conv -> IN -> ReLU, twice
            c_in, c_out = ngf * mult, ngf * mult // 2
            layers += [
                Upsample(c_in),
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=True),
                instance_norm(c_out),
                nn.ReLU(True),
            ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, 7, bias=True), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def encode(self, x: torch.Tensor, layers: Sequence[int] = DEFAULT_NCE_LAYERS) -> list[torch.Tensor]:
        """Run the network only as far as the last requested layer and return those outputs.

        ``layers`` must be ascending. Layers 4 and 8 are conv outputs *before* their
        InstanceNorm; 12 and 16 are residual-block outputs.
        """
        return self._run(x, layers, stop_early=True)[1]

    def forward_with_features(
        self, x: torch.Tensor, layers: Sequence[int] = DEFAULT_NCE_LAYERS
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Full forward pass that also returns the encoder features, so keys need no second pass."""
        return self._run(x, layers, stop_early=False)

    def _run(
        self, x: torch.Tensor, layers: Sequence[int], stop_early: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats: list[torch.Tensor] = []
        wanted, last = set(layers), max(layers)
        for index, layer in enumerate(self.model):
            x = layer(x)
            if index in wanted:
                feats.append(x)
            if stop_early and index == last:
                break
        return x, feats
