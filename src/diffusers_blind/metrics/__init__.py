"""Evaluation metrics for blind deblurring (docs/conventions.md, "Metrics").

* image: :func:`psnr`, :func:`ssim` (``[0, 1]`` RGB, data range 1, per image), :func:`gmsd`
  (analytic perceptual full-reference), :func:`laplacian_sharpness` (no-reference sharpness proxy),
  :func:`reblur_loss` (Fast EM Eq. 34);
* kernel: :func:`kernel_mse` (sum-1 kernels, aligned at the peak of their cross-correlation), :func:`mnc`;
* no-reference, offline: :func:`niqe` (pristine model fitted on the training photographs);
* optional (extra packages / downloaded weights): :func:`lpips`, :func:`fid`, :func:`niqe_pyiqa`,
  :func:`brisque`; they raise :class:`MetricUnavailableError` when they cannot run, and
  :func:`available_metrics` lists what works here.

Every per-image metric returns a ``(B,)`` float64 tensor.
"""

from .image import ReblurLoss, gmsd, laplacian_sharpness, psnr, reblur_loss, ssim
from .kernel import embed_kernel, full_cross_correlation, kernel_mse, mnc, normalize_kernel
from .perceptual import (
    MetricUnavailableError,
    available_metrics,
    brisque,
    fid,
    lpips,
    metric_status,
    niqe,
    niqe_pyiqa,
)


__all__ = [
    "MetricUnavailableError",
    "ReblurLoss",
    "available_metrics",
    "brisque",
    "embed_kernel",
    "fid",
    "full_cross_correlation",
    "gmsd",
    "kernel_mse",
    "laplacian_sharpness",
    "lpips",
    "metric_status",
    "mnc",
    "niqe",
    "niqe_pyiqa",
    "normalize_kernel",
    "psnr",
    "reblur_loss",
    "ssim",
]
