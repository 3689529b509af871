"""A diffusion chain built from arbitrary continuous noise levels (WaveGrad style), used by DvSR."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class ContinuousNoiseLevelSchedulerOutput(BaseOutput):
    """``prev_sample``: ``z_{t-1}``; ``pred_original_sample``: the clean estimate ``ẑ_0`` at this step."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


class ContinuousNoiseLevelScheduler(SchedulerMixin, ConfigMixin):
    r"""Variance-preserving diffusion ``z_t = √ᾱ·z_0 + √(1−ᾱ)·ε`` indexed by the continuous level ``√ᾱ ∈ (0, 1]``.

    **Training chain.** ``β_1 … β_N`` (``beta_schedule="linear"`` from ``beta_start`` to ``beta_end``, the
    SR3 schedule), ``ᾱ_t = ∏_{s≤t}(1 − β_s)``, ``ᾱ_0 = 1``. :meth:`sample_training_levels` draws an
    index ``t`` uniformly in ``1…N`` and then ``√ᾱ ~ U(√ᾱ_t, √ᾱ_{t−1})`` (WaveGrad), so the denoiser
    sees a continuum of levels and any inference chain can be used without retraining.

    **Conditioning.** The denoiser receives the level as a scalar "timestep"
    ``c(ᾱ) = timestep_scale · (L − λ) / (2L)`` with the log signal-to-noise ratio
    ``λ = log(ᾱ / (1 − ᾱ))`` clipped to ``[−L, L]`` (``L = logsnr_max``): ``0`` is clean,
    ``timestep_scale`` pure noise. :meth:`noise_level_to_timestep` and
    :meth:`timestep_to_noise_level` convert both ways.

    **Inference chain.** :meth:`set_timesteps` takes ``num_inference_steps`` (levels of the training
    chain at evenly spaced indices ``N, N − N/T, …, N/T``, "trailing" spacing), or an explicit
    increasing list ``sqrt_alphas_cumprod`` of levels, or a list of ``betas`` (WaveGrad's inference
    schedules). :meth:`step` is the generalised DDIM update between consecutive levels ``ᾱ_t → ᾱ_prev``:
    ``ẑ_0 = (z_t − √(1−ᾱ_t) ε̂)/√ᾱ_t``,
    ``σ_t = η √((1−ᾱ_prev)/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)``,
    ``z_prev = √ᾱ_prev ẑ_0 + √(1−ᾱ_prev−σ_t²) ε̂ + σ_t ξ``;
    ``η = 1`` is the ancestral DDPM step of DvSR Alg. 1 (posterior variance), ``η = 0`` is deterministic.
    The last step goes to ``ᾱ = 1`` and returns ``ẑ_0``. :meth:`step` keeps its position in the chain
    with a counter (:attr:`step_index`, reset by :meth:`set_timesteps`; :meth:`set_begin_index` starts
    it later), so two levels whose conditioning values coincide (log-SNR clipped at ``±L``) still take
    their own step; a timestep that does not match the counter's position is looked up by value.

    **Model output** (``prediction_type``): ``"epsilon"`` (``ε̂``), ``"sample"`` (``ẑ_0``) or
    ``"v_prediction"`` (``v = √ᾱ ε − √(1−ᾱ) z_0``, so ``ε̂ = √ᾱ v̂ + √(1−ᾱ) z_t`` and
    ``ẑ_0 = √ᾱ z_t − √(1−ᾱ) v̂``). With ``"epsilon"`` an error ``δ`` of ``ε̂`` becomes an error
    ``δ √(1−ᾱ)/√ᾱ`` of ``ẑ_0``, which explodes at high noise; with ``"v_prediction"`` it stays ``≤ δ``.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 2000,
        beta_start: float = 1e-6,
        beta_end: float = 1e-2,
        beta_schedule: str = "linear",
        logsnr_max: float = 20.0,
        timestep_scale: float = 1000.0,
        eta: float = 1.0,
        clip_sample: bool = True,
        clip_sample_range: float = 2.0,
        prediction_type: str = "epsilon",
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if beta_schedule not in ("linear", "scaled_linear"):
            raise ValueError(f"beta_schedule must be 'linear' or 'scaled_linear', got {beta_schedule!r}")
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        else:
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        self.betas = betas
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        # index 0 is the clean level ᾱ_0 = 1, index t the level after t training steps
        self.train_sqrt_alphas_cumprod = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod.sqrt()])
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.sqrt_alphas_cumprod = None
        self.timesteps = None
        self._step_index = None
        self._begin_index = None
        self.set_timesteps(min(num_train_timesteps, 50))

    # ------------------------------------------------------------------ noise level <-> conditioning
    def noise_level_to_timestep(self, sqrt_alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """Map ``√ᾱ`` to the scalar conditioning ``c = scale·(L − λ)/(2L)``, ``λ = log ᾱ/(1−ᾱ)`` clipped to ``[−L, L]``."""
        s = torch.as_tensor(sqrt_alpha_bar, dtype=torch.float64)
        if (s <= 0).any() or (s > 1).any():
            raise ValueError("noise levels sqrt(alpha_bar) must lie in (0, 1]")
        a = s.square()
        limit = self.config.logsnr_max
        logsnr = (a.log() - torch.log1p(-a.clamp(max=1 - 1e-300))).clamp(-limit, limit)
        return ((limit - logsnr) / (2 * limit) * self.config.timestep_scale).float()

    def timestep_to_noise_level(self, timestep: torch.Tensor | float) -> torch.Tensor:
        """Inverse of :meth:`noise_level_to_timestep` (``√ᾱ`` as float64)."""
        t = torch.as_tensor(timestep, dtype=torch.float64)
        limit = self.config.logsnr_max
        logsnr = limit - 2 * limit * t / self.config.timestep_scale
        return torch.sigmoid(logsnr).sqrt()

    # ------------------------------------------------------------------ training
    def sample_training_levels(
        self, batch_size: int, generator: torch.Generator | None = None, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``t ~ U{1…N}`` and ``√ᾱ ~ U(√ᾱ_t, √ᾱ_{t−1})`` per sample; returns ``(sqrt_alpha_bar, t)`` (float32, int64)."""
        n = self.config.num_train_timesteps
        index = torch.randint(1, n + 1, (batch_size,), generator=generator)
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        low = self.train_sqrt_alphas_cumprod[index]
        high = self.train_sqrt_alphas_cumprod[index - 1]
        level = low + u * (high - low)
        return level.float().to(device), index.to(device)

    @staticmethod
    def add_noise_at_level(original_samples: torch.Tensor, noise: torch.Tensor, sqrt_alpha_bar: torch.Tensor) -> torch.Tensor:
        """``z = √ᾱ·z_0 + √(1−ᾱ)·ε`` with one level per batch element."""
        s = torch.as_tensor(sqrt_alpha_bar, device=original_samples.device, dtype=original_samples.dtype)
        s = s.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return s * original_samples + (1 - s.square()).clamp_min(0).sqrt() * noise

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """diffusers-style ``add_noise`` where ``timesteps`` are continuous conditioning values (see class doc)."""
        level = self.timestep_to_noise_level(torch.as_tensor(timesteps).cpu())
        return self.add_noise_at_level(original_samples, noise, level.to(original_samples.device))

    def _level(self, sqrt_alpha_bar, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.as_tensor(sqrt_alpha_bar, device=sample.device, dtype=sample.dtype).reshape(-1, *([1] * (sample.ndim - 1)))
        return s, (1 - s.square()).clamp_min(0).sqrt()

    def predict_epsilon(self, model_output: torch.Tensor, sample: torch.Tensor, sqrt_alpha_bar) -> torch.Tensor:
        """``ε̂`` from the model output at level ``√ᾱ`` (per batch element or scalar), by ``prediction_type``."""
        s, c = self._level(sqrt_alpha_bar, sample)
        if self.config.prediction_type == "epsilon":
            return model_output
        if self.config.prediction_type == "v_prediction":
            return s * model_output + c * sample
        return (sample - s * model_output) / c

    def predict_original(self, model_output: torch.Tensor, sample: torch.Tensor, sqrt_alpha_bar) -> torch.Tensor:
        """``ẑ_0`` from the model output at level ``√ᾱ``, by ``prediction_type``."""
        s, c = self._level(sqrt_alpha_bar, sample)
        if self.config.prediction_type == "epsilon":
            return (sample - c * model_output) / s
        if self.config.prediction_type == "v_prediction":
            return s * sample - c * model_output
        return model_output

    def predict_velocity(self, model_output: torch.Tensor, sample: torch.Tensor, sqrt_alpha_bar) -> torch.Tensor:
        """``v̂ = √ᾱ ε̂ − √(1−ᾱ) ẑ_0`` from the model output at level ``√ᾱ``, by ``prediction_type``."""
        if self.config.prediction_type == "v_prediction":
            return model_output
        s, c = self._level(sqrt_alpha_bar, sample)
        return s * self.predict_epsilon(model_output, sample, sqrt_alpha_bar) - c * self.predict_original(
            model_output, sample, sqrt_alpha_bar
        )

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    # ------------------------------------------------------------------ inference
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sqrt_alphas_cumprod: list[float] | torch.Tensor | None = None,
        betas: list[float] | torch.Tensor | None = None,
    ) -> None:
        """Build the inference chain from exactly one of ``num_inference_steps``, ``sqrt_alphas_cumprod``, ``betas``.

        ``sqrt_alphas_cumprod``: the levels from the noisiest to the cleanest, strictly increasing in
        ``(0, 1)``. ``betas``: a WaveGrad schedule ``β_1 … β_T`` in ``(0, 1)``, giving levels
        ``√∏_{s≤t}(1−β_s)`` for ``t = T … 1``. Sets :attr:`timesteps` (float conditioning values, noisiest first).
        """
        given = [v is not None for v in (num_inference_steps, sqrt_alphas_cumprod, betas)]
        if sum(given) != 1:
            raise ValueError("pass exactly one of num_inference_steps, sqrt_alphas_cumprod, betas")
        if num_inference_steps is not None:
            if int(num_inference_steps) != num_inference_steps or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
            n = self.config.num_train_timesteps
            if num_inference_steps > n:
                raise ValueError(f"num_inference_steps ({num_inference_steps}) cannot exceed num_train_timesteps ({n})")
            index = torch.linspace(n, n / num_inference_steps, int(num_inference_steps), dtype=torch.float64).round().long()
            levels = self.train_sqrt_alphas_cumprod[index]
        elif betas is not None:
            b = torch.as_tensor(betas, dtype=torch.float64).flatten()
            if b.numel() < 1 or (b <= 0).any() or (b >= 1).any():
                raise ValueError("betas must be a non-empty list of values in (0, 1)")
            levels = torch.cumprod(1 - b, 0).sqrt().flip(0)
        else:
            levels = torch.as_tensor(sqrt_alphas_cumprod, dtype=torch.float64).flatten()
            if levels.numel() < 1 or (levels <= 0).any() or (levels >= 1).any():
                raise ValueError("sqrt_alphas_cumprod must be a non-empty list of values in (0, 1)")
            if levels.numel() > 1 and not (levels[1:] > levels[:-1]).all():
                raise ValueError("sqrt_alphas_cumprod must be strictly increasing (noisiest level first)")
        self.num_inference_steps = levels.numel()
        self.sqrt_alphas_cumprod = levels
        self.timesteps = self.noise_level_to_timestep(levels).to(device)
        self._step_index = None
        self._begin_index = None

    @property
    def step_index(self) -> int | None:
        """Position in :attr:`timesteps` of the next :meth:`step` (``None`` before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Position of the first :meth:`step`, set by :meth:`set_begin_index` (``None``: found from the timestep)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the chain at position ``begin_index`` of :attr:`timesteps` (diffusers' img2img hook); call after set_timesteps."""
        if self.timesteps is None or not 0 <= int(begin_index) < self.num_inference_steps:
            raise ValueError(f"begin_index must be in [0, {self.num_inference_steps}), got {begin_index}")
        self._begin_index = int(begin_index)

    def index_for_timestep(self, timestep: torch.Tensor | float) -> int:
        """Position of ``timestep`` in :attr:`timesteps` (matched to the nearest value; the first of equal values)."""
        t = torch.as_tensor(timestep, dtype=torch.float32).flatten()[0].cpu()
        distance = (self.timesteps.cpu() - t).abs()
        index = int(distance.argmin())
        if distance[index] > 1e-3 * max(1.0, abs(float(t))):
            raise ValueError(f"timestep {float(t)} is not in the current schedule; call set_timesteps first")
        return index

    def _init_step_index(self, timestep: torch.Tensor | float) -> None:
        """Set :attr:`step_index` for a step at ``timestep``: the counter (or :attr:`begin_index`) when its
        timestep is ``timestep``, else the position found by value."""
        index = self._step_index if self._step_index is not None else self._begin_index
        if index is not None and index < self.num_inference_steps:
            t = float(torch.as_tensor(timestep, dtype=torch.float32).flatten()[0])
            if abs(float(self.timesteps[index]) - t) <= 1e-3 * max(1.0, abs(t)):
                self._step_index = index
                return
        self._step_index = self.index_for_timestep(timestep)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float | None = None,
        return_dict: bool = True,
    ) -> ContinuousNoiseLevelSchedulerOutput | tuple:
        """One generalised DDIM step ``z_t → z_prev`` from the model output (``prediction_type``; see class doc)."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        eta = self.config.eta if eta is None else eta
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self._init_step_index(timestep)
        index = self._step_index
        a_t = float(self.sqrt_alphas_cumprod[index]) ** 2
        a_prev = float(self.sqrt_alphas_cumprod[index + 1]) ** 2 if index + 1 < self.num_inference_steps else 1.0

        pred_original = self.predict_original(model_output, sample, math.sqrt(a_t))
        eps = self.predict_epsilon(model_output, sample, math.sqrt(a_t))
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            pred_original = pred_original.clamp(-limit, limit)
            eps = (sample - math.sqrt(a_t) * pred_original) / math.sqrt(1 - a_t)
        sigma = eta * math.sqrt(max((1 - a_prev) / (1 - a_t), 0.0)) * math.sqrt(max(1 - a_t / a_prev, 0.0))
        sigma = min(sigma, math.sqrt(max(1 - a_prev, 0.0)))
        prev = math.sqrt(a_prev) * pred_original + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if sigma > 0:
            prev = prev + sigma * randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        self._step_index = index + 1
        if not return_dict:
            return (prev, pred_original)
        return ContinuousNoiseLevelSchedulerOutput(prev_sample=prev, pred_original_sample=pred_original)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
