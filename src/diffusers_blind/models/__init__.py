from .kernel_denoiser import KernelDenoiser
from .kernel_estimator import KernelEstimator


__all__ = ["KernelDenoiser", "KernelEstimator"]
