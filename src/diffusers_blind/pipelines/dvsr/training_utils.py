"""Training pieces of DvSR: synthetic blurry/sharp pairs with realistic borders, and the loss (paper Eq. 6)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...ops.kernels import as_numpy_generator, dirac_kernel, gaussian_kernel, motion_kernel


def embed_kernel_centred(kernel: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad an odd ``(…, k, k)`` kernel to ``size × size`` keeping its centre at ``size // 2``."""
    k = kernel.shape[-1]
    if k % 2 == 0 or size % 2 == 0 or k > size:
        raise ValueError(f"need odd kernel size {k} <= odd size {size}")
    pad = (size - k) // 2
    return F.pad(kernel, (pad, pad, pad, pad))


def random_training_kernels(
    batch_size: int,
    generator: torch.Generator | np.random.Generator | int | None = None,
    max_size: int = 33,
    min_motion_size: int = 9,
    motion_probability: float = 0.7,
    identity_probability: float = 0.05,
    gaussian_std_range: tuple[float, float] = (0.5, 4.0),
) -> torch.Tensor:
    """A ``(B, 1, max_size, max_size)`` batch of sum-1 kernels, centre at ``max_size // 2``.

    Each kernel is a Dirac (``identity_probability``), a camera-shake kernel of a random odd size in
    ``[min(min_motion_size, max_size), max_size]`` and random intensity in ``[0.1, 1]`` (``motion_probability``), or
    an anisotropic Gaussian with stds in ``gaussian_std_range`` and a random angle.
    """
    rng = as_numpy_generator(generator)
    kernels = []
    for _ in range(batch_size):
        u = rng.uniform()
        if u < identity_probability:
            kernel = dirac_kernel(max_size)
        elif u < identity_probability + motion_probability:
            size = int(rng.integers(min(min_motion_size, max_size) // 2, max_size // 2 + 1)) * 2 + 1
            kernel = embed_kernel_centred(motion_kernel(size, float(rng.uniform(0.1, 1.0)), rng), max_size)
        else:
            std = (float(rng.uniform(*gaussian_std_range)), float(rng.uniform(*gaussian_std_range)))
            size = min(max_size, 2 * math.ceil(3 * max(std)) + 1)
            kernel = embed_kernel_centred(gaussian_kernel(size, std, angle=float(rng.uniform(0, math.pi))), max_size)
        kernels.append(kernel)
    return torch.cat(kernels)


def blur_valid(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """True convolution keeping only the fully supported ("valid") part: ``(B, C, H, W)`` → ``(B, C, H−k+1, W−k+1)``.

    Blurring a crop larger than the target and keeping the centre is what a real photograph looks
    like: no wrap-around and no padding at the borders.
    """
    b, c, h, w = image.shape
    kh, kw = kernel.shape[-2:]
    weight = kernel.flip(-2, -1).to(image.dtype).expand(b, 1, kh, kw).repeat_interleave(c, dim=0)
    out = F.conv2d(image.reshape(1, b * c, h, w), weight, groups=b * c)
    return out.reshape(b, c, h - kh + 1, w - kw + 1)


def make_blurry_sharp_pair(
    large: torch.Tensor,
    kernels: torch.Tensor,
    noise_sigma: torch.Tensor | float,
    generator: torch.Generator | None = None,
    quantize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """From crops ``(B, C, P+k−1, P+k−1)`` in ``[0, 1]`` and kernels ``(B, 1, k, k)`` make ``(blurry, sharp)`` ``P × P`` in ``[0, 1]``.

    ``y = quantize(clip(k ⊛ x + n))``, ``n ~ N(0, σ²)`` with ``noise_sigma`` in ``[0, 1]`` units
    (``(B,)`` or a float); 8-bit quantisation when ``quantize``.
    """
    k = kernels.shape[-1]
    margin = k // 2
    sharp = large[..., margin : large.shape[-2] - margin, margin : large.shape[-1] - margin]
    blurry = blur_valid(large, kernels)
    sigma = torch.as_tensor(noise_sigma, dtype=large.dtype, device=large.device).reshape(-1, 1, 1, 1)
    noise = torch.randn(blurry.shape, generator=generator, dtype=blurry.dtype).to(blurry.device)
    blurry = (blurry + sigma * noise).clamp(0, 1)
    if quantize:
        blurry = (blurry * 255).round() / 255
    return blurry, sharp


def dvsr_loss(
    predictor,
    denoiser,
    scheduler,
    sharp: torch.Tensor,
    blurry: torch.Tensor,
    generator: torch.Generator | None = None,
    mode: str = "joint",
    predictor_loss_weight: float = 0.0,
    residual_scale: float = 1.0,
    loss_target: str = "epsilon",
    loss_norm: str = "l1",
) -> dict[str, torch.Tensor]:
    r"""The DvSR training loss on images in ``[-1, 1]``; returns ``{"loss", "eps_l1", "predictor_l2"}``.

    ``mode="joint"`` (paper Eq. 6 with its typos corrected): the residual ``r = x_0 − g(y)``,
    ``√ᾱ`` drawn by :meth:`~ContinuousNoiseLevelScheduler.sample_training_levels`,
    ``z = √ᾱ·r + √(1−ᾱ)·ε`` and ``L = ‖ε − ε̂‖₁`` (mean) with ``ε̂`` the noise that ``f([z, y], c(ᾱ))``
    predicts (its output read by the scheduler's ``prediction_type``: ``ε̂ = f`` for ``"epsilon"``,
    ``ε̂ = √ᾱ f + √(1−ᾱ) z`` for ``"v_prediction"``), with gradients into both ``f`` and ``g``; ``predictor_loss_weight`` adds ``w·‖g(y) − x_0‖²`` (0 in the paper).
    ``residual_scale = s`` diffuses ``r / s`` instead of ``r`` (the pipeline outputs ``x_init + s·z_0``).
    ``loss_target="v"`` replaces the L1 on ε by the L1 on ``v = √ᾱ ε − √(1−ᾱ) r``: since
    ``ε̂ − ε = √ᾱ (v̂ − v)`` and ``ẑ_0 − r = −√(1−ᾱ)(v̂ − v)``, this is the ε loss divided by ``√ᾱ``, i.e. an L1 on
    the residual estimate at high noise, where the ε loss gives it almost no weight (the returned
    ``eps_l1`` is still the L1 on ε, for comparison).
    ``mode="predictor"`` trains ``g`` alone with ``‖g(y) − x_0‖²`` (the paper's ablation, Table 4);
    ``mode="denoiser"`` is the joint loss with ``g`` frozen (no gradient into it: fine-tuning ``f`` on a fixed
    predictor). ``loss_norm="l2"`` uses the squared error instead of the paper's L1: the minimiser of
    an L2 loss is the conditional *mean* (so the average of many samples estimates ``E[x_0 | y]``, which
    sample averaging wants), that of an L1 loss is a per-pixel median.
    """
    if mode not in ("joint", "predictor", "denoiser"):
        raise ValueError(f"mode must be 'joint', 'predictor' or 'denoiser', got {mode!r}")
    if loss_norm not in ("l1", "l2"):
        raise ValueError(f"loss_norm must be 'l1' or 'l2', got {loss_norm!r}")
    if mode == "denoiser":
        with torch.no_grad():
            x_init = predictor(blurry)
    else:
        x_init = predictor(blurry)
    predictor_l2 = F.mse_loss(x_init.float(), sharp.float())
    if mode == "predictor":
        return {"loss": predictor_l2, "eps_l1": torch.zeros((), device=sharp.device), "predictor_l2": predictor_l2}
    if residual_scale <= 0:
        raise ValueError(f"residual_scale must be > 0, got {residual_scale}")
    if loss_target not in ("epsilon", "v"):
        raise ValueError(f"loss_target must be 'epsilon' or 'v', got {loss_target!r}")
    residual = (sharp - x_init) / residual_scale
    level, _ = scheduler.sample_training_levels(sharp.shape[0], generator=generator)
    level = level.to(sharp.device)
    noise = torch.randn(residual.shape, generator=generator, dtype=residual.dtype).to(residual.device)
    noisy = scheduler.add_noise_at_level(residual, noise, level)
    timestep = scheduler.noise_level_to_timestep(level.cpu()).to(sharp.device)
    output = denoiser(torch.cat([noisy, blurry], dim=1), timestep).sample
    eps = scheduler.predict_epsilon(output, noisy, level)
    eps_l1 = F.l1_loss(eps.float(), noise.float())
    distance = F.l1_loss if loss_norm == "l1" else F.mse_loss
    if loss_target == "v":
        s, c = scheduler._level(level, residual)
        target = (s * noise - c * residual).float()
        main = distance(scheduler.predict_velocity(output, noisy, level).float(), target)
    else:
        main = distance(eps.float(), noise.float())
    loss = main + predictor_loss_weight * predictor_l2 if predictor_loss_weight else main
    return {"loss": loss, "eps_l1": eps_l1, "predictor_l2": predictor_l2}
