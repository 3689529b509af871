"""Physics of blur: forward operators (``operators``) and pure torch functions, batched, differentiable, device-agnostic."""

from .blur import (
    crop_kernel,
    edge_taper_window,
    fft_blur,
    fft_blur_adjoint,
    flip_kernel,
    o2p,
    p2o,
    pad_adjoint,
    pad_kernel,
    photograph_window,
    spatial_blur,
    spatial_blur_adjoint,
    valid_mask,
)
from .cg import conjugate_gradient
from .guidance import JointGradient, dps_joint_gradient, dps_residual_norm, kernel_l1, pigdm_guidance
from .kernel_range import kernel_to_model_range, model_range_to_kernel, unnormalized_kernel
from .kernels import (
    GaussianKernelGenerator,
    MotionKernelGenerator,
    ShakeKernelGenerator,
    as_numpy_generator,
    center_kernel,
    dirac_kernel,
    gaussian_kernel,
    kernel_center_of_mass,
    kernel_extent,
    motion_kernel,
    project_kernel,
    random_gaussian_kernel,
    rescale_kernel,
    shake_kernel,
    shift_kernel,
)
from .fit import reblur_fit
from .noise import estimate_noise_sigma
from .operators import BlurOperator, LinearOperator, TiltBlurOperator, TiltOperator
from .tilt import TiltMapGenerator, simulate_turbulence, tilt_map
from .warp import warp, warp_adjoint


__all__ = [
    "BlurOperator",
    "GaussianKernelGenerator",
    "JointGradient",
    "LinearOperator",
    "MotionKernelGenerator",
    "ShakeKernelGenerator",
    "TiltBlurOperator",
    "TiltMapGenerator",
    "TiltOperator",
    "as_numpy_generator",
    "center_kernel",
    "conjugate_gradient",
    "crop_kernel",
    "dirac_kernel",
    "dps_joint_gradient",
    "dps_residual_norm",
    "edge_taper_window",
    "estimate_noise_sigma",
    "fft_blur",
    "fft_blur_adjoint",
    "flip_kernel",
    "gaussian_kernel",
    "kernel_center_of_mass",
    "kernel_extent",
    "kernel_l1",
    "kernel_to_model_range",
    "motion_kernel",
    "model_range_to_kernel",
    "o2p",
    "p2o",
    "pad_adjoint",
    "pad_kernel",
    "photograph_window",
    "pigdm_guidance",
    "project_kernel",
    "random_gaussian_kernel",
    "reblur_fit",
    "rescale_kernel",
    "shake_kernel",
    "shift_kernel",
    "simulate_turbulence",
    "spatial_blur",
    "spatial_blur_adjoint",
    "tilt_map",
    "unnormalized_kernel",
    "valid_mask",
    "warp",
    "warp_adjoint",
]
