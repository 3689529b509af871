from .pipeline_blind_dps_deblur import BlindDPSPipeline


__all__ = ["BlindDPSPipeline"]
