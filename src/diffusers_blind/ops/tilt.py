"""Random atmospheric tilt fields (BlindDPS §4, turbulence): seeded, any size, in pixels.

A tilt field ``d`` is ``(B, 2, H, W)`` in pixels (channel 0 horizontal, channel 1 vertical; the
convention of :mod:`~diffusers_blind.ops.warp`). The generator follows the BlindDPS turbulence
simulation (docs/conventions.md, "Tilt fields"): ``M`` random square patches of side ``P``; in each,
two white-noise fields smoothed by a ``7 × 7`` Gaussian (std 1, zero "same" padding) and scaled by
``S ~ U(0.1, 0.4)`` are added to the two channels; the sum is clipped to ``±max_tilt`` (2.5 px).
``M = 500`` on a 256 × 256 image; other sizes keep the patch density (``M ∝ H·W``), so the
statistics per pixel do not depend on the size. On a map smaller than ``P`` the patches are cut to
it, and ``M`` grows by ``(P / side)²`` to keep the same number of patches over each pixel.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .kernels import as_numpy_generator, gaussian_kernel


def tilt_map(
    height: int,
    width: int,
    num_patches: int | None = None,
    patch_size: int = 64,
    strength_range: tuple[float, float] = (0.1, 0.4),
    smoothing_size: int = 7,
    smoothing_std: float = 1.0,
    max_tilt: float = 2.5,
    generator: torch.Generator | np.random.Generator | int | None = None,
) -> torch.Tensor:
    """One random tilt field ``(1, 2, height, width)`` in pixels, ``|d| <= max_tilt`` (see module docstring).

    ``num_patches`` defaults to ``round(500 · H·W / 256² · (patch_size / side)²)`` (at least 1), where
    ``side`` is ``patch_size`` capped at the image's smaller side: the factor is 1 on maps of at least
    ``patch_size`` pixels a side and keeps the per-pixel spread (≈ 0.4 px) on smaller ones.
    """
    if height < 1 or width < 1:
        raise ValueError(f"tilt map size must be positive, got {height}x{width}")
    low, high = strength_range
    if not 0 <= low <= high:
        raise ValueError(f"strength_range must be (low, high) with 0 <= low <= high, got {strength_range}")
    if not max_tilt > 0:  # also refuses NaN
        raise ValueError(f"max_tilt must be positive, got {max_tilt}")
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    rng = as_numpy_generator(generator)
    side = min(patch_size, height, width)
    if num_patches is None:
        # a patch cut to a small map covers fewer pixels: more patches keep each pixel's coverage
        num_patches = max(1, round(500 * height * width / 256**2 * (patch_size / side) ** 2))
    noise = torch.from_numpy(rng.standard_normal((num_patches * 2, 1, side, side)).astype(np.float32))
    smoothing = gaussian_kernel(smoothing_size, smoothing_std)
    pads = ((smoothing_size - 1) // 2, smoothing_size // 2) * 2
    smooth = F.conv2d(F.pad(noise, pads), smoothing).view(num_patches, 2, side, side)
    strengths = rng.uniform(low, high, num_patches).astype(np.float32)
    rows = rng.integers(0, height - side + 1, num_patches)
    cols = rng.integers(0, width - side + 1, num_patches)
    field = torch.zeros(2, height, width)
    for patch, strength, r, c in zip(smooth, strengths, rows, cols):
        field[:, r: r + side, c: c + side] += float(strength) * patch
    return field.clamp(-max_tilt, max_tilt).unsqueeze(0)


class TiltMapGenerator:
    """Seeded batches of tilt fields ``(B, 2, H, W)`` in pixels; keyword arguments go to :func:`tilt_map`."""

    def __init__(self, height: int = 256, width: int | None = None, **kwargs):
        self.height = height
        self.width = height if width is None else width
        self.kwargs = kwargs

    def __call__(self, batch_size: int = 1, generator=None) -> torch.Tensor:
        rng = as_numpy_generator(generator)
        return torch.cat([tilt_map(self.height, self.width, generator=rng, **self.kwargs) for _ in range(batch_size)])


def simulate_turbulence(
    image: torch.Tensor,
    kernel: torch.Tensor | None = None,
    field: torch.Tensor | None = None,
    padding: str = "reflect",
    generator: torch.Generator | np.random.Generator | int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Turbulence degradation of BlindDPS: tilt, then blur: ``y = k ⊛ T_d(x)`` (no noise added).

    ``image`` is ``(B, C, H, W)`` in ``[0, 1]``. ``kernel`` defaults to a 33×33 Gaussian of std 3 px
    (what the paper's code blurs with); ``field`` to one :func:`tilt_map` per image drawn from
    ``generator``. ``padding`` is the blur's border (``"reflect"``, ``"circular"`` or ``"zeros"``); the
    tilt repeats the edge pixel. Returns ``(degraded, kernel, field)``; add noise separately.
    """
    from .operators import BlurOperator, TiltBlurOperator, TiltOperator

    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got {tuple(image.shape)}")
    if kernel is None:
        kernel = gaussian_kernel(33, 3.0)
    if field is None:
        field = TiltMapGenerator(image.shape[-2], image.shape[-1])(image.shape[0], generator)
    field = field.to(device=image.device, dtype=image.dtype)
    kernel = kernel.to(device=image.device, dtype=image.dtype)
    operator = TiltBlurOperator(BlurOperator(padding), TiltOperator("border"))
    return operator(image, kernel, field), kernel, field
