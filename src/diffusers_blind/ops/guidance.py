"""Likelihood-guidance terms (Fast EM §3.2; docs/conventions.md, "Guidance").

* :func:`pigdm_guidance` — Pi-GDM's closed form, valid for the circular blur only (it inverts
  ``r²HHᵀ + σ²I`` in Fourier).
* :func:`dps_residual_norm` — DPS's ``‖y − A(x̂0, θ)‖`` for any differentiable operator ``A``.
* :func:`dps_joint_gradient` — the gradient of that norm (plus an optional kernel regulariser)
  with respect to several unknowns at once (image, kernel, tilt), as BlindDPS needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from .blur import p2o
from .cg import conjugate_gradient
from .operators import BlurOperator, LinearOperator


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
    residual_weight: torch.Tensor | None = None,
    cg_iterations: int = 0,
    cg_tolerance: float = 1e-3,
) -> torch.Tensor:
    """Pi-GDM guidance vector in closed form (Fast EM Eq. 17; Pi-GDM Eq. 7 for a circulant ``H``).

    ``G = IFFT( conj(K) · (Y − K·X0) / (r²·|K|² + σ²) ).real``, ``K = p2o(kernel)``; the E-step then
    back-propagates ``(G.detach() * x0).sum()`` through the denoiser. ``sigma`` (noise std) and ``r``
    (std of ``x0`` around ``x̂0``) are in the units of the images, floats or ``(B,)`` tensors.

    ``residual_weight`` (``(1|B, 1, H, W)``, optional) multiplies the spatial residual ``y − k ⊛ x̂0``
    before the Fourier weighting: a 0/1 mask of the observed pixels turns the circular model into a
    *valid* convolution (pixels outside the photograph are unknowns the blur reaches, not data).

    ``r == 0`` gives the plain ``Kᴴ(y − Kx̂0)/σ²``; ``σ == 0`` is replaced by ``1e-8`` (as in the
    reference code), giving ``Kᴴ(y − Kx̂0)/(r²|K|²)``. Both zero is an error (no finite guidance), and so
    is a negative or NaN ``sigma`` or ``r`` (checked per sample: one host sync when either is a tensor).
    """
    message = "pigdm_guidance needs sigma > 0 or r > 0: with both zero the guidance is infinite"
    if not torch.is_tensor(sigma) and not torch.is_tensor(r):
        if not (sigma >= 0 and r >= 0):
            raise ValueError(f"pigdm_guidance needs sigma >= 0 and r >= 0, got sigma={sigma}, r={r}")
        if sigma == 0 and r == 0:
            raise ValueError(message)
    else:  # tensors: check per sample, in one host sync
        device = sigma.device if torch.is_tensor(sigma) else r.device
        sigma_t, r_t = torch.as_tensor(sigma, device=device), torch.as_tensor(r, device=device)
        negative = (~(sigma_t >= 0)).any() | (~(r_t >= 0)).any()
        negative, both_zero = torch.stack([negative, ((sigma_t == 0) & (r_t == 0)).any()]).tolist()
        if negative:
            raise ValueError(f"pigdm_guidance needs sigma >= 0 and r >= 0, got sigma={sigma}, r={r}")
        if both_zero:
            raise ValueError(message)
    sigma = _as_batch_scalar(sigma, x0).clamp_min(1e-8)
    r = _as_batch_scalar(r, x0)
    otf = p2o(kernel.to(x0.dtype), x0.shape[-2:])
    denominator = r.square() * otf.abs().square() + sigma.square()
    if residual_weight is None:
        residual = torch.fft.fft2(measurement) - otf * torch.fft.fft2(x0)
        return torch.fft.ifft2(otf.conj() * residual / denominator).real
    spatial_residual = residual_weight * (measurement - torch.fft.ifft2(otf * torch.fft.fft2(x0)).real)
    if cg_iterations == 0:
        return torch.fft.ifft2(otf.conj() * torch.fft.fft2(spatial_residual) / denominator).real
    weights = masked_posterior_solve(spatial_residual, otf, residual_weight, sigma, r, denominator, cg_iterations,
                                     cg_tolerance)
    return torch.fft.ifft2(otf.conj() * torch.fft.fft2(residual_weight * weights)).real


def masked_posterior_solve(
    rhs: torch.Tensor, otf: torch.Tensor, weight: torch.Tensor, sigma: torch.Tensor, r: torch.Tensor,
    preconditioner: torch.Tensor, iterations: int, tolerance: float = 0.0,
) -> torch.Tensor:
    """``u ≈ (r²·W K Kᵀ W + σ²I)⁻¹ rhs`` by conjugate gradients, preconditioned by the circulant ``(r²|K|² + σ²)⁻¹``
    restricted to the observed window.

    With ``W`` a 0/1 mask of the observed pixels this is Pi-GDM's ``(r² H Hᵀ + σ² I)⁻¹`` for the valid
    blur ``H = W K``, which has no Fourier closed form; the circulant inverse (the one-step answer) is
    the preconditioner, so each iteration corrects what the mask breaks. The system splits into the window
    and the rest, where it is ``σ²I``; the preconditioner is ``W P W`` in the window and the exact ``σ⁻²`` outside
    it, so the two parts never mix (for a residual under ``W`` the outside part is zero throughout). (The whole-grid ``P`` mixes the two parts
    and converged about twice slower: the error after 5 iterations here matched its error after 10 on real
    residuals, ``r`` from 0.03 to 0.5; docs/scale.md.) Two real FFT pairs per iteration; stops early once every
    sample's residual is below ``tolerance`` times its ``‖rhs‖``. ``weight`` is a mask in ``[0, 1]`` (weights above 1
    are treated as inside the window only).
    """
    shape = rhs.shape[-2:]
    half = shape[-1] // 2 + 1  # real images: half spectra (rfft2) suffice, at half the cost
    energy, preconditioner = otf.abs().square()[..., :half], preconditioner[..., :half]

    def apply(u):
        blurred_twice = torch.fft.irfft2(energy * torch.fft.rfft2(weight * u), s=shape)
        return r.square() * weight * blurred_twice + sigma.square() * u

    def precondition(v):  # the window's circulant inverse; outside it the exact inverse of σ²I
        inside = weight * torch.fft.irfft2(torch.fft.rfft2(weight * v) / preconditioner, s=shape)
        return inside + (1 - weight).clamp_min(0) * v / sigma.square()

    return conjugate_gradient(apply, rhs, iterations, precondition, tolerance=tolerance)


def dps_residual_norm(
    measurement: torch.Tensor, x0: torch.Tensor, *params: torch.Tensor, operator: LinearOperator | None = None,
    residual_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPS data term ``‖y − A(x̂0, θ)‖₂`` per sample (the norm, not its square; DPS Alg. 1).

    ``params`` are the operator's per-call parameters in the order of ``operator.param_names``;
    the default operator is the circular blur ``BlurOperator("circular")``, so
    ``dps_residual_norm(y, x0, kernel)`` is ``‖y − k ⊛ x̂0‖``. Returns a ``(B,)`` tensor; the
    reference code takes one norm over the whole batch, which couples particles. Summing
    per-sample norms keeps them independent.
    """
    operator = BlurOperator("circular") if operator is None else operator
    if len(params) != len(operator.param_names):
        raise ValueError(f"{type(operator).__name__} takes {operator.param_names}, got {len(params)} parameter(s)")
    residual = measurement - operator(x0, *params)
    if residual_weight is not None:  # e.g. a 0/1 mask of the observed pixels (see pigdm_guidance)
        residual = residual_weight * residual
    return residual.flatten(1).norm(dim=1)


