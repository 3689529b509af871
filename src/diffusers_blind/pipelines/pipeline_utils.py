"""Parts shared by the package's pipelines: the output base class and the UNet → (ε, x̂0) adapter.

* :class:`DeblurPipelineOutput` is what every deblurring pipeline returns. ``kernels`` is ``None``
  for a method that estimates no kernel, so the command line and the evaluation can treat every
  method alike.
* :class:`UNetDenoiser` turns any ``UNet2DModel`` (3 or 6 output channels; fixed or learned
  variance; ε-, x0- or v-prediction) plus its scheduler into the quantities a guided sampler
  needs: ε, x̂0 and the unguided ``x_{t-1}``. A pipeline that runs several diffusion models
  (BlindDPS runs one for the image and one for the kernel) holds one adapter per model.
"""

from __future__ import annotations

import inspect
import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import UNet2DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..ops.noise import AUTO_SIGMA_FLOOR, estimate_noise_sigma


@dataclass
class DeblurPipelineOutput(BaseOutput):
    """Output of a deblurring pipeline of this package.

    Args:
        images: restored images, one per input (the mean over particles): a list of PIL images,
            a ``(B, H, W, C)`` array (``"np"``) or a ``(B, C, H, W)`` tensor (``"pt"``); for
            ``"latent"`` the raw final diffusion state in ``[-1, 1]``.
        kernels: the estimated (or given) kernels, a ``(B, k, k)`` array, or a ``(B, 1, k, k)`` tensor for
            ``"pt"`` and ``"latent"``; ``None`` for a method that estimates no kernel.
        uncertainty: per-pixel standard deviation across particles, ``(B, H, W)`` (``(B, 1, H, W)`` for
            ``"pt"``), or ``None`` with a single particle.
        particles: every posterior sample (particle), ``(B, n, H, W, C)`` array (``(B, n, C, H, W)``
            tensor for ``"pt"``), or ``None``.
        sigma: the noise level used per image, in 8-bit levels (estimated when ``sigma="auto"``).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    kernels: np.ndarray | torch.Tensor | None = None
    uncertainty: np.ndarray | torch.Tensor | None = None
    particles: np.ndarray | torch.Tensor | None = None
    sigma: list[float] | None = None


@dataclass
class DenoiserPrediction:
    """What one UNet evaluation gives a guided sampler at timestep ``t`` (all in the model's ``[-1, 1]`` range).

    Args:
        model_output: the tensor the scheduler's ``step`` takes (variance channels kept only when the
            scheduler learns the variance).
        epsilon: the predicted noise ``ε̂(x_t, t)``, as many channels as ``x_t``.
        x0: the predicted clean sample ``x̂0``: the scheduler's ``pred_original_sample`` (with its
            clipping or thresholding) when the step ran, else Tweedie's ``(x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t``.
        prev_sample: the unguided ``x_{t−1}`` from the scheduler's step, or ``None`` when not asked for.
    """

    model_output: torch.Tensor
    epsilon: torch.Tensor
    x0: torch.Tensor
    prev_sample: torch.Tensor | None = None


class UNetDenoiser:
    """Adapter from a ``UNet2DModel`` and its scheduler to ε, x̂0 and the scheduler step.

    With a 6-channel UNet (guided-diffusion style: ε then the variance interpolation ``v``) the
    variance channels are passed to the scheduler only when its ``variance_type`` is
    ``"learned"`` or ``"learned_range"``, and dropped otherwise. ``prediction_type`` ``"epsilon"``,
    ``"sample"`` and ``"v_prediction"`` are converted to ε with ``ᾱ_t = scheduler.alphas_cumprod[t]``.

    Example:
        >>> from diffusers import DDPMScheduler, UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
        ...                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, out_channels=6)
        >>> denoiser = UNetDenoiser(unet, DDPMScheduler(variance_type="fixed_small"))
        >>> pred = denoiser(torch.zeros(1, 3, 8, 8), 999, step=True)
        >>> pred.epsilon.shape, pred.model_output.shape, pred.prev_sample.shape
        (torch.Size([1, 3, 8, 8]), torch.Size([1, 3, 8, 8]), torch.Size([1, 3, 8, 8]))
    """

    def __init__(self, unet: UNet2DModel, scheduler):
        self.unet = unet
        self.scheduler = scheduler

    @property
    def learned_variance(self) -> bool:
        return getattr(self.scheduler.config, "variance_type", None) in ("learned", "learned_range")

    def step_kwargs(self, generator=None, eta: float = 0.0) -> dict:
        """The extra keyword arguments this scheduler's ``step`` accepts (``generator``, DDIM's ``eta``).

        ``eta`` is checked whatever the scheduler (a number >= 0; DDPM ignores it), so a typo never passes silently.
        """
        if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0 <= eta < math.inf:
            raise ValueError(f"eta must be a finite number >= 0 (DDIM's stochasticity; ignored by DDPM), got {eta!r}")
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in params:
            kwargs["generator"] = generator
        if "eta" in params:
            kwargs["eta"] = eta
        return kwargs

    def model_output(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """The UNet output in the form the scheduler's ``step`` expects."""
        scale = getattr(self.scheduler, "scale_model_input", None)
        model_input = scale(x_t, t) if scale is not None else x_t
        output = self.unet_output(model_input, t)
        if output.shape[1] == 2 * x_t.shape[1] and not self.learned_variance:
            output = output[:, : x_t.shape[1]]
        elif output.shape[1] not in (x_t.shape[1], 2 * x_t.shape[1]):
            raise ValueError(f"UNet output has {output.shape[1]} channels for a {x_t.shape[1]}-channel sample")
        return output

    def unet_output(self, model_input: torch.Tensor, t) -> torch.Tensor:
        """The raw UNet prediction (``TiledUNetDenoiser`` evaluates it tile by tile)."""
        return self.unet(model_input, t).sample

    def alpha_bar(self, t) -> float:
        return float(self.scheduler.alphas_cumprod[int(t)])

    def epsilon_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """ε̂ from the UNet output for the scheduler's ``prediction_type``."""
        output = output[:, : x_t.shape[1]]
        kind = getattr(self.scheduler.config, "prediction_type", "epsilon")
        if kind == "epsilon":
            return output
        alpha_bar = self.alpha_bar(t)
        if kind == "sample":  # ε = (x_t − √ᾱ x0) / √(1−ᾱ)
            return self.epsilon_from_x0(output, x_t, t)
        if kind == "v_prediction":  # ε = √ᾱ v + √(1−ᾱ) x_t
            return alpha_bar**0.5 * output + (1 - alpha_bar) ** 0.5 * x_t
        raise ValueError(f"unsupported prediction_type {kind!r}")

    def output_from_epsilon(self, epsilon: torch.Tensor, x_t: torch.Tensor, t, output: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`epsilon_from_output`: a UNet output (of ``output``'s layout, variance channels
        kept) whose ε is ``epsilon``, so the scheduler's ``step`` can run on a corrected prediction."""
        kind = getattr(self.scheduler.config, "prediction_type", "epsilon")
        alpha_bar = self.alpha_bar(t)
        if kind == "epsilon":
            head = epsilon
        elif kind == "sample":
            head = self.x0_from_epsilon(epsilon, x_t, t)
        elif kind == "v_prediction":  # v = (ε − √(1−ᾱ) x_t) / √ᾱ
            head = (epsilon - (1 - alpha_bar) ** 0.5 * x_t) / alpha_bar**0.5
        else:
            raise ValueError(f"unsupported prediction_type {kind!r}")
        return torch.cat([head, output[:, x_t.shape[1]:]], dim=1) if output.shape[1] > x_t.shape[1] else head

    def epsilon_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """``ε = (x_t − √ᾱ_t x0) / √(1−ᾱ_t)``: the noise that makes ``x0`` the Tweedie estimate at ``x_t``."""
        alpha_bar = self.alpha_bar(t)
        return (x_t - alpha_bar**0.5 * x0) / (1 - alpha_bar) ** 0.5

    def x0_from_epsilon(self, epsilon: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """Tweedie's estimate ``x̂0 = (x_t − √(1−ᾱ_t) ε̂) / √ᾱ_t`` (DDPM Eq. 15), unclipped."""
        alpha_bar = self.alpha_bar(t)
        return (x_t - (1 - alpha_bar) ** 0.5 * epsilon) / alpha_bar**0.5

    def __call__(self, x_t: torch.Tensor, t, step: bool = False, **step_kwargs) -> DenoiserPrediction:
        """Evaluate the UNet at ``(x_t, t)``; with ``step=True`` also run the scheduler's (unguided) step.

        ``step_kwargs`` go to ``scheduler.step`` (see :meth:`step_kwargs`). Differentiable in ``x_t``
        when called under ``torch.enable_grad()``.
        """
        output = self.model_output(x_t, t)
        epsilon = self.epsilon_from_output(output, x_t, t)
        if not step:
            return DenoiserPrediction(output, epsilon, self.x0_from_epsilon(epsilon, x_t, t))
        result = self.scheduler.step(output, t, x_t, **step_kwargs, return_dict=True)
        return DenoiserPrediction(output, epsilon, result.pred_original_sample, result.prev_sample)


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """A model-range sample ``[-1, 1]`` as an image in ``[0, 1]``, computed in float32 and clamped."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def check_generator(generator) -> None:
    """``None``, a ``torch.Generator`` or a list of them (a seed is passed as ``torch.Generator().manual_seed(0)``)."""
    items = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(item, torch.Generator) for item in items):
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {generator!r}: for a seed pass "
                        "torch.Generator().manual_seed(seed)")


def expand_generator(generator, batch: int, copies: int):
    """Repeat a list of ``batch`` generators so that all ``copies`` (particles, samples) of image ``b`` draw from ``generator[b]``.

    A single generator or ``None`` is returned as is; a list of ``batch · copies`` is used per copy.
    """
    check_generator(generator)
    if not isinstance(generator, list):
        return generator
    if len(generator) == batch * copies:
        return generator
    if len(generator) != batch:
        expected = f"{batch}" if copies == 1 else f"{batch} (one per image) or {batch * copies} (one per copy)"
        raise ValueError(f"generator list has {len(generator)} entries; expected {expected}")
    return [g for g in generator for _ in range(copies)]


def callback_outputs(outputs) -> dict:
    """What a step-end callback returned: ``None`` (no change) or a dict of tensors by name."""
    if outputs is None:
        return {}
    if not isinstance(outputs, dict):
        raise TypeError(f"callback_on_step_end must return a dict of tensors or None, got {type(outputs).__name__}")
    return outputs


def callback_replacement(outputs: dict, name: str, current: torch.Tensor, hint: str = "") -> torch.Tensor:
    """The tensor a callback returned for ``name`` in place of ``current`` (or ``current``): same shape, finite, cast
    to ``current``'s dtype and device, so a replacement cannot silently change the batch or crash deep inside.
    ``hint`` ends the shape error (how to build the right shape)."""
    if name not in outputs:
        return current
    value = outputs.pop(name)
    if not torch.is_tensor(value) or tuple(value.shape) != tuple(current.shape):
        got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(f"callback_on_step_end returned {name} of shape {got}; it must keep {tuple(current.shape)}"
                         + hint)
    if not torch.isfinite(value).all():
        raise ValueError(f"callback_on_step_end returned {name} with NaN or infinite values")
    return value.to(device=current.device, dtype=current.dtype)


def check_scheduler(scheduler) -> None:
    """The pipelines step DDPM/DDIM-style from ``x̂0`` (``pred_original_sample``) on the training schedule; other
    diffusers schedulers (Euler, DPM-Solver, ...) scale their inputs or keep multistep state and would run wrong."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
        raise TypeError(f"the scheduler must be a DDPMScheduler or a DDIMScheduler, got {type(scheduler).__name__}: "
                        "load one with DDIMScheduler.from_config(pipe.scheduler.config)")


def prepare_noise(shape, generator, device, dtype, latents=None, name: str = "latents", hint: str = "") -> torch.Tensor:
    """``N(0, I)`` noise of ``shape`` drawn with ``generator``, or the given ``latents`` after a shape check
    (``hint`` ends its error)."""
    if latents is not None:
        if not torch.is_tensor(latents) or tuple(latents.shape) != tuple(shape):
            got = tuple(latents.shape) if torch.is_tensor(latents) else type(latents).__name__
            raise ValueError(f"{name} must have shape {tuple(shape)} (a tensor), got {got}{hint}")
        if not torch.isfinite(latents).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        return latents.to(device=device, dtype=dtype)
    check_generator(generator)
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


LOW_AUTO_SIGMA = 1.0 / 255  # an automatic noise estimate below this draws a warning (see prepare_sigma)


def prepare_sigma(sigma, measurement: torch.Tensor, warn_low: bool = True) -> torch.Tensor:
    """Noise std per image in ``[0, 1]`` units from 8-bit levels (``10`` → 10/255) or ``"auto"``.

    Values below ``AUTO_SIGMA_FLOOR`` (0.5 levels) are raised to it: an 8-bit image carries at
    least the quantisation noise of 1/√12 level, and a smaller σ makes the Pi-GDM weight
    ``1 / (r_t²|K|² + σ²)`` explode on the last steps (the run then diverges into noise).
    ``warn_low``: warn when ``"auto"`` finds almost no noise (not needed where a floor applies).
    """
    batch = measurement.shape[0]
    if isinstance(sigma, str):
        if sigma != "auto":
            raise ValueError(f"sigma must be a number in 8-bit levels or 'auto', got {sigma!r}")
        estimate = estimate_noise_sigma(measurement, floor=AUTO_SIGMA_FLOOR).to(torch.float32)
        if warn_low and (estimate < LOW_AUTO_SIGMA).any():
            warnings.warn(
                f"sigma='auto' estimated {[round(v * 255, 2) for v in estimate.tolist()]} levels: with so little "
                "noise every model error (a kernel slightly off, compression, blur that varies across the photo) "
                "shows as ringing; pass sigma=2 or more to allow for it (docs/kernel_estimation.md)",
                stacklevel=5,
            )
        return estimate
    raw = sigma if torch.is_tensor(sigma) else np.asarray(sigma) if isinstance(sigma, (list, tuple, np.ndarray)) else None
    if sigma is None or isinstance(sigma, (bool, np.bool_)) or (torch.is_tensor(raw) and raw.dtype == torch.bool) or (
            isinstance(raw, np.ndarray) and raw.dtype == np.bool_):
        raise ValueError(f"sigma must be a number in 8-bit levels, one per image, or 'auto'; got {sigma!r}")
    try:
        values = torch.as_tensor(sigma, dtype=torch.float32).flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"sigma must be a number in 8-bit levels, one per image, or 'auto'; got {sigma!r}") from None
    if values.numel() not in (1, batch):
        raise ValueError(f"sigma must be a scalar or one value per image ({batch}), got {values.numel()}")
    if not torch.isfinite(values).all() or (values < 0).any() or (values > 255).any():
        raise ValueError(f"sigma is in 8-bit levels and must be finite and in [0, 255], got {sigma!r}")
    return (values / 255.0).clamp_min(AUTO_SIGMA_FLOOR).expand(batch).clone().to(measurement.device)


def prepare_kernel(kernel, batch: int, device, dtype=torch.float32, warn_sum: bool = True) -> torch.Tensor:
    """A user kernel (``(k, k)``, ``(B, k, k)``, ``(1|B, 1, k, k)``, numpy or torch) as a ``(B, 1, k, k)`` tensor.

    ``warn_sum``: warn when it does not sum to 1 (where it is used as given, not normalised)."""
    kernel = torch.as_tensor(np.asarray(kernel) if not torch.is_tensor(kernel) else kernel)
    if kernel.ndim == 2:
        kernel = kernel[None, None]
    elif kernel.ndim == 3:
        kernel = kernel[:, None]
    if kernel.ndim != 4 or kernel.shape[1] != 1 or kernel.shape[0] not in (1, batch):
        raise ValueError(f"kernel must be (k, k), (B, k, k) or (1|B, 1, k, k); got {tuple(kernel.shape)}")
    kernel = kernel.to(device=device, dtype=dtype)
    if not torch.isfinite(kernel).all() or (kernel < 0).any():
        raise ValueError("kernel must be finite and non-negative")
    sums = kernel.sum(dim=(-2, -1))
    if (sums <= 0).any():
        raise ValueError("kernel must have a positive sum")
    if warn_sum and ((sums - 1).abs() > 1e-2).any():
        warnings.warn("kernel does not sum to 1; it is used as given (the blur then also scales the image)")
    return kernel.expand(batch, -1, -1, -1).clone()  # the caller's array is never shared with the outputs
