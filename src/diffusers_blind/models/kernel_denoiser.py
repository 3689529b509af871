"""Plug-and-Play prior on blur kernels (Fast EM §4.2; docs/conventions.md, "Kernel denoiser (PnP prior)")."""

from __future__ import annotations

import math
import numbers

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class KernelDenoiser(ModelMixin, ConfigMixin):
    """FDnCNN-style kernel denoiser ``D_σ(k)``: conv3×3 layers ``2 → 32 → … → 32 → 1`` with ReLU between.

    Input: a sum-1 kernel ``(B, 1, k, k)`` and the noise level ``σ`` (float or ``(B,)``) in the same
    units, given as a constant second channel. Output: the denoised kernel directly (no residual),
    as in the reference ``FDnCNN(in_nc=2, out_nc=1, nc=32, nb=5)`` with biases and no batch norm,
    so converted reference weights load unchanged (``input_scale=1``).

    ``input_scale`` multiplies kernel and σ before the network and divides the output: sum-1
    kernels have entries ~1e-3, and a scale of ``k²`` brings them to ~1, which trains better.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 2,
        out_channels: int = 1,
        hidden_channels: int = 32,
        num_layers: int = 5,
        input_scale: float = 1.0,
    ):
        super().__init__()
        if in_channels != 2:
            raise ValueError(f"in_channels must be 2 (the kernel and its noise-level map), got {in_channels}")
        if num_layers < 2:
            raise ValueError(f"num_layers must be >= 2, got {num_layers}")
        if isinstance(hidden_channels, bool) or not isinstance(hidden_channels, numbers.Integral) or hidden_channels < 1:
            raise ValueError(f"hidden_channels must be an integer >= 1, got {hidden_channels!r}")
        if isinstance(input_scale, bool) or not isinstance(input_scale, numbers.Real) or not 0 < input_scale < math.inf:
            raise ValueError(f"input_scale must be a finite number > 0, got {input_scale!r}")
        widths = [in_channels] + [hidden_channels] * (num_layers - 1) + [out_channels]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=True))
            if i < num_layers - 1:
                layers.append(nn.ReLU(inplace=True))
        self.body = nn.Sequential(*layers)

    def forward(self, kernel: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """``kernel``: ``(B, 1, k, k)``; ``sigma``: the noise std in sum-1 kernel units, a number or ``(B,)``."""
        if kernel.ndim != 4 or kernel.shape[1] != 1:
            raise ValueError(f"kernel must be (B, 1, k, k), got {tuple(kernel.shape)}")
        scale = self.config.input_scale
        sigma = torch.as_tensor(sigma, dtype=kernel.dtype, device=kernel.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] not in (1, kernel.shape[0]):
            raise ValueError(f"sigma must be one number or one per kernel ({kernel.shape[0]}), got {sigma.shape[0]}")
        if not torch.isfinite(sigma).all() or (sigma < 0).any():
            raise ValueError("sigma must be finite and >= 0")
        noise_map = (sigma * scale).expand(kernel.shape[0], 1, *kernel.shape[-2:])
        return self.body(torch.cat([kernel * scale, noise_map], dim=1)) / scale
