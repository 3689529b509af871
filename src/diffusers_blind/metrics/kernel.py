"""Blur-kernel metrics: kernel MSE after alignment and maximum of normalised cross-correlation (MNC).

Kernels may be given as ``(k, k)``, ``(B, k, k)`` or ``(B, 1, kh, kw)`` tensors (numpy arrays are
accepted); the estimate and the truth may have different sizes. Results are ``(B,)`` float64.
A kernel is a *point-spread function*: both kernels must be in the same convention (the package's
true-convolution convention, centre at index ``k // 2``); a kernel estimated in the
cross-correlation convention (BlindDPS) is the 180° rotation and must be flipped first.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


ALIGNMENTS = ("shift", "center_of_mass", "none")


def _as_kernel_batch(kernel) -> torch.Tensor:
    kernel = torch.as_tensor(np.asarray(kernel) if not torch.is_tensor(kernel) else kernel).double()
    if kernel.ndim == 2:
        kernel = kernel[None, None]
    elif kernel.ndim == 3:
        kernel = kernel[:, None]
    if kernel.ndim != 4 or kernel.shape[1] != 1:
        raise ValueError(f"kernel must be (k, k), (B, k, k) or (B, 1, kh, kw); got {tuple(kernel.shape)}")
    if not torch.isfinite(kernel).all():
        raise ValueError("kernel contains NaN or infinite values")
    return kernel


def _pair(k_est, k_true) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_kernel_batch(k_est), _as_kernel_batch(k_true)
    batch = max(a.shape[0], b.shape[0])
    if a.shape[0] not in (1, batch) or b.shape[0] not in (1, batch):
        raise ValueError(f"kernel batches {a.shape[0]} and {b.shape[0]} do not broadcast")
    b = b.to(a.device)
    return a.expand(batch, -1, -1, -1), b.expand(batch, -1, -1, -1)


def normalize_kernel(kernel: torch.Tensor) -> torch.Tensor:
    """Divide each ``(B, 1, kh, kw)`` kernel by its sum (no clipping); a kernel with a non-positive sum is an error."""
    total = kernel.sum(dim=(-2, -1), keepdim=True)
    if (total <= 0).any():
        raise ValueError("kernel has a non-positive sum and cannot be normalised to sum 1")
    return kernel / total


def embed_kernel(kernel: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Zero-pad ``(B, 1, kh, kw)`` to ``shape`` keeping the centre: index ``kh // 2`` goes to ``shape[0] // 2``."""
    kh, kw = kernel.shape[-2:]
    height, width = shape
    if kh > height or kw > width:
        raise ValueError(f"cannot embed a {kh}x{kw} kernel in {height}x{width}")
    top, left = height // 2 - kh // 2, width // 2 - kw // 2
    return F.pad(kernel, (left, width - kw - left, top, height - kh - top))


def full_cross_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """All-shift cross-correlation ``c(s) = Σ_p a(p + s)·b(p)`` of ``(B, 1, ha, wa)`` with ``(B, 1, hb, wb)``.

    Returns ``(B, 1, ha + hb − 1, wa + wb − 1)``; output index ``(i, j)`` is the shift
    ``s = (i − (hb − 1), j − (wb − 1))`` of ``a`` relative to ``b``'s top-left corner.
    """
    batch = a.shape[0]
    hb, wb = b.shape[-2:]
    padded = F.pad(a, (wb - 1, wb - 1, hb - 1, hb - 1))
    out = F.conv2d(padded.reshape(1, batch, *padded.shape[-2:]), b.reshape(batch, 1, hb, wb), groups=batch)
    return out.reshape(batch, 1, *out.shape[-2:])


def mnc(k_est, k_true) -> torch.Tensor:
    """Maximum of normalised cross-correlation (Hu & Yang 2012), per kernel pair; 1 = same kernel up to a shift.

    ``MNC(k̂, k) = max_s (k̂ ⋆ k)(s) / (‖k̂‖₂ ‖k‖₂)`` over every integer shift ``s`` of the full 2-D
    cross-correlation (no wrap-around). Invariant to translation and to the scale of each kernel;
    in ``[0, 1]`` for non-negative kernels. Kernels of different sizes are fine.
    """
    a, b = _pair(k_est, k_true)
    correlation = full_cross_correlation(a, b).flatten(1).amax(1)
    norms = a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1)
    if (norms == 0).any():
        raise ValueError("MNC is undefined for an all-zero kernel")
    return correlation / norms


def _translate(kernel: torch.Tensor, shift: tuple[int, int]) -> torch.Tensor:
    """Integer translation of one ``(1, 1, h, w)`` kernel by ``shift`` with zero fill (mass leaving the support is lost)."""
    dr, dc = shift
    h, w = kernel.shape[-2:]
    padded = F.pad(kernel, (w, w, h, h))
    return padded[..., h - dr : 2 * h - dr, w - dc : 2 * w - dc]


def kernel_mse(k_est, k_true, align: str = "shift") -> torch.Tensor:
    """Mean squared error between sum-1 kernels after aligning them, per kernel pair.

    Both kernels are divided by their sums (Fast EM's normalisation: values ~1e-5 for 33×33
    kernels), then zero-padded, centres kept, to the larger of the two sizes ``H × W``, and the
    MSE is the mean over that ``H × W`` support. ``align``:

    * ``"shift"`` (default): the estimate is translated by the integer shift that maximises the
      cross-correlation (as in :func:`mnc`), and the error counts all of its mass, also what the
      shift moves out of the ``H × W`` support: ``(‖k̂‖² + ‖k‖² − 2 max_s c(s)) / (H·W)``. This is the
      minimum of the MSE over every translation on a canvas large enough to hold both kernels, so
      discarding mass cannot lower the error, and it is symmetric in the two kernels. A shifted
      copy of the true kernel gives 0.
    * ``"center_of_mass"``: translate the estimate by the rounded difference of the centres of mass.
    * ``"none"``: compare the kernels as they are (centre ``k // 2`` on both).

    A blur kernel is only identifiable up to a translation (which moves the image the other way),
    hence the alignment.
    """
    if align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    a, b = _pair(k_est, k_true)
    shape = (max(a.shape[-2], b.shape[-2]), max(a.shape[-1], b.shape[-1]))
    a = embed_kernel(normalize_kernel(a), shape)
    b = embed_kernel(normalize_kernel(b), shape)
    size = shape[0] * shape[1]
    if align == "none":
        return (a - b).pow(2).flatten(1).mean(1)
    if align == "center_of_mass":
        rows = torch.arange(shape[0], dtype=a.dtype, device=a.device)
        cols = torch.arange(shape[1], dtype=a.dtype, device=a.device)

        def centre(k):
            return torch.stack([(k.sum(-1) * rows).sum(-1), (k.sum(-2) * cols).sum(-1)], dim=-1)[:, 0]

        delta = (centre(b) - centre(a)).round().long()
        aligned = torch.cat([_translate(a[i : i + 1], tuple(delta[i].tolist())) for i in range(a.shape[0])])
        return (aligned - b).pow(2).flatten(1).mean(1)
    # MSE(s) = (‖a‖² + ‖b‖² − 2 c(s)) / (H·W), c(s) the cross-correlation: minimal at its peak.
    peak = full_cross_correlation(a, b).flatten(1).amax(1)
    energy = a.pow(2).flatten(1).sum(1) + b.pow(2).flatten(1).sum(1)
    return ((energy - 2 * peak) / size).clamp_min(0)
