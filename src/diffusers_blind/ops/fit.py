"""How well a restored image and kernel explain the blurry measurement (Fast EM's re-blur loss, Eq. 34)."""

from __future__ import annotations

import torch

from .blur import flip_kernel, spatial_blur


def reblur_fit(measurement: torch.Tensor, image: torch.Tensor, kernel: torch.Tensor, sigma) -> torch.Tensor:
    """Mean squared re-blur residual per image in units of the noise variance, ``(B,)``.

    ``fit = mean_{p ∈ interior} (y − k ⊛ x̂)²_p / σ²`` over the pixels at least ``k // 2`` from the
    border (there ``k ⊛ x̂`` needs no content from outside the photograph). A consistent pair gives
    about 1 (the noise alone); a kernel that is too small, or an image that does not explain the
    blur, gives more. ``measurement``, ``image``: ``(B, C, H, W)`` in ``[0, 1]``; ``kernel``
    ``(B|1, 1, k, k)`` (true convolution); ``sigma``: float or ``(B,)`` in ``[0, 1]`` units, > 0.
    """
    if measurement.shape != image.shape:
        raise ValueError(f"measurement {tuple(measurement.shape)} and image {tuple(image.shape)} differ")
    sigma = torch.as_tensor(sigma, dtype=image.dtype, device=image.device).reshape(-1)
    if (sigma <= 0).any():
        raise ValueError("sigma must be > 0 to normalise the residual")
    size = kernel.shape[-1]
    half = size // 2
    if min(image.shape[-2:]) <= 2 * half:
        raise ValueError(f"a {size}x{size} kernel leaves no interior in a {tuple(image.shape[-2:])} image")
    reblurred = spatial_blur(image, flip_kernel(kernel.to(image.dtype)), padding="zeros")
    residual = (measurement - reblurred)[..., half:image.shape[-2] - half, half:image.shape[-1] - half]
    return residual.square().mean(dim=(1, 2, 3)) / sigma.square()
