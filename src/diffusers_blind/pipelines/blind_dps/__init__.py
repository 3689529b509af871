from .pipeline_blind_dps_deblur import BlindDPSPipeline
from .pipeline_blind_dps_turbulence import BlindDPSTurbulencePipeline, BlindDPSTurbulencePipelineOutput


__all__ = ["BlindDPSPipeline", "BlindDPSTurbulencePipeline", "BlindDPSTurbulencePipelineOutput"]
