"""diffusers_blind: diffusion-based blind image deblurring as diffusers pipelines.

Importing the package imports every component module: diffusers 0.42 resolves the third-party
classes named in ``model_index.json`` only from ``sys.modules``.
"""

from pathlib import Path

from diffusers import ModelMixin, SchedulerMixin  # noqa: F401  (diffusers looks these names up here)

from . import ops
from .models import KernelDenoiser, KernelEstimator
from .pipelines import (
    BlindDPSPipeline,
    BlindDPSTurbulencePipeline,
    BlindDPSTurbulencePipelineOutput,
    DeblurPipelineOutput,
    FastEMDeblurPipeline,
    FastEMDeblurPipelineOutput,
)


__version__ = "0.1.0"

DEFAULT_MODEL = str(Path(__file__).parent / "default_model")
"""Path of the shipped default Fast EM pipeline folder (load with ``FastEMDeblurPipeline.from_pretrained``)."""

BLIND_DPS_DEFAULT_MODEL = str(Path(__file__).parent / "blind_dps_default_model")
"""Path of the shipped default BlindDPS pipeline folder (load with ``BlindDPSPipeline.from_pretrained``)."""

__all__ = [
    "BLIND_DPS_DEFAULT_MODEL",
    "BlindDPSPipeline",
    "BlindDPSTurbulencePipeline",
    "BlindDPSTurbulencePipelineOutput",
    "DEFAULT_MODEL",
    "DeblurPipelineOutput",
    "FastEMDeblurPipeline",
    "FastEMDeblurPipelineOutput",
    "KernelDenoiser",
    "KernelEstimator",
    "ops",
]
