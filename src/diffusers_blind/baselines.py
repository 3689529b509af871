"""Classical baselines registered as methods of the package (see ``diffusers_blind.methods``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ops import p2o


def wiener_deconvolution(
    y: torch.Tensor, kernel: torch.Tensor, sigma: float, blur_mode: str, max_iterations: int = 100
) -> torch.Tensor:
    """Non-blind Wiener deconvolution with a ``1/|ω|²`` image spectrum (``sigma`` in ``[0, 1]`` units).

    The Wiener filter of a Gaussian image whose gradients are white with variance ``g²`` is the
    minimiser of ``‖k ⊛ x − y‖² + λ‖∇x‖²`` with ``λ = σ² / (2 g²)``; ``g²`` is fitted to the
    measurement, ``E[(∂y)²] = g²·mean|K|² + 2σ²`` (the blur attenuates white gradients by
    ``mean|K|²``), and ``σ`` is floored at 0.5/255 (8-bit quantisation) so that σ = 0 stays stable.

    * ``"circular"``: the closed form in Fourier, ``x̂ = F⁻¹[conj(K)·Y / (|K|² + λ·|D|²)]``;
    * ``"reflect"``: the same objective with the reflect-padded blur operator (no circular model,
      hence no wrap-around artefacts), solved by conjugate gradients from ``y``;
    * ``"valid"`` (a photograph: ``y`` only sees the scene through the kernel's footprint): the unknown
      is ``y``'s scene plus a ``(kh − 1, kw − 1)`` margin, ``y`` its valid blur; conjugate gradients
      from the edge-replicated ``y``, then the centre is returned. No boundary condition is assumed.
    """
    sigma = max(float(sigma), 0.5 / 255)
    y = y.double()
    kernel = kernel.double()
    height, width = y.shape[-2:]
    otf = p2o(kernel, (height, width))
    grad_var = 0.5 * ((y.diff(dim=-1) ** 2).mean() + (y.diff(dim=-2) ** 2).mean())
    g2 = (grad_var - 2 * sigma**2).clamp_min(1e-6) / (otf.abs() ** 2).mean()
    lam = float(sigma**2 / (2 * g2))

    if blur_mode == "circular":
        wy = 2 * math.pi * torch.fft.fftfreq(height, dtype=torch.float64).view(-1, 1)
        wx = 2 * math.pi * torch.fft.fftfreq(width, dtype=torch.float64).view(1, -1)
        d2 = 4 * torch.sin(wy / 2) ** 2 + 4 * torch.sin(wx / 2) ** 2
        estimate = torch.fft.ifft2(otf.conj() * torch.fft.fft2(y) / (otf.abs() ** 2 + lam * d2)).real
        return estimate.float().clamp(0, 1)

    kh, kw = kernel.shape[-2:]
    pads = ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2)
    padded_otf = p2o(kernel, (height + kh - 1, width + kw - 1))

    extended = blur_mode == "valid"  # unknown: the image plus the kernel's margin, of which y is the valid blur

    def blur_op(x):  # reflect: spatial_blur(x, kernel.flip(-2, -1), "reflect"); valid: the valid blur of x
        padded = x if extended else F.pad(x, pads, mode="reflect")
        out = torch.fft.ifft2(torch.fft.fft2(padded) * padded_otf).real
        return out[..., pads[2] : pads[2] + height, pads[0] : pads[0] + width]

    def energy(x, target=None):
        residual = blur_op(x) if target is None else blur_op(x) - target
        return 0.5 * residual.pow(2).sum() + 0.5 * lam * (x.diff(dim=-1).pow(2).sum() + x.diff(dim=-2).pow(2).sum())

    def gradient(x, target=None):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            return torch.autograd.grad(energy(x, target), x)[0]

    # Normal equations N x = Aᵀy with N = AᵀA + λ DᵀD: N x = ∇E₀(x), and Aᵀy = N x − ∇E_y(x) at any x.
    x = F.pad(y, pads, mode="replicate") if extended else y.clone()
    residual = -gradient(x, y)
    direction = residual.clone()
    rs = residual.pow(2).sum()
    tolerance = 1e-6 * float(rs)  # stop when the residual norm has dropped by 1e3
    for _ in range(max_iterations):
        if rs <= tolerance:
            break
        applied = gradient(direction)
        step = rs / (direction * applied).sum()
        x = x + step * direction
        residual = residual - step * applied
        rs_new = residual.pow(2).sum()
        direction = residual + (rs_new / rs) * direction
        rs = rs_new
    if extended:
        x = x[..., pads[2] : pads[2] + height, pads[0] : pads[0] + width]
    return x.float().clamp(0, 1)
