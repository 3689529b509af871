"""A first kernel for the blind methods: coarse-to-fine estimation under a sparse (L0) gradient prior.

Fast EM starts its kernel from a Dirac and lets the diffusion's early ``x̂0`` (smooth images) drive the
M-step; a kernel fitted to smooth images locks in (docs/kernel_estimation.md). Classical blind
deblurring avoids that with two devices, used here before the diffusion starts:

* an **intermediate image with only salient edges**: ``x = argmin ‖k ⊛ x − y‖² + λ‖∇x‖₀`` (Xu, Zheng
  and Jia, CVPR 2013; Pan et al., CVPR 2014), solved by half-quadratic splitting
  (:func:`l0_gradient_deconvolution`). Strong edges carry the blur's shape; fine texture and noise,
  which bias a least-squares kernel toward a blob, are cut away;
* a **pyramid**: the kernel is found on a strongly downscaled copy (a few pixels wide, where any blur
  is small and the problem well posed) and carried up scale by scale.

The kernel step is the package's own M-step (:class:`~diffusers_blind.models.KernelEstimator`, with
its plug-and-play kernel prior) applied to the x/y finite differences of both images as channels:
on gradients the least-squares data term is not dominated by the low frequencies that every
kernel passes alike.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from .image_processor import pad_to_multiple
from .models.kernel_estimator import KernelEstimator
from .ops.blur import p2o, photograph_window
from .ops.kernels import center_kernel, dirac_kernel, rescale_kernel


PYRAMID_RATIO = math.sqrt(0.5)  # kernel (and image) size ratio between neighbouring scales
MIN_PYRAMID_KERNEL = 5  # the coarsest scale's kernel size
MIN_PYRAMID_IMAGE = 16  # no scale is smaller than this (pixels per side)
MAX_SIDE = 384  # larger photographs are estimated on their most detailed crop of this size
SIGMA_FLOOR = 2.0 / 255  # the kernel step's noise level is at least this (in [0, 1] units)


def finite_differences(image: torch.Tensor) -> torch.Tensor:
    """Circular forward differences ``(x[i, j] − x[i, j+1], x[i, j] − x[i+1, j])`` as ``2C`` channels."""
    return torch.cat([image - image.roll(-1, -1), image - image.roll(-1, -2)], dim=1)


def _difference_otfs(shape: tuple[int, int], device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Fourier multipliers of the two differences of :func:`finite_differences`."""
    impulse = torch.zeros(2, *shape, device=device, dtype=dtype)
    impulse[:, 0, 0] = 1
    impulse[0, 0, -1] = -1
    impulse[1, -1, 0] = -1
    otf = torch.fft.fft2(impulse)
    return otf[0], otf[1]


def l0_gradient_deconvolution(
    measurement: torch.Tensor, kernel: torch.Tensor, weight: float, beta_max: float = 1e5, kappa: float = 2.0
) -> torch.Tensor:
    r"""``argmin_x ‖k ⊛ x − y‖² + weight·‖∇x‖₀`` (circular model) by half-quadratic splitting.

    With an auxiliary ``g ≈ ∇x`` and a penalty ``β`` that grows from ``2·weight`` to ``beta_max`` by ``kappa``:
    ``g = ∇x · [|∇x|² ≥ weight/β]`` (the exact L0 prox, per pixel), then
    ``x = F⁻¹[(conj(K)Y + β Σ_d conj(D_d) G_d) / (|K|² + β Σ_d |D_d|²)]``.
    ``measurement``: ``(B, C, H, W)``; ``kernel``: ``(B|1, 1, k, k)``.
    """
    shape = measurement.shape[-2:]
    otf = p2o(kernel.to(measurement.dtype), shape)
    dx, dy = _difference_otfs(shape, measurement.device, measurement.dtype)
    data_numerator = otf.conj() * torch.fft.fft2(measurement)
    data_energy = otf.abs().square()
    difference_energy = dx.abs().square() + dy.abs().square()
    image, beta = measurement, 2 * weight
    channels = measurement.shape[1]
    while beta < beta_max:
        gradients = finite_differences(image)
        gx, gy = gradients[:, :channels], gradients[:, channels:]
        keep = (gx.square() + gy.square()) >= weight / beta
        numerator = data_numerator + beta * (dx.conj() * torch.fft.fft2(gx * keep) + dy.conj() * torch.fft.fft2(gy * keep))
        image = torch.fft.ifft2(numerator / (data_energy + beta * difference_energy)).real
        beta *= kappa
    return image


