"""Fast Diffusion EM for blind deblurring (Laroche, Almansa, Coupete, WACV 2024), Algorithm 2."""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import BaseOutput, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ...image_processor import ImageInput, crop_window, pad_to_multiple, tensor_to_output, to_tensor
from ...models.kernel_estimator import KernelEstimator
from ...ops.blur import edge_taper_window
from ...ops.guidance import dps_residual_norm, pigdm_guidance
from ...ops.kernels import center_kernel, dirac_kernel
from ...ops.noise import AUTO_SIGMA_FLOOR, estimate_noise_sigma


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import diffusers_blind
        >>> from diffusers_blind import FastEMDeblurPipeline
        >>> from PIL import Image

        >>> pipe = FastEMDeblurPipeline.from_pretrained(diffusers_blind.DEFAULT_MODEL)
        >>> blurry = Image.open("blurry.png")
        >>> out = pipe(blurry, sigma=10, num_inference_steps=100, generator=torch.manual_seed(0))
        >>> out.images[0].save("restored.png")
        >>> out.kernels.shape  # the estimated blur kernel(s)
        (1, 33, 33)
        ```
"""

GUIDANCES = ("pigdm", "dps")
R_SCHEDULES = ("fastem", "pigdm")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class FastEMDeblurPipelineOutput(BaseOutput):
    """Output of [`FastEMDeblurPipeline`].

    Args:
        images: restored images, one per input (the mean over particles): a list of PIL images,
            a ``(B, H, W, C)`` array (``"np"``) or a ``(B, C, H, W)`` tensor (``"pt"``); for
            ``"latent"`` the raw final diffusion state ``(B·n, C, H', W')`` in ``[-1, 1]``.
        kernels: the estimated (or given) kernels, ``(B, k, k)`` array, or ``(B, 1, k, k)`` tensor for ``"pt"``.
        uncertainty: per-pixel standard deviation across particles, ``(B, H, W)`` (``(B, 1, H, W)`` for
            ``"pt"``), or ``None`` with a single particle.
        particles: every particle, ``(B, n, H, W, C)`` array (``(B, n, C, H, W)`` tensor for ``"pt"``).
        sigma: the noise level used per image, in 8-bit levels (estimated when ``sigma="auto"``).
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    kernels: np.ndarray | torch.Tensor
    uncertainty: np.ndarray | torch.Tensor | None = None
    particles: np.ndarray | torch.Tensor | None = None
    sigma: list[float] | None = None


class FastEMDeblurPipeline(DiffusionPipeline):
    r"""Blind deblurring by Fast Diffusion EM: one M-step (kernel) per diffusion step (E-step).

    Each step follows Algorithm 2 of the paper: UNet → x̂0 → M-step (``kernel_estimator``) →
    recentre the kernel → likelihood guidance (Pi-GDM, Eq. 17, or DPS, Eq. 16) → ``x_{t-1}``.
    With a known ``kernel`` the M-step is skipped (the non-blind Pi-GDM / DPS baselines); with
    ``em_iterations=N`` the slower Diffusion EM (Alg. A.1) alternates N full runs and N M-steps.

    The degradation model is the circular convolution ``y = k ⊛ x + n`` (``ops.fft_blur``) on
    images in ``[0, 1]``; the UNet works in ``[-1, 1]``.

    Args:
        unet ([`UNet2DModel`]): epsilon-prediction image prior; 3 or 6 (learned variance) output channels.
        scheduler ([`DDPMScheduler`] or [`DDIMScheduler`]): the reverse process. Use
            ``timestep_spacing="linspace"`` to reproduce the reference 100-step respacing.
        kernel_estimator ([`KernelEstimator`], *optional*): the M-step; needed for blind runs.
        guidance_scale (`float`): default multiplier of the reference step size ``ζ_t = √ᾱ_t`` (1 = the
            paper); saved in ``model_index.json`` so a shipped prior can carry its tuned value.
    """

    model_cpu_offload_seq = "unet"
    _optional_components = ["kernel_estimator"]
    _callback_tensor_inputs = ["latents", "kernel", "x0"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: DDPMScheduler | DDIMScheduler,
        kernel_estimator: KernelEstimator | None = None,
        guidance_scale: float = 1.0,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, kernel_estimator=kernel_estimator)
        self.register_to_config(guidance_scale=guidance_scale)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ inputs
    def check_inputs(
        self,
        measurement: torch.Tensor,
        kernel,
        kernel_size: int,
        guidance: str,
        num_inference_steps: int,
        num_particles: int,
        em_iterations: int | None,
        output_type: str,
        r_schedule: str,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> None:
        if guidance not in GUIDANCES:
            raise ValueError(f"guidance must be one of {GUIDANCES}, got {guidance!r}")
        if r_schedule not in R_SCHEDULES:
            raise ValueError(f"r_schedule must be one of {R_SCHEDULES}, got {r_schedule!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        if em_iterations is not None and (not isinstance(em_iterations, int) or em_iterations < 1):
            raise ValueError(f"em_iterations must be None or a positive int, got {em_iterations!r}")
        if kernel is None and self.kernel_estimator is None:
            raise ValueError("Blind deblurring needs a kernel_estimator; pass one or give the true `kernel`.")
        if em_iterations is not None and kernel is not None:
            raise ValueError("em_iterations (Diffusion EM) estimates the kernel: do not pass `kernel` too.")
        if not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        height, width = measurement.shape[-2:]
        if kernel_size > height or kernel_size > width:
            raise ValueError(f"kernel_size {kernel_size} is larger than the image ({height}x{width})")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}"
            )
        unet_channels = self.unet.config.in_channels
        if measurement.shape[1] != unet_channels and not (measurement.shape[1] == 1 and unet_channels == 3):
            raise ValueError(f"image has {measurement.shape[1]} channels but the UNet expects {unet_channels}")

    def prepare_sigma(self, sigma, measurement: torch.Tensor) -> torch.Tensor:
        """Noise std per image in ``[0, 1]`` units from 8-bit levels (``10`` → 10/255) or ``"auto"``."""
        batch = measurement.shape[0]
        if sigma is None:
            raise ValueError("sigma (the noise std in 8-bit levels, e.g. 10) is required; pass a number or 'auto'")
        if isinstance(sigma, str):
            if sigma != "auto":
                raise ValueError(f"sigma must be a number in 8-bit levels or 'auto', got {sigma!r}")
            return estimate_noise_sigma(measurement, floor=AUTO_SIGMA_FLOOR).to(torch.float32)
        values = torch.as_tensor(sigma, dtype=torch.float32).flatten().cpu()
        if values.numel() not in (1, batch):
            raise ValueError(f"sigma must be a scalar or one value per image ({batch}), got {values.numel()}")
        if not torch.isfinite(values).all() or (values < 0).any() or (values > 255).any():
            raise ValueError(f"sigma is in 8-bit levels and must be finite and in [0, 255], got {sigma!r}")
        return (values / 255.0).expand(batch).clone().to(measurement.device)

    def prepare_kernel(self, kernel, batch: int, device, dtype=torch.float32) -> torch.Tensor:
        """A user kernel (``(k, k)``, ``(1|B, 1, k, k)``, numpy or torch) as a ``(B, 1, k, k)`` tensor."""
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
        if ((sums - 1).abs() > 1e-2).any():
            warnings.warn("kernel does not sum to 1; it is used as given (the blur then also scales the image)")
        return kernel.expand(batch, -1, -1, -1)

    def prepare_latents(self, shape, generator, device, dtype, latents=None) -> torch.Tensor:
        """``x_T ~ N(0, I)`` of ``shape = (B·n, C, H, W)``; a list of ``B`` generators seeds each image's particles."""
        if latents is not None:
            if tuple(latents.shape) != tuple(shape):
                raise ValueError(f"latents must have shape {tuple(shape)}, got {tuple(latents.shape)}")
            return latents.to(device=device, dtype=dtype)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    @staticmethod
    def _expand_generator(generator, batch: int, num_particles: int):
        """Repeat a per-image generator list so that every particle of image ``b`` draws from ``generator[b]``."""
        if not isinstance(generator, list):
            return generator
        if len(generator) == batch * num_particles:
            return generator
        if len(generator) != batch:
            raise ValueError(f"generator list has {len(generator)} entries; expected {batch} or {batch * num_particles}")
        return [g for g in generator for _ in range(num_particles)]

    # ------------------------------------------------------------------ schedule helpers
    def _previous_alpha_bar(self, step_index: int, timesteps: torch.Tensor) -> float:
        if step_index + 1 < len(timesteps):
            return float(self.scheduler.alphas_cumprod[int(timesteps[step_index + 1])])
        return float(getattr(self.scheduler, "final_alpha_cumprod", torch.tensor(1.0)))

    def guidance_coefficients(self, step_index: int, timesteps: torch.Tensor, r_schedule: str):
        """``(√ᾱ_t, r_t², v_t)`` for the Pi-GDM update (algorithms.md §1.2).

        ``v_t = β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_{t−1})`` on the respaced chain; ``r_t² = v/(1+v)``
        (``"fastem"``, the reference code) or ``1 − ᾱ_t`` (``"pigdm"``, the Pi-GDM paper).
        """
        alpha_bar = float(self.scheduler.alphas_cumprod[int(timesteps[step_index])])
        alpha_bar_prev = self._previous_alpha_bar(step_index, timesteps)
        v = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
        r2 = v / (1 + v) if r_schedule == "fastem" else 1 - alpha_bar
        return math.sqrt(alpha_bar), r2, v

    def _prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        params = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "generator" in params:
            kwargs["generator"] = generator
        if "eta" in params:
            kwargs["eta"] = eta
        return kwargs

    def _epsilon(self, latents: torch.Tensor, t) -> torch.Tensor:
        """UNet prediction, keeping the variance channels only for a learned-variance DDPM scheduler."""
        model_input = self.scheduler.scale_model_input(latents, t) if hasattr(self.scheduler, "scale_model_input") else latents
        output = self.unet(model_input, t).sample
        learned = getattr(self.scheduler.config, "variance_type", None) in ("learned", "learned_range")
        if output.shape[1] == 2 * latents.shape[1] and not learned:
            output = output[:, : latents.shape[1]]
        return output

    # ------------------------------------------------------------------ one reverse run
    def _reverse_diffusion(
        self,
        latents: torch.Tensor,
        measurement: torch.Tensor,
        sigma: torch.Tensor,
        kernel: torch.Tensor,
        estimate_kernel: bool,
        guidance: str,
        guidance_scale: float,
        r_schedule: str,
        num_particles: int,
        extra_step_kwargs: dict,
        progress_bar,
        step_offset: int,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs: list[str],
        taper_window: torch.Tensor,
    ):
        """One full reverse diffusion with guidance; the kernel is re-estimated each step when ``estimate_kernel``."""
        timesteps = self.scheduler.timesteps
        measurement_p = measurement.repeat_interleave(num_particles, dim=0)
        sigma_p = sigma.repeat_interleave(num_particles)
        tapered_measurement = taper_window * measurement  # what the M-step sees, fixed for the whole run
        x0 = None
        for i, t in enumerate(timesteps):
            if self.interrupt:
                continue
            sqrt_alpha_bar, r2, v = self.guidance_coefficients(i, timesteps, r_schedule)
            zeta = guidance_scale * sqrt_alpha_bar
            with torch.enable_grad():
                x_t = latents.detach().requires_grad_(True)
                epsilon = self._epsilon(x_t, t)
                step = self.scheduler.step(epsilon, t, x_t, **extra_step_kwargs, return_dict=True)
                x0 = ((step.pred_original_sample.float() + 1) / 2).clamp(0, 1)  # x̂0 in [0, 1]

                if estimate_kernel:  # M-step (Eqs. 24-25) then recentre (§4.2)
                    kernel = self.kernel_estimator(tapered_measurement, taper_window * x0.detach(), sigma, kernel, r=math.sqrt(r2))
                    kernel = center_kernel(kernel)
                kernel_p = kernel.repeat_interleave(num_particles, dim=0)

                if guidance == "pigdm":  # Eq. 17: x_{t-1} = x'_{t-1} + ζ_t r_t² √(1/(1+v)) ∇ (G·x̂0)
                    factor = zeta * r2 * math.sqrt(1 / (1 + v))
                    if factor > 0:
                        vector = pigdm_guidance(measurement_p, x0, kernel_p, sigma_p, math.sqrt(r2)).detach()
                        grad = torch.autograd.grad((vector * x0).sum(), x_t)[0]
                        latents = step.prev_sample + factor * grad
                    else:
                        latents = step.prev_sample
                else:  # Eq. 16 (DPS): x_{t-1} = x'_{t-1} − ζ_t ∇ ‖y − k ⊛ x̂0‖, the norm in [-1, 1] units
                    # (2× the [0, 1] norm), the range DPS tuned ζ_t for; both y and x̂0 stay in [0, 1]
                    # (the reference Fast EM DPS path compares a [-1, 1] x̂0 with a [0, 1] y).
                    norm = 2 * dps_residual_norm(measurement_p, x0, kernel_p).sum()
                    grad = torch.autograd.grad(norm, x_t)[0]
                    latents = step.prev_sample - zeta * grad
            latents = latents.detach()
            x0 = x0.detach()

            if callback_on_step_end is not None:
                available = {"latents": latents, "kernel": kernel, "x0": x0}
                callback_kwargs = {name: available[name] for name in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, step_offset + i, t, callback_kwargs)
                latents = callback_outputs.pop("latents", latents)
                kernel = callback_outputs.pop("kernel", kernel)
            progress_bar.update()
        return latents, kernel

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: ImageInput,
        sigma: float | str | list[float] | torch.Tensor = 10.0,
        kernel: torch.Tensor | np.ndarray | None = None,
        num_inference_steps: int = 100,
        guidance: str = "pigdm",
        guidance_scale: float | None = None,
        kernel_size: int | None = None,
        num_particles: int = 1,
        em_iterations: int | None = None,
        r_schedule: str = "fastem",
        boundary_margin: int | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
    ):
        r"""Deblur ``image`` and estimate its blur kernel.

        Args:
            image: blurry image(s): PIL, numpy ``(H, W[, C])``/``(B, H, W, C)`` or torch ``(C, H, W)``/``(B, C, H, W)``,
                values in ``[0, 1]`` (uint8 is rescaled); RGB or grayscale; any ``H × W``.
            sigma: noise std in **8-bit levels** (``10`` means 10/255), one per image, or ``"auto"`` to estimate it.
            kernel: the true kernel for the non-blind Pi-GDM / DPS baselines; ``None`` for blind deblurring.
            num_inference_steps: diffusion steps (100 for Pi-GDM in the paper, 1000 for DPS).
            guidance: ``"pigdm"`` (Fourier closed form, Eq. 17) or ``"dps"`` (Eq. 16).
            guidance_scale: multiplier of the reference step size ``ζ_t = √ᾱ_t`` (default: the pipeline's
                ``config.guidance_scale``; 1 is the paper's step).
            kernel_size: size of the estimated kernel (default: the estimator's ``kernel_size``).
            num_particles: ``n`` posterior samples per image, run as a batch sharing one kernel.
            em_iterations: if set, Diffusion EM (Alg. A.1): this many full runs, one M-step after each.
            r_schedule: ``"fastem"`` (``r_t² = β̃_t/(1+β̃_t)``, the reference code) or ``"pigdm"`` (``1 − ᾱ_t``).
            boundary_margin: pixels of reflection padding added around the image before the circular FFT
                model, removed at the end (default ``kernel_size``; use 0 for data blurred circularly).
                With a margin, the M-step also sees both images through a ``kernel_size``-wide edge taper.
            eta: DDIM's ``η`` (ignored by DDPM).
            generator: a ``torch.Generator``, or a list with one per image (or per particle) for reproducibility.
            latents: the initial noise ``x_T``, ``(B·n, C, H', W')`` on the padded grid.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a [`FastEMDeblurPipelineOutput`] instead of a tuple.
            callback_on_step_end: called after each step as ``fn(pipe, step, timestep, tensors)``; may return
                replacements for ``latents`` and ``kernel``.
            callback_on_step_end_tensor_inputs: which of ``latents``, ``kernel``, ``x0`` the callback receives.

        Examples:

        Returns:
            [`FastEMDeblurPipelineOutput`] or ``(images, kernels, uncertainty)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        device = self._execution_device
        measurement = to_tensor(image)
        grayscale = measurement.shape[1] == 1 and self.unet.config.in_channels == 3
        if kernel_size is None:
            if kernel is not None:
                kernel_size = int(np.shape(kernel)[-1])
            else:
                kernel_size = self.kernel_estimator.config.kernel_size if self.kernel_estimator is not None else 33
        self.check_inputs(
            measurement, kernel, kernel_size, guidance, num_inference_steps, num_particles, em_iterations,
            output_type, r_schedule, callback_on_step_end_tensor_inputs,
        )
        batch = measurement.shape[0]
        measurement = measurement.to(device)
        if grayscale:
            measurement = measurement.expand(-1, 3, -1, -1)
        sigma = self.prepare_sigma(sigma, measurement).to(device)
        guidance_scale = float(self.config.guidance_scale if guidance_scale is None else guidance_scale)
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale}")

        # Pad (reflect) so that FFT wrap-around falls in a margin that is cropped away, and to the UNet multiple.
        margin = kernel_size if boundary_margin is None else int(boundary_margin)
        multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)
        padded, window = pad_to_multiple(measurement, multiple, margin)

        # The M-step sees measurement and estimate through an edge taper, so that the border of a
        # non-periodic photograph does not enter the Fourier kernel estimate (none when margin = 0).
        taper = min(kernel_size, min(padded.shape[-2:]) // 2) if margin > 0 else 0
        taper_window = edge_taper_window(padded.shape[-2:], taper, device=device)

        estimate_kernel = kernel is None
        if estimate_kernel:
            kernel = dirac_kernel(kernel_size, batch, device)
        else:
            kernel = self.prepare_kernel(kernel, batch, device)
            if kernel.shape[-1] > padded.shape[-1] or kernel.shape[-2] > padded.shape[-2]:
                raise ValueError(f"kernel {tuple(kernel.shape[-2:])} is larger than the image")

        generator = self._expand_generator(generator, batch, num_particles)
        shape = (batch * num_particles, self.unet.config.in_channels, *padded.shape[-2:])
        extra_step_kwargs = self._prepare_extra_step_kwargs(generator, eta)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        runs = em_iterations or 1
        self._num_timesteps = len(self.scheduler.timesteps) * runs
        self._interrupt = False

        with self.progress_bar(total=self._num_timesteps) as progress_bar:
            for run in range(runs):
                run_latents = self.prepare_latents(shape, generator, device, self.unet.dtype, latents if run == 0 else None)
                run_latents, kernel = self._reverse_diffusion(
                    run_latents, padded, sigma, kernel, estimate_kernel and em_iterations is None, guidance,
                    guidance_scale, r_schedule, num_particles, extra_step_kwargs, progress_bar,
                    run * len(self.scheduler.timesteps), callback_on_step_end, callback_on_step_end_tensor_inputs,
                    taper_window,
                )
                if em_iterations is not None:  # Diffusion EM: M-step on the final samples (Alg. A.1)
                    final = ((run_latents.float() + 1) / 2).clamp(0, 1)
                    kernel = center_kernel(self.kernel_estimator(taper_window * padded, taper_window * final, sigma, kernel))
        self.maybe_free_model_hooks()

        if output_type == "latent":
            images, kernels, uncertainty, particles = run_latents, kernel, None, None
        else:
            samples = crop_window(((run_latents.float() + 1) / 2).clamp(0, 1), window)
            if not torch.isfinite(samples).all():
                raise RuntimeError("The sampler diverged (non-finite values): lower guidance_scale or check sigma.")
            if grayscale:
                samples = samples.mean(1, keepdim=True)
            samples = samples.reshape(batch, num_particles, *samples.shape[1:])
            mean = samples.mean(1)
            std = samples.std(1, unbiased=False).mean(1, keepdim=True) if num_particles > 1 else None
            images = tensor_to_output(mean, output_type)
            if output_type == "pt":
                kernels, uncertainty, particles = kernel.detach().cpu(), std.cpu() if std is not None else None, samples.cpu()
            else:
                kernels = kernel.detach().float().cpu()[:, 0].numpy()
                uncertainty = std[:, 0].cpu().numpy() if std is not None else None
                particles = samples.permute(0, 1, 3, 4, 2).cpu().numpy()
        sigma_255 = (sigma * 255).cpu().tolist()
        if not return_dict:
            return images, kernels, uncertainty
        return FastEMDeblurPipelineOutput(
            images=images, kernels=kernels, uncertainty=uncertainty, particles=particles, sigma=sigma_255
        )
