"""Anti-aliased down- and up-sampling (blur-pool), as in the authors' generator and discriminator.

The blur kernels are fixed, but they are persistent buffers named ``filt`` because the authors'
checkpoints contain them; loading those checkpoints with ``strict=True`` needs the same names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _binomial_kernel(taps: list[float]) -> torch.Tensor:
    row = torch.tensor(taps, dtype=torch.float32)
    kernel = row[:, None] * row[None, :]
    return kernel / kernel.sum()


def _full_precision(x: torch.Tensor) -> torch.autocast:
    """Blur in fp32 even under bf16 autocast.

    On CPU, torch 2.13 has no oneDNN kernel for bf16 depthwise (grouped) convs and runs them
    group by group through the slow reference path: one training step went from 2.7 s to 67 s.
    The blur is a tiny fraction of the FLOPs, so fp32 costs nothing and keeps the filter exact.
    """
    return torch.autocast(device_type=x.device.type, enabled=False)


def _like(x: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    # Cast only when needed, so an fp32 trace (ONNX export) records no Cast node.
    return x if x.dtype == filt.dtype else x.to(filt.dtype)


class Downsample(nn.Module):
    """Blur then subsample by 2: reflect-pad 1, depthwise 3x3 [1,2,1]^2/16, stride 2.

    (N, C, H, W) -> (N, C, ceil(H/2), ceil(W/2)).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.pad = nn.ReflectionPad2d(1)
        self.register_buffer("filt", _binomial_kernel([1.0, 2.0, 1.0])[None, None].repeat(channels, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _full_precision(x):
            return F.conv2d(self.pad(_like(x, self.filt)), self.filt, stride=2, groups=self.channels)


class Upsample(nn.Module):
    """Upsample by 2 with a blur: replicate-pad 1, depthwise transposed 4x4 conv, crop one border.

    The kernel is [1,3,3,1]^2/64 scaled by stride^2 = 4 so the DC gain stays 1.
    (N, C, H, W) -> (N, C, 2H, 2W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.pad = nn.ReplicationPad2d(1)
        self.register_buffer(
            "filt", (_binomial_kernel([1.0, 3.0, 3.0, 1.0]) * 4)[None, None].repeat(channels, 1, 1, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _full_precision(x):
            out = F.conv_transpose2d(
                self.pad(_like(x, self.filt)), self.filt, stride=2, padding=2, groups=self.channels
            )
        # The transposed conv yields 2n+2; the even filter needs one row/column dropped on each side.
        return out[:, :, 1:-1, 1:-1]


def instance_norm(channels: int) -> nn.InstanceNorm2d:
    """InstanceNorm without affine parameters or running stats: contributes nothing to state dicts."""
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
