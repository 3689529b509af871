"""Physics of blur: pure torch functions, batched, differentiable, device-agnostic."""

from .blur import crop_kernel, edge_taper_window, fft_blur, fft_blur_adjoint, o2p, p2o, pad_kernel, spatial_blur
from .guidance import dps_residual_norm, pigdm_guidance
from .kernels import (
    GaussianKernelGenerator,
    MotionKernelGenerator,
    as_numpy_generator,
    center_kernel,
    dirac_kernel,
    gaussian_kernel,
    kernel_center_of_mass,
    motion_kernel,
    project_kernel,
    random_gaussian_kernel,
    shift_kernel,
)
from .noise import estimate_noise_sigma


__all__ = [
    "GaussianKernelGenerator",
    "MotionKernelGenerator",
    "as_numpy_generator",
    "center_kernel",
    "crop_kernel",
    "dirac_kernel",
    "dps_residual_norm",
    "edge_taper_window",
    "estimate_noise_sigma",
    "fft_blur",
    "fft_blur_adjoint",
    "gaussian_kernel",
    "kernel_center_of_mass",
    "motion_kernel",
    "o2p",
    "p2o",
    "pad_kernel",
    "pigdm_guidance",
    "project_kernel",
    "random_gaussian_kernel",
    "shift_kernel",
    "spatial_blur",
]