def kernel_l1(kernel: torch.Tensor) -> torch.Tensor:
    """``‖k‖₁`` per sample, ``(B,)``: the sparsity prior BlindDPS puts on its kernel estimate."""
    return kernel.abs().flatten(1).sum(1)


class JointGradient(NamedTuple):
    """Result of :func:`dps_joint_gradient`: the loss that was differentiated, the per-sample norms, the gradients."""

    loss: torch.Tensor
    residual_norm: torch.Tensor
    gradients: tuple[torch.Tensor, ...]


def dps_joint_gradient(
    measurement: torch.Tensor,
    x0: torch.Tensor,
    params: Sequence[torch.Tensor],
    wrt: Sequence[torch.Tensor],
    operator: LinearOperator | None = None,
    scale: float = 1.0,
    kernel_regularizer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    residual_weight: torch.Tensor | None = None,
) -> JointGradient:
    """Gradients of ``L = scale · Σ_b ‖y_b − A(x̂0_b, θ_b)‖ + Σ_b R(k̂_b)`` with respect to every tensor in ``wrt``.

    The unknowns are the image estimate ``x0`` and the operator's parameters ``params`` (a kernel,
    a tilt field, …), each possibly a differentiable function of a tensor in ``wrt`` — e.g. of the
    noisy states ``x_t`` and ``k_t`` when ``x̂0`` and ``k̂0`` come from two denoisers (BlindDPS Eq. 10
    takes one step ``−ζ ∇`` per state). ``kernel_regularizer`` (e.g. ``lambda k: 0.1 * kernel_l1(k)``)
    maps the ``"kernel"`` parameter to a per-sample ``(B,)`` penalty; ``residual_weight`` weighs the
    residual (a mask of the observed pixels). A ``wrt`` tensor that the loss does
    not reach gets a zero gradient. Call under ``torch.enable_grad()``; nothing is detached.
    """
    operator = BlurOperator("circular") if operator is None else operator
    params = tuple(params)
    wrt = tuple(wrt)
    if not wrt or not all(t.requires_grad for t in wrt):
        raise ValueError("every tensor in `wrt` must require grad (call .requires_grad_() before computing x0, params)")
    with torch.enable_grad():
        norms = dps_residual_norm(measurement, x0, *params, operator=operator, residual_weight=residual_weight)
        loss = scale * norms.sum()
        if kernel_regularizer is not None:
            if "kernel" not in operator.param_names:
                raise ValueError(f"kernel_regularizer needs an operator with a kernel, {type(operator).__name__} has none")
            loss = loss + kernel_regularizer(params[operator.param_names.index("kernel")]).sum()
        grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    grads = tuple(torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads))
    return JointGradient(loss.detach(), norms.detach(), grads)
