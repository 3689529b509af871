from .dvsr import StochasticRefinementDeblurPipeline, StochasticRefinementDeblurPipelineOutput
from .blind_dps import BlindDPSPipeline, BlindDPSTurbulencePipeline, BlindDPSTurbulencePipelineOutput
from .fast_em import FastEMDeblurPipeline, FastEMDeblurPipelineOutput
from .pipeline_utils import DeblurPipelineOutput, DenoiserPrediction, UNetDenoiser


__all__ = [
    "BlindDPSPipeline",
    "BlindDPSTurbulencePipeline",
    "BlindDPSTurbulencePipelineOutput",
    "DeblurPipelineOutput",
    "DenoiserPrediction",
    "FastEMDeblurPipeline",
    "FastEMDeblurPipelineOutput",
    "StochasticRefinementDeblurPipeline",
    "StochasticRefinementDeblurPipelineOutput",
    "UNetDenoiser",
]
