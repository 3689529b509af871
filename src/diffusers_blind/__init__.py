"""diffusers_blind: diffusion-based blind image deblurring as diffusers pipelines.

Importing the package imports every component module: diffusers 0.42 resolves the third-party
classes named in ``model_index.json`` only from ``sys.modules``.
"""

from pathlib import Path

from . import _interrupt  # noqa: F401  (first: Ctrl-C during the imports below is one line on the command line)
from diffusers import ModelMixin, SchedulerMixin  # noqa: F401  (diffusers looks these names up here)

from . import ops
from .models import DeblurPredictor, KernelDenoiser, KernelEstimator
from .pipelines import (
    BlindDPSPipeline,
    BlindDPSTurbulencePipeline,
    BlindDPSTurbulencePipelineOutput,
    DeblurPipelineOutput,
    FastEMDeblurPipeline,
    FastEMDeblurPipelineOutput,
    StochasticRefinementDeblurPipeline,
    StochasticRefinementDeblurPipelineOutput,
)
from .schedulers import ContinuousNoiseLevelScheduler


__version__ = "0.1.0"

DEFAULT_MODEL = str(Path(__file__).parent / "default_model")
"""Path of the shipped default Fast EM pipeline folder (load with ``FastEMDeblurPipeline.from_pretrained``)."""

FAST_MODEL = str(Path(__file__).parent / "fast_model")
"""Path of the shipped fast Fast EM folder: a UNet distilled from the default's, about half its cost per step, a
little lower quality (its model card); the same scheduler and kernel estimator. ``--model fast`` on the command line."""

DVSR_DEFAULT_MODEL = str(Path(__file__).parent / "dvsr_default_model")
"""Path of the shipped DvSR pipeline folder (load with ``StochasticRefinementDeblurPipeline.from_pretrained``)."""
BLIND_DPS_DEFAULT_MODEL = str(Path(__file__).parent / "blind_dps_default_model")
"""Path of the shipped default BlindDPS pipeline folder (load with ``BlindDPSPipeline.from_pretrained``)."""

__all__ = [
    "BLIND_DPS_DEFAULT_MODEL",
    "BlindDPSPipeline",
    "BlindDPSTurbulencePipeline",
    "BlindDPSTurbulencePipelineOutput",
    "ContinuousNoiseLevelScheduler",
    "DEFAULT_MODEL",
    "DVSR_DEFAULT_MODEL",
    "FAST_MODEL",
    "DeblurPipelineOutput",
    "DeblurPredictor",
    "FastEMDeblurPipeline",
    "FastEMDeblurPipelineOutput",
    "KernelDenoiser",
    "KernelEstimator",
    "StochasticRefinementDeblurPipeline",
    "StochasticRefinementDeblurPipelineOutput",
    "ops",
]
