"""Deblurring via Stochastic Refinement (Whang, Delbracio, Talebi, Saharia, Dimakis, Milanfar; CVPR 2022), Alg. 1."""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import replace_example_docstring

from ...image_processor import ImageInput, crop_window, pad_to_multiple, tensor_to_output, to_tensor
from ...models.deblur_predictor import DeblurPredictor
from ...models.kernel_estimator import KernelEstimator
from ...ops.blur import edge_taper_window, valid_mask
from ...ops.kernels import center_kernel, dirac_kernel
from ...ops.noise import estimate_noise_sigma
from ...schedulers.scheduling_continuous_noise_level import ContinuousNoiseLevelScheduler
from ..hub import HubPipelineMixin
from ..pipeline_utils import DeblurPipelineOutput, callback_outputs, callback_replacement, expand_generator, prepare_noise
from ..tiling import resolve_precision


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch, diffusers_blind
        >>> from diffusers_blind import StochasticRefinementDeblurPipeline
        >>> from PIL import Image

        >>> pipe = StochasticRefinementDeblurPipeline.from_pretrained(diffusers_blind.DVSR_DEFAULT_MODEL)
        >>> out = pipe(Image.open("blurry.png"), perception_distortion=1.0, generator=torch.manual_seed(0))
        >>> out.images[0].save("restored.png")   # mean of the samples (low distortion)
        >>> out = pipe(Image.open("blurry.png"), perception_distortion=0.0, generator=torch.manual_seed(0))
        >>> out.images[0].save("sharp_sample.png")  # one long-chain sample (perceptual end)
        ```
"""

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# autocast dtype of the two networks; the long names are those of the package's other pipelines (`precision=`)
# the two ends of the perception-distortion knob: (denoising steps, averaged samples). The distortion end
# averages 16 one-step samples (the denoiser's MMSE residual estimate from 16 draws of z_T): on the held-out
# photographs it is the setting above the predictor in PSNR (docs/dvsr.md); the knob's middle, 10 × 4, is
# the paper's "Ours-SA".
PERCEPTION_END = (100, 1)
DISTORTION_END = (1, 16)
DEFAULT_STEPS = 10  # chain length when only num_samples is given


@dataclass
class StochasticRefinementDeblurPipelineOutput(DeblurPipelineOutput):
    """Output of [`StochasticRefinementDeblurPipeline`] (a [`DeblurPipelineOutput`] plus ``x_init``).

    Args:
        images: restored images ``x_init + z_0``, averaged over the samples: a list of PIL images, a
            ``(B, H, W, C)`` array (``"np"``) or a ``(B, C, H, W)`` tensor (``"pt"``); for ``"latent"``
            the raw padded samples ``(B·n, C, H', W')`` in ``[-1, 1]``.
        kernels: ``None``, or when the pipeline has a ``kernel_estimator``, the kernel that the M-step
            finds from the input and the restored image, ``(B, k, k)`` array (``(B, 1, k, k)`` tensor for ``"pt"``
            and ``"latent"``).
        uncertainty: per-pixel std over the samples (mean over channels), ``(B, H, W)`` (``(B, 1, H, W)``
            for ``"pt"``), or ``None`` with one sample.
        particles: every sample, ``(B, n, H, W, C)`` array (``(B, n, C, H, W)`` tensor for ``"pt"``);
            also readable as ``samples``.
        sigma: the noise level (8-bit levels) given to the kernel M-step, or ``None``.
        x_init: the predictor's estimate ``g(y)``, one per image, same type and layout as ``images`` (for
            ``"latent"``: ``(B, C, H', W')`` padded, in ``[-1, 1]``, where ``images`` holds ``B·n`` samples).
    """

    x_init: list[PIL.Image.Image] | np.ndarray | torch.Tensor | None = None

    @property
    def samples(self):
        """The samples averaged into ``images`` (the same object as ``particles``)."""
        return self.particles


def _is_number(value) -> bool:
    """A real number (numpy scalars and 0-d arrays too), not a bool."""
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0:
        value = value.item()
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_whole(value) -> bool:
    """An integer (or an integral float such as ``2.0``), not a bool."""
    return _is_number(value) and math.isfinite(float(value)) and float(value) == int(value)


def perception_distortion_setting(value: float) -> tuple[int, int]:
    """Map the knob ``p ∈ [0, 1]`` to ``(num_inference_steps, num_samples)`` by geometric interpolation.

    ``p = 0`` is the perceptual end ("Ours" in the paper: a long chain, one sample, sharp and plausible),
    ``p = 1`` the distortion end (a one-step chain averaged over 16 samples: the mean of the denoiser's residual
    estimates, closest to the MMSE estimate, i.e. highest PSNR): ``steps = 100^(1−p)``, ``samples = 16^p``,
    rounded; ``p = 0.5`` is the paper's "Ours-SA" (10 steps × 4 samples).
    """
    if not _is_number(value) or not math.isfinite(float(value)) or not 0 <= float(value) <= 1:
        raise ValueError(f"perception_distortion must be a number in [0, 1], got {value!r}")
    value = float(value)
    steps = math.exp((1 - value) * math.log(PERCEPTION_END[0]) + value * math.log(DISTORTION_END[0]))
    samples = math.exp((1 - value) * math.log(PERCEPTION_END[1]) + value * math.log(DISTORTION_END[1]))
    return int(round(steps)), int(round(samples))


class StochasticRefinementDeblurPipeline(HubPipelineMixin, DiffusionPipeline):
    r"""Blind deblurring by a deterministic predictor refined by conditional diffusion on the residual.

    Paper Algorithm 1: ``x_init = g(y)``; ``z_T ~ N(0, I)``; for each level of the scheduler's chain
    ``z_prev = step(f([z_t, y], c(ᾱ_t)), z_t)``; output ``x̂ = x_init + s·z_0`` (``s = residual_scale``,
    1 in the paper). With ``num_samples = n > 1``
    the output is the mean of ``n`` samples (sample averaging, "SA"), and their per-pixel std is
    returned as ``uncertainty``. Images are in ``[0, 1]`` outside and ``[-1, 1]`` inside the networks.
    The method estimates no kernel; given a ``kernel_estimator``, the pipeline also returns the kernel
    that a few M-steps (Fast EM's HQS) find from ``y`` and the restored image.

    Args:
        predictor ([`DeblurPredictor`]): the deterministic initial predictor ``g``.
        denoiser ([`UNet2DModel`]): the conditional denoiser ``f``, ``2C`` input channels (``z_t`` and ``y``),
            ``C`` output channels (ε), timestep input = continuous noise level.
        scheduler ([`ContinuousNoiseLevelScheduler`]): the noise-level chain.
        kernel_estimator ([`KernelEstimator`], *optional*): M-step used to report a kernel.
        residual_scale (`float`): the diffusion runs on the residual divided by this (the output is
            ``x_init + residual_scale · z_0``), so that a small residual (std ≈ 0.07 on ``[−1, 1]``) fills
            the noise schedule like an image does; saved in ``model_index.json``. 1 in the paper.
    """

    model_cpu_offload_seq = "predictor->denoiser"
    _optional_components = ["kernel_estimator"]
    _callback_tensor_inputs = ["latents", "x_init", "pred_original_sample"]

    def __init__(
        self,
        predictor: DeblurPredictor,
        denoiser: UNet2DModel,
        scheduler: ContinuousNoiseLevelScheduler,
        kernel_estimator: KernelEstimator | None = None,
        residual_scale: float = 1.0,
    ):
        super().__init__()
        if not math.isfinite(residual_scale) or residual_scale <= 0:
            raise ValueError(f"residual_scale must be a finite number > 0, got {residual_scale}")
        if denoiser.config.in_channels != 2 * denoiser.config.out_channels:
            raise ValueError(
                f"denoiser must take [z_t, y] (2C channels) and return C: got in {denoiser.config.in_channels}, "
                f"out {denoiser.config.out_channels}"
            )
        if predictor.config.out_channels != denoiser.config.out_channels:
            raise ValueError("predictor and denoiser must have the same number of image channels")
        self.register_modules(predictor=predictor, denoiser=denoiser, scheduler=scheduler, kernel_estimator=kernel_estimator)
        self.register_to_config(residual_scale=residual_scale)
        self._num_timesteps = 0
        self._interrupt = False

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def pad_multiple(self) -> int:
        """Height and width are padded to a multiple of this (both networks' downsampling factor)."""
        unet_factor = 2 ** (len(self.denoiser.config.block_out_channels) - 1)
        return math.lcm(unet_factor, self.predictor.downsample_factor)

    def _device(self) -> torch.device:
        # a KernelEstimator without a PnP denoiser has no parameters, and diffusers' device lookup fails on it
        try:
            return self._execution_device
        except StopIteration:
            return self.predictor.device

    # ------------------------------------------------------------------ inputs
    def check_inputs(
        self, measurement, num_inference_steps, num_samples, output_type, eta, boundary_margin,
        kernel_iterations, callback_on_step_end_tensor_inputs, mixed_precision=None,
    ) -> None:
        if not isinstance(self.scheduler, ContinuousNoiseLevelScheduler):
            raise TypeError(f"the scheduler must be a ContinuousNoiseLevelScheduler (the denoiser is conditioned on the "
                            f"continuous noise level, not on integer timesteps), got {type(self.scheduler).__name__}")
        channels = self.predictor.config.in_channels
        if measurement.shape[1] not in (1, channels):
            raise ValueError(f"image has {measurement.shape[1]} channels; the model takes {channels} (or 1, grayscale)")
        if not _is_whole(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if not _is_whole(num_samples) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if eta is not None and (not _is_number(eta) or not math.isfinite(float(eta)) or eta < 0):
            raise ValueError(f"eta must be None or a finite number >= 0, got {eta!r}")
        if not _is_whole(boundary_margin) or boundary_margin < 0:
            raise ValueError(f"boundary_margin must be an integer >= 0, got {boundary_margin!r}")
        if not _is_whole(kernel_iterations) or kernel_iterations < 1:
            raise ValueError(f"kernel_iterations must be a positive integer, got {kernel_iterations!r}")
        if min(measurement.shape[-2:]) < 2:
            raise ValueError(f"image must be at least 2x2, got {tuple(measurement.shape[-2:])}")
        try:
            resolve_precision("float32" if mixed_precision is None else mixed_precision)
        except ValueError as error:
            raise ValueError(f"mixed_precision: {error}") from None
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")

    _expand_generator = staticmethod(expand_generator)

    def prepare_latents(self, shape, generator, device, dtype, latents=None) -> torch.Tensor:
        """``z_T ~ N(0, I)`` of ``shape = (B·n, C, H, W)`` (or the given ``latents``)."""
        return prepare_noise(shape, generator, device, dtype, latents)

    # ------------------------------------------------------------------ kernel (optional)
    @torch.no_grad()
    def estimate_kernel(
        self, measurement: torch.Tensor, restored: torch.Tensor, sigma: torch.Tensor, iterations: int = 3
    ) -> torch.Tensor:
        """Kernel from ``y`` and the restored ``x̂`` (both ``(B, C, H, W)`` in ``[0, 1]``) by ``iterations`` M-steps.

        Each round runs the estimator's HQS from the current kernel (a Dirac first) and recentres the
        result (``ops.center_kernel``). Both images are reflect-padded by the kernel size. The least
        squares counts only the pixels of ``y`` whose whole kernel neighbourhood lies in the photograph
        (``ops.valid_mask``), where ``y = k ⊛ x̂`` holds exactly, and is solved on the kernel support
        by conjugate gradients. A photograph smaller than the kernel has no such pixel: then both
        images are multiplied by an edge taper, zero-padded to at least the kernel size where the
        reflection cannot reach it, and the circular Fourier solve is used instead.
        """
        if self.kernel_estimator is None:
            raise ValueError("this pipeline has no kernel_estimator")
        size = self.kernel_estimator.config.kernel_size
        height, width = measurement.shape[-2:]
        margin = min(size, min(height, width) - 1)
        y_pad, window = pad_to_multiple(measurement, 1, margin)
        x_pad, _ = pad_to_multiple(restored, 1, margin)
        options = {}
        if min(height, width) > 2 * (size // 2):
            options["mask"] = valid_mask(y_pad.shape[-2:], window, size, device=y_pad.device)
        else:
            # the taper falls to 0 inside the reflected image; zeros beyond it (up to the kernel size) add no jump
            padded_h, padded_w = y_pad.shape[-2:]
            grid = (max(padded_h, size), max(padded_w, size))
            taper = edge_taper_window(grid, min(size, min(padded_h, padded_w) // 2), device=y_pad.device,
                                      region=(0, 0, padded_h, padded_w))
            extra = (0, grid[1] - padded_w, 0, grid[0] - padded_h)
            y_pad, x_pad = taper * F.pad(y_pad, extra), taper * F.pad(x_pad, extra)
        kernel = dirac_kernel(size, measurement.shape[0], measurement.device)
        for _ in range(iterations):
            kernel = center_kernel(self.kernel_estimator(y_pad, x_pad, sigma, kernel, **options))
        return kernel

    def _prepare_sigma(self, sigma, measurement: torch.Tensor, estimate: bool = True) -> torch.Tensor | None:
        """Noise std per image in ``[0, 1]`` units from 8-bit levels or ``"auto"``; ``estimate=False`` only checks
        ``sigma`` (``"auto"`` then returns ``None``)."""
        if isinstance(sigma, str):
            if sigma != "auto":
                raise ValueError(f"sigma must be a number in 8-bit levels or 'auto', got {sigma!r}")
            return estimate_noise_sigma(measurement).float() if estimate else None
        try:
            values = torch.as_tensor(sigma if torch.is_tensor(sigma) else np.asarray(sigma)).flatten()
        except (TypeError, ValueError, RuntimeError):
            values = None
        if sigma is None or values is None or values.dtype == torch.bool or not (values.is_floating_point() or
                                                                                   values.dtype in INTEGER_DTYPES):
            raise ValueError(f"sigma must be a number in 8-bit levels, one per image, or 'auto'; got {sigma!r}")
        values = values.float()
        if values.numel() not in (1, measurement.shape[0]):
            raise ValueError(f"sigma must be a scalar or one value per image ({measurement.shape[0]}), got {values.numel()}")
        if not torch.isfinite(values).all() or (values < 0).any() or (values > 255).any():
            raise ValueError(f"sigma is in 8-bit levels and must be finite and in [0, 255], got {sigma!r}")
        return (values / 255).expand(measurement.shape[0]).clone().to(measurement.device)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: int | None = None,
        num_samples: int | None = None,
        perception_distortion: float | None = None,
        eta: float | None = None,
        noise_levels: list[float] | None = None,
        boundary_margin: int = 0,
        sigma: float | str = "auto",
        kernel_iterations: int = 3,
        mixed_precision: str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        precision: str | None = None,
    ):
        r"""Deblur ``image`` (PIL, numpy or torch, ``[0, 1]``; RGB or grayscale; any size; a batch).

        Args:
            image: the blurry photograph(s).
            num_inference_steps: length of the noise-level chain (default 10 when ``num_samples`` is given).
            num_samples: samples per image; ``> 1`` averages them (SA) (default 1 when ``num_inference_steps`` is given).
            perception_distortion: one knob in ``[0, 1]`` setting both of the above (``1`` when none of
                ``perception_distortion``, ``num_inference_steps``, ``num_samples``, ``noise_levels`` is given)
                (see :func:`perception_distortion_setting`): ``0`` = 100 steps, 1 sample (sharpest,
                most plausible; the paper's "Ours"), ``0.5`` = 10 steps averaged over 4 samples (the
                paper's "Ours-SA"), ``1`` = 1 step averaged over 16 samples (lowest distortion).
                Cannot be combined with explicit ``num_inference_steps`` /
                ``num_samples``.
            eta: stochasticity of each step (``1`` ancestral DDPM as in the paper, ``0`` deterministic);
                default from the scheduler config.
            noise_levels: an explicit chain ``√ᾱ`` (noisiest first, increasing in ``(0, 1)``) instead of
                ``num_inference_steps``.
            boundary_margin: reflect padding added around the image before the networks (cropped after).
            sigma: noise level in 8-bit levels for the kernel M-step (a number, or one per image as a list,
                array or tensor, in ``[0, 255]``), or ``"auto"`` (estimated); checked always, used only with a
                ``kernel_estimator``.
            kernel_iterations: M-step rounds for the returned kernel.
            mixed_precision: ``"bf16"`` / ``"bfloat16"`` or ``"fp16"`` / ``"float16"`` (``"auto"``: bfloat16 where the
                device computes it natively) runs the two networks
                under ``torch.autocast`` (on a CPU with bf16 matrix units about 2.5× faster); the chain itself
                (``z_t``, ``x_init``, the sum) stays in the pipeline's dtype. ``None``, ``"no"`` or ``"float32"``
                (default): full precision.
            precision: the same setting under the name Fast EM and BlindDPS use (give one of the two).
            generator: ``torch.Generator`` or a list of one per image (every sample of image ``b`` draws from it).
            latents: optional ``z_T`` of shape ``(B·n, C, H', W')`` (padded size).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a [`StochasticRefinementDeblurPipelineOutput`] instead of a tuple.
            callback_on_step_end: ``fn(pipe, step, timestep, tensors) -> dict`` after each step; may replace ``latents``.
            callback_on_step_end_tensor_inputs: tensors given to the callback (``latents``, ``x_init``,
                ``pred_original_sample``).

        Examples:

        Returns:
            [`StochasticRefinementDeblurPipelineOutput`] or ``(images, kernels, uncertainty)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = []
        if precision is not None:
            if mixed_precision is not None:
                raise ValueError("give either precision or mixed_precision (the same setting), not both")
            resolve_precision(precision)  # refused under the name the caller used
            mixed_precision = precision
        # 1. Resolve the perception-distortion setting
        if perception_distortion is not None and (num_inference_steps is not None or num_samples is not None):
            raise ValueError("give either perception_distortion or num_inference_steps/num_samples, not both")
        if noise_levels is not None and (num_inference_steps is not None or perception_distortion is not None):
            raise ValueError("noise_levels replaces num_inference_steps and perception_distortion")
        if perception_distortion is None and num_inference_steps is None and num_samples is None and noise_levels is None:
            perception_distortion = 1.0
        if perception_distortion is not None:
            num_inference_steps, num_samples = perception_distortion_setting(perception_distortion)
        if noise_levels is not None:
            if isinstance(noise_levels, (str, bytes)) or not hasattr(noise_levels, "__len__") or len(noise_levels) == 0:
                raise ValueError(f"noise_levels must be a non-empty sequence of levels in (0, 1), got {noise_levels!r}")
            num_inference_steps = len(noise_levels)
        num_inference_steps = DEFAULT_STEPS if num_inference_steps is None else num_inference_steps
        num_samples = 1 if num_samples is None else num_samples

        # 2. Inputs
        measurement = to_tensor(image)
        self.check_inputs(measurement, num_inference_steps, num_samples, output_type, eta, boundary_margin,
                          kernel_iterations, callback_on_step_end_tensor_inputs, mixed_precision)
        device = self._device()
        dtype = self.denoiser.dtype
        batch, n = measurement.shape[0], int(num_samples)
        measurement = measurement.to(device)
        sigma_t = self._prepare_sigma(sigma, measurement, estimate=self.kernel_estimator is not None)  # checked first
        grayscale = measurement.shape[1] == 1 and self.predictor.config.in_channels != 1
        rgb = measurement.expand(-1, self.predictor.config.in_channels, -1, -1) if grayscale else measurement
        padded, window = pad_to_multiple(rgb, self.pad_multiple, int(boundary_margin))
        y = (padded * 2 - 1).to(dtype)

        # 3. Initial prediction x_init = g(y); both networks get channels-last inputs (faster convolutions)
        y = y.contiguous(memory_format=torch.channels_last)
        autocast_dtype = resolve_precision("float32" if mixed_precision is None else mixed_precision, device)

        def networks():
            if autocast_dtype is None:
                return contextlib.nullcontext()
            return torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)

        with networks():
            x_init = self.predictor(y.to(self.predictor.dtype))
        x_init = x_init.to(dtype)

        # 4. Noise-level chain and z_T
        if noise_levels is not None:
            self.scheduler.set_timesteps(sqrt_alphas_cumprod=noise_levels, device=device)
        else:
            self.scheduler.set_timesteps(int(num_inference_steps), device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        generator = self._expand_generator(generator, batch, n)
        y_rep = y.repeat_interleave(n, dim=0)
        x_init_rep = x_init.repeat_interleave(n, dim=0)
        z = self.prepare_latents(y_rep.shape, generator, device, dtype, latents)
        pred_original = torch.zeros_like(z)
        # the denoiser's input [z_t, y]: y is written once, z_t at each step
        model_input = torch.cat([z, y_rep], dim=1).contiguous(memory_format=torch.channels_last)
        channels = z.shape[1]

        # 5. Reverse diffusion on the residual (Alg. 1)
        step_kwargs = {} if eta is None else {"eta": float(eta)}
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                model_input[:, :channels] = z
                with networks():
                    output = self.denoiser(model_input, t.to(dtype).expand(z.shape[0])).sample
                output = output.to(dtype)
                z, pred_original = self.scheduler.step(output, t, z, generator=generator, return_dict=False, **step_kwargs)
                if callback_on_step_end is not None:
                    available = {"latents": z, "x_init": x_init_rep, "pred_original_sample": pred_original}
                    callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                    outputs = callback_outputs(callback_on_step_end(self, i, t, callback_kwargs))
                    z = callback_replacement(outputs, "latents", z)
                progress_bar.update()
        self.maybe_free_model_hooks()
        restored = x_init_rep + self.config.residual_scale * z  # x̂ = x_init + s·z_0, in [-1, 1]

        # 6. Outputs: crop, average the samples, optional kernel
        if output_type == "latent" and self.kernel_estimator is None:
            if not return_dict:
                return restored, None, None
            return StochasticRefinementDeblurPipelineOutput(images=restored, x_init=x_init)
        samples = crop_window(((restored.float() + 1) / 2).clamp(0, 1), window)
        init = crop_window(((x_init.float() + 1) / 2).clamp(0, 1), window)
        if not torch.isfinite(samples).all():
            raise RuntimeError("the sampler produced non-finite values; check the model weights and the noise levels")
        if grayscale:
            samples, init = samples.mean(1, keepdim=True), init.mean(1, keepdim=True)
        samples = samples.reshape(batch, n, *samples.shape[1:])
        mean = samples.mean(1)
        std = samples.std(1, unbiased=False).mean(1, keepdim=True) if n > 1 else None
        kernels, sigma_255 = None, None
        if self.kernel_estimator is not None:
            kernels = self.estimate_kernel(measurement.float(), mean, sigma_t, int(kernel_iterations))
            sigma_255 = (sigma_t * 255).cpu().tolist()
        if output_type == "latent":  # the raw samples, with the kernel as a (B, 1, k, k) tensor (as "pt")
            if not return_dict:
                return restored, kernels, None
            return StochasticRefinementDeblurPipelineOutput(images=restored, kernels=kernels, sigma=sigma_255,
                                                            x_init=x_init)
        images, x_init_out = tensor_to_output(mean, output_type), tensor_to_output(init, output_type)
        if output_type == "pt":
            samples_out = samples.cpu()
            uncertainty = std.cpu() if std is not None else None
            kernels = kernels.cpu() if kernels is not None else None
        else:
            samples_out = samples.permute(0, 1, 3, 4, 2).cpu().numpy()
            uncertainty = std[:, 0].cpu().numpy() if std is not None else None
            kernels = kernels[:, 0].cpu().numpy() if kernels is not None else None
        if not return_dict:
            return images, kernels, uncertainty
        return StochasticRefinementDeblurPipelineOutput(
            images=images, kernels=kernels, uncertainty=uncertainty, particles=samples_out, sigma=sigma_255, x_init=x_init_out
        )
