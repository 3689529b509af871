"""Likelihood-guidance terms for the E-step (Fast EM §3.2, algorithms.md §1.2)."""

from __future__ import annotations

import torch

from .blur import fft_blur, p2o


def _as_batch_scalar(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A float or a ``(B,)`` tensor as a ``(B or 1, 1, 1, 1)`` tensor on ``like``'s device."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.reshape(-1, 1, 1, 1)


def pigdm_guidance(
    measurement: torch.Tensor,
    x0: torch.Tensor,
    kernel: torch.Tensor,
    sigma: float | torch.Tensor,
    r: float | torch.Tensor,
) -> torch.Tensor:
    """Pi-GDM guidance vector in closed form (Fast EM Eq. 17; Pi-GDM Eq. 7 for a circulant ``H``).

    ``G = IFFT( conj(K) · (Y − K·X0) / (r²·|K|² + σ²) ).real``, ``K = p2o(kernel)``; the E-step then
    back-propagates ``(G.detach() * x0).sum()`` through the denoiser. ``sigma`` (noise std) and ``r``
    (std of ``x0`` around ``x̂0``) are in the units of the images, floats or ``(B,)`` tensors.

    ``r == 0`` gives the plain ``Kᴴ(y − Kx̂0)/σ²``; ``σ == 0`` is replaced by ``1e-8`` (as in the
    reference code), giving ``Kᴴ(y − Kx̂0)/(r²|K|²)``. Both zero is an error (no finite guidance).
    """
    message = "pigdm_guidance needs sigma > 0 or r > 0: with both zero the guidance is infinite"
    if not torch.is_tensor(sigma) and not torch.is_tensor(r):
        if sigma == 0 and r == 0:
            raise ValueError(message)
    elif torch.is_tensor(r) or r == 0:  # tensors: check per sample (a host sync, skipped when r is a float > 0)
        if ((torch.as_tensor(sigma) == 0) & (torch.as_tensor(r) == 0)).any():
            raise ValueError(message)
    sigma = _as_batch_scalar(sigma, x0).clamp_min(1e-8)
    r = _as_batch_scalar(r, x0)
    otf = p2o(kernel.to(x0.dtype), x0.shape[-2:])
    residual = torch.fft.fft2(measurement) - otf * torch.fft.fft2(x0)
    denominator = r.square() * otf.abs().square() + sigma.square()
    return torch.fft.ifft2(otf.conj() * residual / denominator).real


def dps_residual_norm(measurement: torch.Tensor, x0: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """DPS data term ``‖y − k ⊛ x̂0‖₂`` per sample (the norm, not its square; DPS Alg. 1).

    Returns a ``(B,)`` tensor; the reference code takes one norm over the whole batch, which couples
    particles. Summing per-sample norms keeps them independent.
    """
    residual = measurement - fft_blur(x0, kernel)
    return residual.flatten(1).norm(dim=1)
