from .scheduling_continuous_noise_level import ContinuousNoiseLevelScheduler, ContinuousNoiseLevelSchedulerOutput


__all__ = ["ContinuousNoiseLevelScheduler", "ContinuousNoiseLevelSchedulerOutput"]
