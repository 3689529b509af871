"""Single-image estimate of additive white Gaussian noise."""

from __future__ import annotations

import math

import torch


QUANTISATION_SIGMA = 1 / (255 * math.sqrt(12))
"""Std of the rounding error of 8-bit quantisation, ``1/√12`` of a level, in ``[0, 1]`` units."""

AUTO_SIGMA_FLOOR = 0.5 / 255
"""Smallest noise std an automatic estimate returns (half an 8-bit level, above :data:`QUANTISATION_SIGMA`):
an 8-bit image is never noise-free, and likelihood guidance with σ → 0 is unstable."""


def estimate_noise_sigma(image: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """Noise std of each image of a ``(B, C, H, W)`` batch, in the image's units (``[0, 1]`` here).

    Donoho's robust estimator: ``σ̂ = median(|HH|) / 0.6745`` on the finest orthonormal Haar
    diagonal sub-band ``HH = (a − b − c + d) / 2`` of every 2×2 block, pooled over channels. The
    diagonal band of a natural (and even more of a blurred) image holds little signal, so the
    median of its magnitudes is dominated by noise. Clipping at 0 or 1 lowers the estimate where
    the image saturates. ``floor`` bounds the result from below (``AUTO_SIGMA_FLOOR`` for a sigma
    that guidance will use: a clean or flat image otherwise estimates exactly 0).
    """
    if not math.isfinite(floor) or floor < 0:
        raise ValueError(f"floor must be a finite number >= 0, got {floor!r}")
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    h, w = image.shape[-2] // 2 * 2, image.shape[-1] // 2 * 2
    if h < 2 or w < 2:
        raise ValueError("image must be at least 2x2 to estimate its noise")
    dtype = image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32
    x = image[..., :h, :w].to(dtype)  # float64 stays float64; half and integer images are computed in float32
    diagonal = (x[..., 0::2, 0::2] - x[..., 0::2, 1::2] - x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 2
    return (diagonal.abs().flatten(1).median(dim=1).values / 0.6745).clamp_min(floor)
