from .pipeline_stochastic_refinement_deblur import (
    StochasticRefinementDeblurPipeline,
    StochasticRefinementDeblurPipelineOutput,
    perception_distortion_setting,
)


__all__ = ["StochasticRefinementDeblurPipeline", "StochasticRefinementDeblurPipelineOutput", "perception_distortion_setting"]
