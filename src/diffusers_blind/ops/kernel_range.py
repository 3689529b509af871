"""Kernels as diffusion-model images: the map between sum-1 kernels and the model range ``[-1, 1]``.

A kernel prior (BlindDPS's kernel diffusion model) is a UNet on one-channel images in ``[-1, 1]``,
whereas a blur kernel is non-negative with sum 1 (docs/conventions.md, "Kernel diffusion prior").

* :func:`kernel_to_model_range` — ``k̃ = 2 · k / max(k) − 1``: the peak maps to ``+1``, zero to ``−1``.
  Used to make training data; it removes the kernel's scale (sum 1 is restored on the way back).
* :func:`unnormalized_kernel` — ``u = (clip(k̃, −1, 1) + 1) / 2`` in ``[0, 1]``: the kernel up to its scale.
* :func:`model_range_to_kernel` — ``k = u / Σu``, per batch element (an all-zero ``u`` gives a Dirac).
  With ``background="median"`` the kernel's median ``m`` (its background: a blur kernel covers far
  fewer than half of its pixels) is removed first, ``u ← max(u − m, 0)``: a sample whose background
  drifted from ``−1`` (an under-trained prior) would otherwise put most of its mass in a flat pedestal.

The round trip ``model_range_to_kernel(kernel_to_model_range(k)) == k`` holds for every non-negative,
non-zero kernel with sum 1.
"""

from __future__ import annotations

import torch

from .kernels import project_kernel


def kernel_to_model_range(kernel: torch.Tensor) -> torch.Tensor:
    """``2 · k / max(k) − 1`` per batch element, for ``(B, 1, kh, kw)`` non-negative kernels."""
    if kernel.ndim != 4 or kernel.shape[1] != 1:
        raise ValueError(f"kernel must be (B, 1, kh, kw), got {tuple(kernel.shape)}")
    if (kernel < 0).any():
        raise ValueError("kernel_to_model_range needs non-negative kernels")
    peak = kernel.amax(dim=(-2, -1), keepdim=True)
    if (peak <= 0).any():
        raise ValueError("kernel_to_model_range needs kernels with a positive entry (got an all-zero kernel)")
    return 2 * kernel / peak - 1


def unnormalized_kernel(image: torch.Tensor) -> torch.Tensor:
    """``(clip(k̃, −1, 1) + 1) / 2``: the model-range kernel image as a non-negative kernel of unknown scale.

    This is where BlindDPS's sparsity prior ``‖·‖₁`` is applied in this package: unlike the sum-1
    kernel (whose ℓ1 norm is identically 1), it has a non-zero gradient.
    """
    return (image.clamp(-1, 1) + 1) / 2


KERNEL_BACKGROUNDS = ("none", "median")


def model_range_to_kernel(image: torch.Tensor, background: str = "none") -> torch.Tensor:
    """The sum-1, non-negative kernel of a model-range image, normalised per batch element (differentiable).

    ``background="none"``: ``u / Σu`` (the BlindDPS sampler's map). ``"median"``: ``max(u − median(u), 0)``
    normalised, per element; identical when the background is at ``−1``, as for a well-trained prior.
    """
    if image.ndim != 4 or image.shape[1] != 1:
        raise ValueError(f"kernel image must be (B, 1, kh, kw), got {tuple(image.shape)}")
    if background not in KERNEL_BACKGROUNDS:
        raise ValueError(f"background must be one of {KERNEL_BACKGROUNDS}, got {background!r}")
    u = unnormalized_kernel(image)
    if background == "median":
        u = u - u.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)
    return project_kernel(u)
