from .pipeline_fast_em_deblur import FastEMDeblurPipeline, FastEMDeblurPipelineOutput


__all__ = ["FastEMDeblurPipeline", "FastEMDeblurPipelineOutput"]