def detailed_crop(image: torch.Tensor, side: int) -> torch.Tensor:
    """The ``side × side`` window (on a half-window grid) with the largest mean gradient magnitude, per batch.

    One kernel blurs the whole photograph, so it can be estimated where the edges are; this bounds the
    initialiser's cost on photographs of any size. Images no larger than ``side`` are returned whole.
    """
    height, width = image.shape[-2:]
    if height <= side and width <= side:
        return image
    crop_h, crop_w = min(side, height), min(side, width)
    grads = finite_differences(image.mean(1, keepdim=True)).abs().sum(1, keepdim=True)
    stride = max(1, side // 2)
    energy = F.avg_pool2d(grads, (crop_h, crop_w), stride=stride)  # (B, 1, rows, cols)
    best = energy.flatten(1).argmax(1)
    rows = [int(i) // energy.shape[-1] * stride for i in best]
    cols = [int(i) % energy.shape[-1] * stride for i in best]
    return torch.cat([image[b:b + 1, :, r:r + crop_h, c:c + crop_w] for b, (r, c) in enumerate(zip(rows, cols))])


def _odd(value: float) -> int:
    size = max(1, int(round(value)))
    return size if size % 2 else size + 1


def pyramid_kernel_sizes(kernel_size: int, image_size: int) -> list[int]:
    """Kernel sizes from coarsest to ``kernel_size``, shrinking by ``PYRAMID_RATIO`` per scale.

    Stops at ``MIN_PYRAMID_KERNEL`` or when the image would fall below ``MIN_PYRAMID_IMAGE`` pixels.
    """
    sizes = [kernel_size]
    while True:
        smaller = _odd(sizes[-1] * PYRAMID_RATIO)
        if smaller < MIN_PYRAMID_KERNEL or smaller >= sizes[-1] or image_size * smaller / kernel_size < MIN_PYRAMID_IMAGE:
            break
        sizes.append(smaller)
    return sizes[::-1]


def _check_unit_image(measurement: torch.Tensor) -> None:
    """A float photograph in ``[0, 1]`` (noise may step a little outside): the L0 weights and ``sigma`` assume it."""
    if not torch.is_floating_point(measurement):
        raise TypeError(f"measurement must be a float image in [0, 1], got {measurement.dtype} (divide 8-bit levels by 255)")
    if not torch.isfinite(measurement).all():
        raise ValueError("measurement contains NaN or infinite values")
    low, high = float(measurement.min()), float(measurement.max())
    if low < -0.5 or high > 1.5:
        raise ValueError(f"measurement values lie in [{low:.4g}, {high:.4g}]; expected [0, 1] (divide 8-bit levels by 255)")


class SparseKernelInitializer:
    r"""Coarse-to-fine kernel estimate under an L0 gradient prior, to start a blind diffusion run.

    At every scale ``s`` (kernel size ``k_s``, image downscaled by ``k_s / k``), ``iterations`` rounds of

    1. ``x = argmin ‖k ⊛ x − y_s‖² + λ‖∇x‖₀`` (:func:`l0_gradient_deconvolution`), ``λ ← max(λ·decay, λ_min)``;
    2. ``k = M-step(∇y_s, ∇x)``: the ``kernel_estimator``'s HQS solve with its kernel prior on the x/y
       differences of both (grey) images, through a window that is zero on the reflected margin;

    then the kernel is recentred and rescaled to the next scale (:func:`ops.rescale_kernel`).

    Args:
        kernel_estimator: the M-step (during the call its ``beta`` is replaced by ``beta`` and its
            ``channel_mode`` by ``"joint"``; both are restored after).
        iterations: rounds per scale.
        l0_weight: ``λ`` at the start of each scale (images in ``[0, 1]``).
        l0_weight_min / l0_decay: the floor and the factor of ``λ`` per round.
        beta: the M-step's HQS penalty during initialisation (``α = σ²β``; a smaller ``β`` than the
            diffusion's weighs the kernel prior more, as the edge image is cruder than ``x̂0``).
    """

    def __init__(
        self,
        kernel_estimator: KernelEstimator,
        iterations: int = 5,
        l0_weight: float = 4e-3,
        l0_weight_min: float = 1e-4,
        l0_decay: float = 0.9,
        beta: float = 1e4,
    ):
        if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or iterations < 1:
            raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
        numbers_ = {"l0_weight": l0_weight, "l0_weight_min": l0_weight_min, "l0_decay": l0_decay, "beta": beta}
        for name, value in numbers_.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if l0_weight <= 0 or l0_weight_min <= 0 or not 0 < l0_decay <= 1 or beta <= 0:
            raise ValueError("l0 weights > 0, l0_decay in (0, 1] and beta > 0 are required")
        self.kernel_estimator = kernel_estimator
        self.iterations = iterations
        self.l0_weight, self.l0_weight_min, self.l0_decay = l0_weight, l0_weight_min, l0_decay
        self.beta = beta

    def kernel_step(self, sharp: torch.Tensor, blurry: torch.Tensor, window: torch.Tensor, sigma: torch.Tensor,
                    kernel: torch.Tensor) -> torch.Tensor:
        """M-step on the windowed differences; the difference of two noisy pixels has std ``√2·σ``."""
        estimator = self.kernel_estimator
        saved = {"beta": estimator.config.beta, "channel_mode": estimator.config.channel_mode}
        # one least-squares system for both differences: each alone sees the blur along one axis only
        estimator.register_to_config(beta=self.beta, channel_mode="joint")
        try:
            return estimator(window * finite_differences(blurry), window * finite_differences(sharp),
                             math.sqrt(2) * sigma, kernel)
        finally:
            estimator.register_to_config(**saved)

    @torch.no_grad()
    def __call__(self, measurement: torch.Tensor, kernel_size: int, sigma: torch.Tensor | float) -> torch.Tensor:
        """``measurement``: ``(B, C, H, W)`` photographs in ``[0, 1]`` (not padded; larger than ``MAX_SIDE``
        pixels, only their :func:`detailed_crop` is used); ``sigma``: noise std in ``[0, 1]`` units (float or
        ``(B,)``). Returns ``(B, 1, kernel_size, kernel_size)`` kernels, centred.

        A batch runs image by image, so each kernel is exactly the one its image gets alone: batched float32
        rounding (last bits), amplified by the L0 threshold over the rounds, would otherwise move it by ~1e-3.
        """
        if measurement.ndim != 4:
            raise ValueError(f"measurement must be (B, C, H, W), got {tuple(measurement.shape)}")
        _check_unit_image(measurement)
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral):
            raise ValueError(f"kernel_size must be an integer, got {kernel_size!r}")
        kernel_size = int(kernel_size)
        if kernel_size < 1 or kernel_size > min(measurement.shape[-2:]):
            raise ValueError(f"kernel_size {kernel_size} must be in [1, {min(measurement.shape[-2:])}]")
        if measurement.shape[0] > 1:
            sigmas = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(measurement.shape[0])
            return torch.cat([self(measurement[b:b + 1], kernel_size, sigmas[b:b + 1]) for b in range(measurement.shape[0])])
        measurement = detailed_crop(measurement, max(MAX_SIDE, 4 * kernel_size))
        batch, _, height, width = measurement.shape
        grey = measurement.float().mean(1, keepdim=True)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=grey.device).reshape(-1).expand(batch)
        if not torch.isfinite(sigma).all() or (sigma < 0).any():
            raise ValueError(f"sigma must be finite and >= 0 (in [0, 1] units), got {sigma.tolist()}")
        sigma = sigma.clamp_min(SIGMA_FLOOR)  # α = σ²β: a near-zero σ leaves the Fourier solve unregularised
        kernel = None
        for size in pyramid_kernel_sizes(kernel_size, min(height, width)):
            scale = size / kernel_size
            shape = (max(1, round(height * scale)), max(1, round(width * scale)))
            blurry = grey if shape == (height, width) else F.interpolate(
                grey, size=shape, mode="bilinear", antialias=True, align_corners=False)
            kernel = dirac_kernel(size, batch, grey.device) if kernel is None else rescale_kernel(kernel, size / kernel.shape[-1], size)
            margin = min(size, min(shape) - 1)
            padded, _ = pad_to_multiple(blurry, 1, margin, fft_friendly=True)  # bottom/right on to FFT-friendly sides
            window = photograph_window(padded.shape[-2:], (margin, margin, *shape), size, grey.device)
            weight = self.l0_weight
            for _ in range(self.iterations):
                sharp = l0_gradient_deconvolution(padded, kernel, weight)
                kernel = self.kernel_step(sharp, padded, window, sigma * scale, kernel)
                weight = max(weight * self.l0_decay, self.l0_weight_min)
            kernel = center_kernel(kernel)
        return kernel
