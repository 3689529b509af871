"""Preconditioned conjugate gradients for the package's batched, symmetric positive definite solves.

Two solves of the package have no Fourier closed form once a mask enters (a photograph is a *valid*
blur; docs/conventions.md, "Boundary handling of the pipeline"): Pi-GDM's ``(r²·MKKᵀM + σ²I)u = b`` in the E-step and
the kernel's least squares ``(XᵀMX + ρI)k = b`` in the M-step. Both keep their circulant (mask-free)
inverse as the preconditioner, so a few iterations correct what the mask breaks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum(dim=tuple(range(1, a.ndim)), keepdim=True)


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    iterations: int,
    precondition: Callable[[torch.Tensor], torch.Tensor] | None = None,
    initial: torch.Tensor | None = None,
    tolerance: float = 0.0,
) -> torch.Tensor:
    """``x ≈ A⁻¹ rhs`` for an SPD ``A`` (``apply``) and an SPD preconditioner ``P ≈ A⁻¹`` (``precondition``).

    Every leading-dimension slice is its own system (the step lengths are per sample). Starts from
    ``initial`` (zero if ``None``: a warm start saves iterations when ``rhs`` moves little between calls)
    and stops early once every sample's residual is below ``tolerance·‖rhs‖``. A zero curvature or
    ``ρ`` (an already exact sample) gives a zero step instead of a division by zero.
    """
    precondition = precondition if precondition is not None else (lambda v: v)
    tiny = torch.finfo(rhs.dtype).tiny
    solution = torch.zeros_like(rhs) if initial is None else initial.clone()
    residual = rhs if initial is None else rhs - apply(solution)
    stop = tolerance * rhs.flatten(1).norm(dim=1)
    preconditioned = precondition(residual)
    direction = preconditioned
    rho = _batch_dot(residual, preconditioned)
    for _ in range(iterations):
        if tolerance > 0 and bool((residual.flatten(1).norm(dim=1) <= stop).all()):
            break
        image = apply(direction)
        curvature = _batch_dot(direction, image)
        step = torch.where(curvature > 0, rho / curvature.clamp_min(tiny), 0)
        solution = solution + step * direction
        residual = residual - step * image
        preconditioned = precondition(residual)
        rho_next = _batch_dot(residual, preconditioned)
        direction = preconditioned + torch.where(rho > 0, rho_next / rho.clamp_min(tiny), 0) * direction
        rho = rho_next
    return solution
