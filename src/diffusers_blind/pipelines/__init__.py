from .fast_em import FastEMDeblurPipeline, FastEMDeblurPipelineOutput
from .pipeline_utils import DeblurPipelineOutput, DenoiserPrediction, UNetDenoiser


__all__ = ["DeblurPipelineOutput", "DenoiserPrediction", "FastEMDeblurPipeline", "FastEMDeblurPipelineOutput", "UNetDenoiser"]
