"""The deterministic initial predictor ``g(y)`` of Deblurring via Stochastic Refinement (Whang et al. 2022, Alg. 1)."""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from torch.nn import functional as F


class _ResBlock(nn.Module):
    """``x + conv(act(conv(act(x))))`` with a 1×1 projection when the width changes; no normalisation."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(x))
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class DeblurPredictor(ModelMixin, ConfigMixin):
    r"""Fully convolutional U-Net ``g``: blurry ``y`` → initial estimate ``x_init = y + g_θ(y)``.

    The DvSR paper's predictor is an SR3 U-Net with self-attention, positional encoding and
    normalisation removed, so that it runs on any image size. This is the same idea at a small scale:
    residual blocks without normalisation, stride-2 convolutions down, nearest-neighbour upsampling
    and skip concatenations up, and a global skip (``residual=True``) so that an untrained network is
    the identity. Images are in ``[-1, 1]``; height and width must be multiples of
    :attr:`downsample_factor` (the pipeline pads).
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (32, 64, 96, 128),
        layers_per_block: int = 1,
        residual: bool = True,
    ):
        super().__init__()
        if residual and in_channels != out_channels:
            raise ValueError("residual=True needs in_channels == out_channels")
        if len(block_out_channels) < 1 or layers_per_block < 1:
            raise ValueError("block_out_channels must be non-empty and layers_per_block >= 1")
        widths = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        prev = widths[0]
        for i, width in enumerate(widths):
            self.down_blocks.append(nn.Sequential(*[_ResBlock(prev if j == 0 else width, width) for j in range(layers_per_block)]))
            prev = width
            if i < len(widths) - 1:
                self.downsamplers.append(nn.Conv2d(width, width, 3, stride=2, padding=1))
        self.mid_block = _ResBlock(prev, prev)
        self.up_blocks = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i in reversed(range(len(widths))):
            width = widths[i]
            self.up_blocks.append(nn.Sequential(*[_ResBlock(prev + width if j == 0 else width, width) for j in range(layers_per_block)]))
            prev = width
            if i > 0:
                self.upsamplers.append(nn.Conv2d(width, widths[i - 1], 3, padding=1))
                prev = widths[i - 1]
        self.conv_out = nn.Conv2d(widths[0], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def downsample_factor(self) -> int:
        """Height and width of the input must be multiples of this (``2^(levels-1)``)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        """``sample``: blurry ``(B, C, H, W)`` in ``[-1, 1]``; returns ``x_init`` of the same shape."""
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample must be (B, {self.config.in_channels}, H, W), got {tuple(sample.shape)}"
                             + (": add a batch axis, sample[None]" if sample.ndim == 3 else ""))
        factor = self.downsample_factor
        if sample.shape[-2] % factor or sample.shape[-1] % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {tuple(sample.shape[-2:])}")
        h = self.conv_in(sample)
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h)
            skips.append(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
        h = self.mid_block(h)
        for i, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1))
            if i < len(self.upsamplers):
                h = self.upsamplers[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(h))
        return sample + out if self.config.residual else out
