from .blind_dps import BlindDPSPipeline
from .fast_em import FastEMDeblurPipeline, FastEMDeblurPipelineOutput
from .pipeline_utils import DeblurPipelineOutput, DenoiserPrediction, UNetDenoiser


__all__ = ["BlindDPSPipeline", "DeblurPipelineOutput", "DenoiserPrediction", "FastEMDeblurPipeline", "FastEMDeblurPipelineOutput", "UNetDenoiser"]
