from .deblur_predictor import DeblurPredictor
from .dvsr_denoiser import build_dvsr_denoiser
from .kernel_denoiser import KernelDenoiser
from .kernel_estimator import KernelEstimator


__all__ = ["DeblurPredictor", "KernelDenoiser", "KernelEstimator", "build_dvsr_denoiser"]
