from .dvsr import StochasticRefinementDeblurPipeline, StochasticRefinementDeblurPipelineOutput
from .fast_em import FastEMDeblurPipeline, FastEMDeblurPipelineOutput


__all__ = [
    "FastEMDeblurPipeline",
    "FastEMDeblurPipelineOutput",
    "StochasticRefinementDeblurPipeline",
    "StochasticRefinementDeblurPipelineOutput",
]
