"""Fast Diffusion EM for blind deblurring (Laroche, Almansa, Coupete, WACV 2024), Algorithm 2."""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging, replace_example_docstring

from ...image_processor import DeblurImageProcessor, ImageInput
from ...kernel_init import SparseKernelInitializer
from ...models.kernel_estimator import KernelEstimator
from ...ops.blur import edge_taper_window, photograph_window
from ...ops.guidance import dps_joint_gradient, pigdm_guidance
from ...ops.kernels import center_kernel, dirac_kernel, kernel_extent, project_kernel, rescale_kernel
from ...ops.fit import contrast_gain, midtone_saturation, reblur_fit
from ..hub import HubPipelineMixin
from ..pipeline_utils import (LOW_AUTO_SIGMA, DeblurPipelineOutput, UNetDenoiser, callback_outputs, callback_replacement,
                             check_scheduler, expand_generator, prepare_kernel, prepare_noise, prepare_sigma,
                             to_unit_range)
from ...models.windowed_attention import attention_window_setting, resolve_attention_window
from ..tiling import make_denoiser, resolve_precision


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
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

logger = logging.get_logger(__name__)

GUIDANCES = ("pigdm", "dps", "diffpir")
R_SCHEDULES = ("fastem", "pigdm")
DIFFPIR_GUIDANCE_SCALE = 0.5  # default weight of DiffPIR's data step (128² tuning crops, σ 10; docs/scale.md)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
GRID_HINT = ("; the padded grid (FFT-friendly sides) is what pipe.image_processor.pad(image, margin) builds, "
             "margin = kernel_size unless boundary_margin is given")
GUARD_FIT_LIMIT = 4.0  # re-blur residual (in noise variances) a blind result may always have
# a blind result that saturates more than this share of the photo's mid-tones AND spreads its values more
# than GUARD_CONTRAST_LIMIT times the photo's collapsed into stripes (684 true sharp/blurry pairs: at most
# 0.048 and 5.2, never above 0.044 and 2.61 together; docs/kernel_estimation.md, "The guard's collapse test")
GUARD_SATURATION_LIMIT = 0.1
GUARD_CONTRAST_LIMIT = 2.5
KERNEL_SIZE_CANDIDATES = (9, 15, 23, 33, 45, 63)  # the sizes kernel_size="auto" chooses among
KERNEL_SIZE_LEVEL = 0.1  # "auto": kernel pixels >= 10 % of the peak count as the blur's extent
KERNEL_SIZE_MARGIN = 2  # "auto": pixels added to the measured extent before rounding up to a candidate
MIN_COARSE_KERNEL = 9  # below this a kernel is too small to gain from a coarser scale
MIN_COARSE_IMAGE = 32  # smallest side of a coarse image
# with num_scales=2, the share of the schedule the full-size level replays after the coarse one (docs/scale.md)
DEFAULT_REFINE_STRENGTH = 0.3
KERNEL_INITS = ("sparse", "dirac")  # how a blind run starts its kernel
BLIND_SIGMA_FLOOR = 5.0  # 8-bit levels: a blind run's noise level is at least this (docs/kernel_estimation.md)
# CG iterations of Pi-GDM's valid-blur solve (docs/conventions.md, "Boundary handling of the pipeline")
MASKED_GUIDANCE_ITERATIONS = 5  # PCG iterations of the valid-blur Pi-GDM solve (window-restricted preconditioner)
MASKED_KERNEL_ITERATIONS = 5  # PCG iterations per HQS step of the M-step under the photograph's mask
DEFAULT_STEPS = 50  # DDPM steps of a call; with the shipped guidance_scale 4.5 as good as 100 (docs/scale.md)
KERNEL_ANCHOR = 1.2  # default ρ of the M-step's pull ρσ²P‖k − k_start‖² toward the start kernel (P: pixels)


@dataclass
class FastEMDeblurPipelineOutput(DeblurPipelineOutput):
    """Output of [`FastEMDeblurPipeline`]: a [`DeblurPipelineOutput`] whose ``kernels`` are always set.

    Args:
        images: restored images, one per input (the mean over particles): a list of PIL images,
            a ``(B, H, W, C)`` array (``"np"``) or a ``(B, C, H, W)`` tensor (``"pt"``); for
            ``"latent"`` the raw final diffusion state ``(B·n, C, H', W')`` in ``[-1, 1]``.
        kernels: the estimated (or given) kernels, ``(B, k, k)`` array, or ``(B, 1, k, k)`` tensor for ``"pt"``.
        uncertainty: per-pixel standard deviation across particles, ``(B, H, W)`` (``(B, 1, H, W)`` for
            ``"pt"``), or ``None`` with a single particle.
        particles: every particle, ``(B, n, H, W, C)`` array (``(B, n, C, H, W)`` tensor for ``"pt"``).
        sigma: the noise level used per image, in 8-bit levels (estimated when ``sigma="auto"``).
        fit: blind runs: the re-blur residual ``mean (y − k̂ ⊛ x̂)² / σ²`` per image (about 1 when the estimate
            explains the photo), else ``None``.
        fallback: blind runs: per image, whether the guard returned the input instead of a failed estimate.
    """

    fit: list[float] | None = None
    fallback: list[bool] | None = None


@dataclass
class FastEMProblem:
    """What one call compares its estimates with; fixed during a reverse diffusion.

    Args:
        measurement: the padded blurry images ``y``, ``(B, C, H, W)`` in ``[0, 1]``.
        sigma: noise std per image in ``[0, 1]`` units, ``(B,)``.
        taper_window: ``(1, 1, H, W)`` edge taper applied to both images before the M-step.
        num_particles: ``n`` samples per image; particle ``j`` of image ``b`` is row ``b·n + j``.
        guidance: ``"pigdm"``, ``"dps"`` or ``"diffpir"``.
        r_schedule: ``"fastem"`` or ``"pigdm"`` (see :meth:`FastEMDeblurPipeline.guidance_coefficients`).
        estimate_kernel: run the M-step at every diffusion step (Fast EM); ``False`` for a known kernel
            and inside the runs of Diffusion EM.
        observed: ``(1, 1, H, W)`` 0/1 mask of the photograph on the padded grid: the E-step's data term
            counts only these pixels (a valid convolution); ``None`` counts the whole padded grid.
        m_step_from: index of the first diffusion step that runs the M-step (earlier steps keep the
            initial kernel).
        anchor: the kernel the M-step is pulled toward (the blind run's start kernel), ``(B, 1, k, k)``, or ``None``.
        anchor_weight: ``γ`` of the M-step's ``γσ²‖k − anchor‖²`` term (see :class:`KernelEstimator`): ``kernel_anchor``
            times the photograph's pixel count.
        dps_step_factor: ``T / N`` (training steps over inference steps): DPS's step grows with the respacing.
        guidance_iterations: conjugate-gradient iterations of Pi-GDM's solve under the ``observed`` mask
            (0: the circulant inverse alone, an approximation that fails at low noise).
        kernel_cg_iterations: preconditioned conjugate-gradient iterations per HQS step of the M-step's least
            squares under the ``observed`` mask (0: both images through ``taper_window`` and the full-grid
            Fourier solve, an approximation whose window edges bend the kernel into a cross).
    """

    measurement: torch.Tensor
    sigma: torch.Tensor
    taper_window: torch.Tensor
    num_particles: int
    guidance: str
    r_schedule: str
    estimate_kernel: bool
    observed: torch.Tensor | None = None
    m_step_from: int = 0
    anchor: torch.Tensor | None = None
    anchor_weight: float = 0.0
    dps_step_factor: float = 1.0
    guidance_iterations: int = 0
    kernel_cg_iterations: int = 0
    measurement_per_particle: torch.Tensor = field(init=False, repr=False)
    sigma_per_particle: torch.Tensor = field(init=False, repr=False)
    tapered_measurement: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.measurement_per_particle = self.measurement.repeat_interleave(self.num_particles, dim=0)
        self.sigma_per_particle = self.sigma.repeat_interleave(self.num_particles)
        self.tapered_measurement = self.taper_window * self.measurement  # what the M-step sees


@dataclass
class FastEMState:
    """What the reverse diffusion carries from one step to the next.

    Args:
        latents: ``x_t``, ``(B·n, C, H, W)`` in the UNet's ``[-1, 1]`` range.
        kernel: the current kernel, ``(B, 1, k, k)`` (shared by the particles of an image).
        x0: the last ``x̂0`` in ``[0, 1]``, or ``None`` before the first step.
    """

    latents: torch.Tensor
    kernel: torch.Tensor
    x0: torch.Tensor | None = None


def _check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def check_coarse_to_fine(num_scales, refine_strength, strength=1.0) -> None:
    """Clear errors for the coarse-to-fine and img2img arguments of [`FastEMDeblurPipeline.__call__`]."""
    if isinstance(num_scales, bool) or not isinstance(num_scales, int) or not 1 <= num_scales <= 8:
        raise ValueError(f"num_scales must be an int in [1, 8], got {num_scales!r}")
    _check_fraction("refine_strength", refine_strength)
    _check_fraction("strength", strength)


class FastEMDeblurPipeline(HubPipelineMixin, DiffusionPipeline):
    r"""Blind deblurring by Fast Diffusion EM: one M-step (kernel) per diffusion step (E-step).

    Each step follows Algorithm 2 of the paper: UNet → x̂0 → M-step (``kernel_estimator``) →
    recentre the kernel → likelihood guidance (Pi-GDM, Eq. 17, or DPS, Eq. 16) → ``x_{t-1}``.
    With a known ``kernel`` the M-step is skipped (the non-blind Pi-GDM / DPS baselines); with
    ``em_iterations=N`` the slower Diffusion EM (Alg. A.1) alternates N full runs and N M-steps.

    The degradation model is the circular convolution ``y = k ⊛ x + n`` (``ops.fft_blur``) on
    images in ``[0, 1]``; the UNet works in ``[-1, 1]`` (docs/conventions.md).

    Args:
        unet ([`UNet2DModel`]): epsilon-prediction image prior; 3 or 6 (learned variance) output channels.
        scheduler ([`DDPMScheduler`] or [`DDIMScheduler`]): the reverse process. Use
            ``timestep_spacing="linspace"`` to reproduce the reference 100-step respacing.
        kernel_estimator ([`KernelEstimator`], *optional*): the M-step; needed for blind runs.
        guidance_scale (`float`): default multiplier of the reference step size ``ζ_t = √ᾱ_t`` (1 = the
            paper); saved in ``model_index.json`` so a shipped prior can carry its tuned value. During a
            call, the property ``pipe.guidance_scale`` is the value of that call; a step-end callback may
            change it by setting ``pipe._guidance_scale``.
        dps_guidance_scale (`float`, *optional*): the default for ``guidance="dps"`` (DPS needs another scale
            than Pi-GDM); ``None`` uses ``guidance_scale`` for both.
        diffpir_guidance_scale (`float`, *optional*): the default for ``guidance="diffpir"``, the weight ``s`` of
            its data step (:meth:`proximal_x0`); ``None`` uses ``DIFFPIR_GUIDANCE_SCALE``.
        attention_window (`int`, `"auto"` or `None`): the UNet's self-attention attends within windows of
            about this many pixels (``models.windowed_attention``); ``"auto"`` is the UNet's training size
            ``unet.config.sample_size``, so an image larger than the crops the prior was trained on shows
            its attention the context it learned, at a cost linear in the pixels. ``None``: global attention.
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
        dps_guidance_scale: float | None = None,
        diffpir_guidance_scale: float | None = None,
        attention_window: int | str | None = "auto",
    ):
        super().__init__()
        attention_window = attention_window_setting(attention_window)
        self.register_modules(unet=unet, scheduler=scheduler, kernel_estimator=kernel_estimator)
        self.register_to_config(guidance_scale=guidance_scale, dps_guidance_scale=dps_guidance_scale,
                                diffpir_guidance_scale=diffpir_guidance_scale, attention_window=attention_window)
        self.image_processor = DeblurImageProcessor(pad_multiple=2 ** (len(unet.config.block_out_channels) - 1),
                                                    fft_friendly=True)
        self._guidance_scale = None
        self._num_timesteps = 0
        self._interrupt = False

    def default_guidance_scale(self, guidance: str = "pigdm") -> float:
        """The configured scale for ``guidance``: ``config.dps_guidance_scale`` for DPS when set, else
        ``config.guidance_scale``; for DiffPIR ``config.diffpir_guidance_scale``, else ``DIFFPIR_GUIDANCE_SCALE``
        (its scale weighs a data step, not a gradient: Pi-GDM's value means nothing there)."""
        if guidance == "diffpir":
            diffpir_scale = self.config.get("diffpir_guidance_scale")
            return float(DIFFPIR_GUIDANCE_SCALE if diffpir_scale is None else diffpir_scale)
        dps_scale = self.config.get("dps_guidance_scale")
        return float(dps_scale if guidance == "dps" and dps_scale is not None else self.config.guidance_scale)

    @property
    def guidance_scale(self) -> float:
        """The guidance multiplier of the current (or last) call; the saved default before any call."""
        if self._guidance_scale is None:
            return float(self.config.guidance_scale)
        return self._guidance_scale

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
        guidance_scale: float | None = None,
    ) -> None:
        check_scheduler(self.scheduler)
        if guidance not in GUIDANCES:
            raise ValueError(f"guidance must be one of {GUIDANCES}, got {guidance!r}")
        if r_schedule not in R_SCHEDULES:
            raise ValueError(f"r_schedule must be one of {R_SCHEDULES}, got {r_schedule!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        if em_iterations is not None and (isinstance(em_iterations, bool) or not isinstance(em_iterations, int)
                                          or em_iterations < 1):
            raise ValueError(f"em_iterations must be None or a positive int, got {em_iterations!r}")
        if kernel is None and self.kernel_estimator is None:
            raise ValueError("Blind deblurring needs a kernel_estimator; pass one or give the true `kernel`.")
        if em_iterations is not None and kernel is not None:
            raise ValueError("em_iterations (Diffusion EM) estimates the kernel: do not pass `kernel` too.")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1:
            raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
        height, width = measurement.shape[-2:]
        if kernel is not None and np.ndim(kernel) >= 2 and (
                np.shape(kernel)[-2] > height or np.shape(kernel)[-1] > width):
            raise ValueError(f"the kernel ({np.shape(kernel)[-2]}x{np.shape(kernel)[-1]}) is larger than the image "
                             f"({height}x{width}); a known kernel must fit inside the photograph")
        if kernel_size > height or kernel_size > width:
            raise ValueError(f"kernel_size {kernel_size} is larger than the image ({height}x{width}); pass a "
                             f"kernel_size of at most {min(height, width)} for so small an image")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}"
            )
        unet_channels = self.unet.config.in_channels
        if measurement.shape[1] != unet_channels and not (measurement.shape[1] == 1 and unet_channels == 3):
            raise ValueError(f"image has {measurement.shape[1]} channels but the UNet expects {unet_channels}")
        if guidance_scale is not None:
            try:
                finite = math.isfinite(float(guidance_scale))
            except (TypeError, ValueError):
                finite = False
            if not finite or float(guidance_scale) < 0:
                raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")

    def prepare_sigma(self, sigma, measurement: torch.Tensor, warn_low: bool = True) -> torch.Tensor:
        """Noise std per image in ``[0, 1]`` units from 8-bit levels (``10`` → 10/255) or ``"auto"``
        (:func:`~diffusers_blind.pipelines.pipeline_utils.prepare_sigma`); ``sigma`` is required."""
        if sigma is None:
            raise ValueError("sigma (the noise std in 8-bit levels, e.g. 10) is required; pass a number or 'auto'")
        return prepare_sigma(sigma, measurement, warn_low=warn_low)

    def prepare_kernel(self, kernel, batch: int, device, dtype=torch.float32) -> torch.Tensor:
        """A user kernel as a ``(B, 1, k, k)`` tensor (:func:`~diffusers_blind.pipelines.pipeline_utils.prepare_kernel`)."""
        return prepare_kernel(kernel, batch, device, dtype)

    def check_kernel_init(self, kernel_init, m_step_start, num_scales: int, kernel_anchor=0.0) -> None:
        """Clear errors for ``kernel_init``, ``m_step_start`` and ``kernel_anchor``."""
        if isinstance(kernel_init, str):
            if kernel_init not in KERNEL_INITS:
                raise ValueError(f"kernel_init must be one of {KERNEL_INITS} or a kernel, got {kernel_init!r}")
        elif kernel_init is None or np.ndim(kernel_init) < 2:
            raise ValueError(f"kernel_init must be one of {KERNEL_INITS} or a (k, k) kernel, got {kernel_init!r}")
        elif num_scales > 1:
            raise ValueError("a kernel_init kernel cannot be combined with num_scales > 1 (the coarse scales start the kernel)")
        if isinstance(m_step_start, bool) or not isinstance(m_step_start, numbers.Real) or not 0 <= m_step_start <= 1:
            raise ValueError(f"m_step_start must be a number in [0, 1], got {m_step_start!r}")
        if isinstance(kernel_anchor, bool) or not isinstance(kernel_anchor, numbers.Real) or not 0 <= kernel_anchor < math.inf:
            raise ValueError(f"kernel_anchor must be a finite number >= 0, got {kernel_anchor!r}")

    def initial_kernel(self, kernel_init, measurement: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
        """The blind run's first kernel ``(B, 1, k, k)``: Dirac, sparse-prior estimate or the user's warm start."""
        batch, device = measurement.shape[0], measurement.device
        if isinstance(kernel_init, str):
            if kernel_init == "dirac":
                return dirac_kernel(kernel_size, batch, device)
            return SparseKernelInitializer(self.kernel_estimator)(measurement, kernel_size, sigma).to(device)
        kernel = self.prepare_kernel(kernel_init, batch, device)
        if kernel.shape[-1] != kernel_size or kernel.shape[-2] != kernel_size:
            raise ValueError(f"kernel_init is {tuple(kernel.shape[-2:])} but kernel_size is {kernel_size}")
        return project_kernel(kernel)

    def prepare_latents(self, shape, generator, device, dtype, latents=None) -> torch.Tensor:
        """``x_T ~ N(0, I)`` of ``shape = (B·n, C, H, W)``; a list of ``B`` generators seeds each image's particles."""
        return prepare_noise(shape, generator, device, dtype, latents, hint=GRID_HINT)

    _expand_generator = staticmethod(expand_generator)

    # ------------------------------------------------------------------ schedule
    def _previous_alpha_bar(self, step_index: int, timesteps: torch.Tensor) -> float:
        if step_index + 1 < len(timesteps):
            return float(self.scheduler.alphas_cumprod[int(timesteps[step_index + 1])])
        return float(getattr(self.scheduler, "final_alpha_cumprod", torch.tensor(1.0)))

    def guidance_coefficients(self, step_index: int, timesteps: torch.Tensor, r_schedule: str):
        """``(√ᾱ_t, r_t², v_t)`` for the Pi-GDM update (docs/conventions.md, "Guidance").

        ``v_t = β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_{t−1})`` on the respaced chain; ``r_t² = v/(1+v)``
        (``"fastem"``, the reference code) or ``1 − ᾱ_t`` (``"pigdm"``, the Pi-GDM paper).
        """
        alpha_bar = float(self.scheduler.alphas_cumprod[int(timesteps[step_index])])
        alpha_bar_prev = self._previous_alpha_bar(step_index, timesteps)
        v = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
        r2 = v / (1 + v) if r_schedule == "fastem" else 1 - alpha_bar
        return math.sqrt(alpha_bar), r2, v

    # ------------------------------------------------------------------ one step of Algorithm 2
    @staticmethod
    def measurement_window(shape, window, margin: int, kernel_size: int, device) -> torch.Tensor:
        """Weights of the M-step data term on the padded grid (``docs/kernel_estimation.md``).

        Zero on the reflected margin and the padding (there ``y = k ⊛ x`` does not hold: the margin
        is invented), rising with a raised cosine over ``kernel_size // 2`` pixels inside the image,
        so that the circular Fourier solve sees neither the invented border nor a jump. All ones
        without a margin (data blurred circularly, the papers' protocol).
        """
        if margin <= 0:
            return edge_taper_window(shape, 0, device=device)
        return photograph_window(shape, window, kernel_size, device)

    def m_step(self, problem: FastEMProblem, estimates: torch.Tensor, kernel: torch.Tensor, r: float | None = None):
        """Kernel update (Eqs. 24-25) from ``estimates`` in ``[0, 1]``, then recentring (§4.2).

        Runs without autograd: the kernel is data for the E-step, so no graph grows across steps.
        """
        with torch.no_grad():
            if problem.observed is not None and problem.kernel_cg_iterations > 0:
                kernel = self.kernel_estimator(
                    problem.measurement, estimates, problem.sigma, kernel, r=r, anchor=problem.anchor,
                    anchor_weight=problem.anchor_weight, mask=problem.observed, cg_iterations=problem.kernel_cg_iterations,
                )
            else:
                kernel = self.kernel_estimator(
                    problem.tapered_measurement, problem.taper_window * estimates, problem.sigma, kernel, r=r,
                    anchor=problem.anchor, anchor_weight=problem.anchor_weight,
                )
            return center_kernel(kernel).detach()

    def step_kernel(self, problem: FastEMProblem, x0: torch.Tensor, kernel: torch.Tensor, step_index: int) -> torch.Tensor:
        """The kernel after step ``step_index``: an M-step on ``x0`` when this run estimates it and the M-step has started."""
        if not problem.estimate_kernel or step_index < problem.m_step_from:
            return kernel
        _, r2, _ = self.guidance_coefficients(step_index, self.scheduler.timesteps, problem.r_schedule)
        return self.m_step(problem, x0, kernel, r=math.sqrt(r2))

    def guided_latents(self, problem: FastEMProblem, x_t, x0, prev_sample, kernel, step_index: int):
        """``x_{t−1}``: the scheduler's unguided sample plus the likelihood step, ``x0 = x̂0(x_t)`` in ``[0, 1]``.

        Pi-GDM (Eq. 17): ``x_{t−1} = x'_{t−1} + ζ_t r_t² √(1/(1+v_t)) ∇_{x_t}(G·x̂0)``;
        DPS (Eq. 16): ``x_{t−1} = x'_{t−1} − ζ_t ∇_{x_t}‖y − k ⊛ x̂0‖``, the norm in ``[−1, 1]`` units
        (2× the ``[0, 1]`` norm, the range DPS tuned ``ζ_t`` for); ``ζ_t = guidance_scale · √ᾱ_t``, times
        ``T / N`` for DPS: N respaced steps each take the push of the ``T / N`` training steps they replace,
        so one scale holds across step counts (1 at ``N = T`` is the paper's step).
        """
        sqrt_alpha_bar, r2, v = self.guidance_coefficients(step_index, self.scheduler.timesteps, problem.r_schedule)
        zeta = self.guidance_scale * sqrt_alpha_bar
        kernel_p = kernel.repeat_interleave(problem.num_particles, dim=0)
        y, sigma = problem.measurement_per_particle, problem.sigma_per_particle
        with torch.enable_grad():
            if problem.guidance == "pigdm":
                factor = zeta * r2 * math.sqrt(1 / (1 + v))
                if factor <= 0:
                    return prev_sample
                vector = pigdm_guidance(y, x0.detach(), kernel_p, sigma, math.sqrt(r2), residual_weight=problem.observed,
                                        cg_iterations=problem.guidance_iterations)
                grad = torch.autograd.grad((vector * x0).sum(), x_t)[0]
                return prev_sample + factor * grad
            (grad,) = dps_joint_gradient(y, x0, (kernel_p,), (x_t,), scale=2.0, residual_weight=problem.observed).gradients
            return prev_sample - zeta * problem.dps_step_factor * grad

    def proximal_x0(self, problem: FastEMProblem, x0: torch.Tensor, kernel: torch.Tensor, step_index: int) -> torch.Tensor:
        """DiffPIR's data step (Zhu et al., CVPRW 2023, Eq. 13) on ``x0 = x̂0`` in ``[0, 1]``: the MAP image under the blur.

        ``x̃0 = argmin_x ‖W(y − k ⊛ x)‖²/σ² + ‖x − x̂0‖²/ρ_t²`` with ``ρ_t² = s · (1 − ᾱ_t) / 4`` (``s`` the guidance
        scale; ``1 − ᾱ_t`` the noise variance of ``x_t``, ``/4`` in ``[0, 1]`` units). DiffPIR's own ``ρ_t² ∝ (1−ᾱ_t)/ᾱ_t``
        grows without bound early on and turns the step into an inverse filter there (docs/scale.md). By Woodbury
        ``x̃0 = x̂0 + ρ_t² Kᵀ W (ρ_t² W K Kᵀ W + σ²)⁻¹ W (y − K x̂0)``, i.e. ``x̂0 + ρ_t² G`` with ``G`` Pi-GDM's
        guidance vector for ``r = ρ_t``: the same solve, and no vector-Jacobian product through the UNet.
        """
        alpha_bar = float(self.scheduler.alphas_cumprod[int(self.scheduler.timesteps[step_index])])
        rho2 = self.guidance_scale * (1 - alpha_bar) / 4
        if rho2 <= 0:
            return x0
        kernel_p = kernel.repeat_interleave(problem.num_particles, dim=0)
        vector = pigdm_guidance(problem.measurement_per_particle, x0, kernel_p, problem.sigma_per_particle,
                                math.sqrt(rho2), residual_weight=problem.observed, cg_iterations=problem.guidance_iterations)
        return (x0 + rho2 * vector).clamp(0, 1)

    def proximal_step(self, denoiser: UNetDenoiser, problem: FastEMProblem, state: FastEMState, step_index: int, t,
                      step_kwargs: dict) -> FastEMState:
        """One forward-only E-step (DiffPIR): UNet → x̂0 → M-step → data step on x̂0 → scheduler step from it."""
        x_t = state.latents
        with torch.no_grad():
            output = denoiser.model_output(x_t, t)
            epsilon = denoiser.epsilon_from_output(output, x_t, t)
            x0 = to_unit_range(denoiser.x0_from_epsilon(epsilon, x_t, t))
            kernel = self.step_kernel(problem, x0, state.kernel, step_index)
            x0_data = self.proximal_x0(problem, x0, kernel, step_index)
            corrected = denoiser.epsilon_from_x0((x0_data * 2 - 1).to(x_t.dtype), x_t, t)
            model_output = denoiser.output_from_epsilon(corrected, x_t, t, output)
            latents = self.scheduler.step(model_output, t, x_t, **step_kwargs, return_dict=True).prev_sample
        return FastEMState(latents=latents.to(x_t.dtype), kernel=kernel, x0=x0)  # a half-precision UNet's dtype

    def denoising_step(self, denoiser: UNetDenoiser, problem: FastEMProblem, state: FastEMState, step_index: int, t,
                       step_kwargs: dict) -> FastEMState:
        """One E-step of Algorithm 2: UNet → x̂0 → M-step (if blind) → guided ``x_{t−1}``."""
        if problem.guidance == "diffpir":
            return self.proximal_step(denoiser, problem, state, step_index, t, step_kwargs)
        with torch.enable_grad():
            x_t = state.latents.detach().requires_grad_(True)
            prediction = denoiser(x_t, t, step=True, **step_kwargs)
            x0 = to_unit_range(prediction.x0)  # x̂0 in [0, 1]
        kernel = self.step_kernel(problem, x0.detach(), state.kernel, step_index)
        latents = self.guided_latents(problem, x_t, x0, prediction.prev_sample, kernel, step_index)
        return FastEMState(latents=latents.detach(), kernel=kernel, x0=x0.detach())

    def _callback(self, callback, tensor_inputs: list[str], state: FastEMState, step: int, t,
                  rescale_kernel: bool = True) -> FastEMState:
        """The step-end callback; a kernel it returns must keep the shape and be finite and non-negative, and in a
        blind Fast EM run (``rescale_kernel``) is rescaled to sum 1 like the M-step's; a known kernel is used as given."""
        if callback is None:
            return state
        available = {"latents": state.latents, "kernel": state.kernel, "x0": state.x0}
        outputs = callback_outputs(callback(self, step, t, {name: available[name] for name in tensor_inputs}))
        kernel = callback_replacement(outputs, "kernel", state.kernel)
        if kernel is not state.kernel:
            if (kernel < 0).any():
                raise ValueError("callback_on_step_end returned a kernel with negative entries")
            if rescale_kernel:
                kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(kernel.dtype).tiny)
        return replace(state, latents=callback_replacement(outputs, "latents", state.latents, GRID_HINT), kernel=kernel)

    def reverse_diffusion(self, denoiser, problem, state, *, step_kwargs, progress_bar, step_offset=0, start_index=0,
                          callback_on_step_end=None, callback_on_step_end_tensor_inputs=()) -> FastEMState:
        """One guided reverse diffusion from ``state.latents = x_t`` at ``t = timesteps[start_index]`` (``x_T``: 0).

        ``i`` indexes the full schedule (guidance coefficients, ``m_step_from``); the callback sees the steps that
        run, counted from ``step_offset``: ``step_offset + i − start_index`` (diffusers' img2img convention).
        """
        for i, t in enumerate(self.scheduler.timesteps):
            if self.interrupt or i < start_index:
                continue
            state = self.denoising_step(denoiser, problem, state, i, t, step_kwargs)
            state = self._callback(callback_on_step_end, callback_on_step_end_tensor_inputs, state,
                                   step_offset + i - start_index, t, rescale_kernel=problem.estimate_kernel)
            progress_bar.update()
        return state

    # ------------------------------------------------------------------ coarse to fine
    @staticmethod
    def coarse_kernel_size(kernel_size: int) -> int:
        """Kernel size one scale down: half, odd, at least 3 (33 → 17, 17 → 9)."""
        return max(3, (kernel_size // 2) | 1)

    def can_go_coarser(self, measurement: torch.Tensor, kernel_size: int) -> bool:
        """A coarser scale helps only while the kernel spans several pixels and the image stays usable."""
        return kernel_size >= MIN_COARSE_KERNEL and min(measurement.shape[-2:]) // 2 >= MIN_COARSE_IMAGE

    def run_downscaled(self, measurement: torch.Tensor, sigma: torch.Tensor, **kwargs):
        """A blind run (no guard, ``"pt"`` output) on the 2×2-averaged image, σ scaled to match.

        Averaging 2×2 pixels halves the noise std and the blur's extent; the nested run still raises σ to
        ``blind_sigma_floor`` where given, and the σ returned is the one it used. The nested call's per-call
        state (guidance scale, step count) is restored afterwards; an interrupt set during it stays set,
        so the calling level stops too. Returns ``(output, downscaled measurement, its σ, scale factor)``.
        """
        height, width = measurement.shape[-2:]
        coarse = F.interpolate(measurement, size=(height // 2, width // 2), mode="area")
        factor = height / coarse.shape[-2]
        state = (self._guidance_scale, self._num_timesteps)
        out = self(coarse, sigma=(sigma * 255 / factor).tolist(), output_type="pt", return_dict=True, guard=False,
                   **kwargs)
        self._guidance_scale, self._num_timesteps = state  # self._interrupt keeps the nested call's value
        used = torch.tensor(out.sigma, dtype=sigma.dtype, device=sigma.device) / 255
        return out, coarse, used, factor

    def coarse_estimate(self, measurement: torch.Tensor, sigma: torch.Tensor, kernel_size: int, num_scales: int,
                        call_kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Blind run on the 2×-downscaled image (recursively coarse to fine), carried up one scale.

        Downscaling by 2×2 averaging halves the kernel's extent and the noise std, so the coarse
        problem is better conditioned; its result seeds the finer run: the kernel by
        ``ops.rescale_kernel`` and the image by bicubic upsampling (noised to ``t_start`` by the caller).
        Returns ``(image (B, C, H, W) in [0, 1], kernel (B, 1, k, k))``.
        """
        height, width = measurement.shape[-2:]
        out, _, _, factor = self.run_downscaled(measurement, sigma, kernel_size=self.coarse_kernel_size(kernel_size),
                                                num_scales=num_scales - 1, **call_kwargs)
        image = F.interpolate(out.images.to(measurement), size=(height, width), mode="bicubic", align_corners=False)
        kernel = rescale_kernel(out.kernels.to(measurement), factor, kernel_size)
        return image.clamp(0, 1), kernel

    def select_kernel_size(self, measurement: torch.Tensor, sigma: torch.Tensor,
                           candidates=KERNEL_SIZE_CANDIDATES) -> tuple[int, int]:
        """``kernel_size="auto"``: a support large enough for the blur, measured by a sparse-prior estimate.

        A probe kernel of the estimator's size ``P`` (less on a small image) is estimated by
        :class:`SparseKernelInitializer` (no diffusion; about a second); its extent ``e`` is the side of
        the centred square holding every pixel above 10 % of its peak (``ops.kernel_extent``: the haze an
        estimate spreads over its support does not count). Where the image allows, a second probe on the
        2×-downscaled copy covers blurs up to ``2P`` and replaces ``e`` when it sees a blur clearly longer
        than ``P`` (by more than ``2·margin``; it overestimates by a few pixels). The size is the smallest
        candidate ``≥ max(e + 2, P)`` that fits in half the image (one size for the batch: the largest
        extent). It never goes below ``P``: on synthetic camera shake, supports fitted tightly to the
        blur lost to the prior's own size (docs/kernel_estimation.md). Returns ``(kernel_size, e)``.
        """
        size, extent, _ = self._kernel_size_and_probe(measurement, sigma, candidates)
        return size, extent

    def _kernel_size_and_probe(self, measurement, sigma, candidates=KERNEL_SIZE_CANDIDATES):
        """:meth:`select_kernel_size` plus the full-resolution probe kernel (``(B, 1, P, P)``), which *is* the
        sparse start kernel when the chosen size equals the probe's (the run then need not recompute it)."""
        height, width = measurement.shape[-2:]
        allowed = [size for size in candidates if size <= min(height, width) // 2]
        if not allowed:
            raise ValueError(f"the image ({height}x{width}) is too small for kernel_size='auto'; pass a kernel_size")
        estimator_size = self.kernel_estimator.config.kernel_size
        probe_size = min(estimator_size, (min(height, width) // 2 - 1) | 1)
        initializer = SparseKernelInitializer(self.kernel_estimator)
        probe = initializer(measurement, probe_size, sigma)
        extent = int(kernel_extent(probe, KERNEL_SIZE_LEVEL).max())
        if max(allowed) > probe_size and min(height, width) // 2 >= 2 * estimator_size:
            coarse = F.interpolate(measurement, size=(height // 2, width // 2), mode="area")
            coarse_kernel = initializer(coarse, estimator_size, sigma / 2)
            coarse_extent = 2 * int(kernel_extent(coarse_kernel, KERNEL_SIZE_LEVEL).max()) - 1
            if coarse_extent > probe_size + 2 * KERNEL_SIZE_MARGIN:
                extent = coarse_extent
        needed = max(extent + KERNEL_SIZE_MARGIN, estimator_size)
        fitting = [size for size in allowed if size >= needed]
        return (min(fitting) if fitting else max(allowed)), extent, probe

    @staticmethod
    def initial_image(measurement: torch.Tensor) -> torch.Tensor:
        """The ``strength < 1`` start (SDEdit): the padded photo itself, clipped to ``[0, 1]``.

        At the start level the noise (std ``√(1−ᾱ_t)/√ᾱ_t`` relative to the image, about 1 at 30 % of the
        schedule) hides the fine detail that the blur removed, so the photo is a fair draw of ``x_t``. On ten
        tuning crops it scored 0.24 dB above a Wiener deconvolution by the start kernel, whose ringing the
        noise does not hide (docs/scale.md).
        """
        return measurement.clamp(0, 1)

    def refine_latents(self, init_image: torch.Tensor, noise: torch.Tensor, start_index: int) -> torch.Tensor:
        """``x_t = √ᾱ_t·x_init + √(1−ᾱ_t)·ε`` at ``t = timesteps[start_index]`` (the img2img start)."""
        timestep = self.scheduler.timesteps[start_index : start_index + 1]
        return self.scheduler.add_noise(init_image * 2 - 1, noise, timestep.repeat(noise.shape[0]))

    # ------------------------------------------------------------------ guard
    def guard(self, measurement, latents, kernel, sigma, window, num_particles: int, padded):
        """Drop blind estimates that do not explain the measurement, or that collapsed into stripes.

        ``fit = reblur_fit(y, x̂, k̂, σ)`` (re-blur residual over σ², about 1 for a consistent pair) is
        compared with ``reblur_fit(y, y, k̂, σ)``, the same kernel applied to the blurry input: an image
        that k̂ re-blurs further from y than y itself, and beyond ``GUARD_FIT_LIMIT``, did not fit the
        photo (a diverged run). A wrong kernel with deep zeros can also be fitted by an image that
        amplifies what the kernel cannot see into stripes of full contrast: an estimate that saturates
        more than ``GUARD_SATURATION_LIMIT`` of the photo's mid-tones (:func:`midtone_saturation`) while
        spreading its values more than ``GUARD_CONTRAST_LIMIT`` times the photo's (:func:`contrast_gain`)
        collapsed. Either way that image's output falls back to the input with a Dirac kernel, with a
        warning. Returns ``(latents, kernel, fit list, fallback list)``.
        """
        size = kernel.shape[-1]
        if 2 * (size // 2) >= min(measurement.shape[-2:]):
            return latents, kernel, None, None  # no interior to compare on
        samples = self.image_processor.unpad(to_unit_range(latents).float().clamp(0, 1), window)
        estimate = samples.reshape(-1, num_particles, *samples.shape[1:]).mean(1)
        measurement = measurement.float()
        fit = reblur_fit(measurement, estimate, kernel.float(), sigma)
        input_fit = reblur_fit(measurement, measurement, kernel.float(), sigma)
        misfit = fit > input_fit.clamp_min(GUARD_FIT_LIMIT)
        saturation = midtone_saturation(measurement, estimate)
        gain = contrast_gain(measurement, estimate)
        collapsed = (saturation > GUARD_SATURATION_LIMIT) & (gain > GUARD_CONTRAST_LIMIT)
        failed = misfit | collapsed
        for index in failed.nonzero().flatten().tolist():
            reason = (
                f"does not explain the photo (re-blur fit {fit[index]:.2f} vs {GUARD_FIT_LIMIT:g} or the input's "
                f"{input_fit[index]:.2f})" if misfit[index] else
                f"collapsed into stripes ({100 * saturation[index]:.0f} % of the mid-tones saturated, "
                f"contrast {gain[index]:.1f}x the input's)"
            )
            warnings.warn(
                f"the blind estimate of image {index} {reason}: returning the input unchanged with a Dirac "
                "kernel. Check sigma, try another seed, num_scales (1 or 2) or kernel_size.",
                stacklevel=4,
            )
        if failed.any():
            per_particle = failed.repeat_interleave(num_particles).view(-1, 1, 1, 1)
            latents = torch.where(per_particle, padded.repeat_interleave(num_particles, 0).to(latents) * 2 - 1, latents)
            kernel = torch.where(failed.view(-1, 1, 1, 1), dirac_kernel(size, kernel.shape[0], kernel.device, kernel.dtype), kernel)
        return latents, kernel, fit.cpu().tolist(), failed.cpu().tolist()

    # ------------------------------------------------------------------ outputs
    def postprocess(self, latents, kernel, window, batch: int, num_particles: int, grayscale: bool, output_type: str):
        """Crop, average the particles and convert: ``(images, kernels, uncertainty, particles)``."""
        if output_type == "latent":
            return latents, kernel, None, None
        images, uncertainty, particles = self.image_processor.postprocess(
            to_unit_range(latents), num_particles, window, output_type, grayscale
        )
        kernels = kernel.detach().cpu() if output_type == "pt" else kernel.detach().float().cpu()[:, 0].numpy()
        return images, kernels, uncertainty, particles

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: ImageInput,
        sigma: float | str | list[float] | torch.Tensor = 10.0,
        kernel: torch.Tensor | np.ndarray | None = None,
        num_inference_steps: int = DEFAULT_STEPS,
        guidance: str = "pigdm",
        guidance_scale: float | None = None,
        kernel_size: int | None = None,
        num_particles: int = 1,
        em_iterations: int | None = None,
        num_scales: int = 1,
        refine_strength: float = DEFAULT_REFINE_STRENGTH,
        strength: float = 1.0,
        kernel_init: str | torch.Tensor | np.ndarray = "sparse",
        m_step_start: float = 0.8,
        kernel_anchor: float | None = None,
        r_schedule: str = "fastem",
        boundary_margin: int | None = None,
        observe_margin: bool = False,
        guidance_iterations: int = MASKED_GUIDANCE_ITERATIONS,
        kernel_cg_iterations: int = MASKED_KERNEL_ITERATIONS,
        blind_sigma_floor: float = BLIND_SIGMA_FLOOR,
        guard: bool = True,
        eta: float = 0.0,
        tile_size: int | None = None,
        max_memory: int | str | None = None,
        precision: str | None = None,
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
            num_inference_steps: diffusion steps (default ``DEFAULT_STEPS`` = 50; the paper runs 100 for Pi-GDM, 1000 for DPS).
            guidance: ``"pigdm"`` (Fourier closed form, Eq. 17), ``"dps"`` (Eq. 16) or ``"diffpir"`` (a data step
                on ``x̂0`` instead of a gradient through the UNet: forward passes only, about 2.5× faster per step;
                see :meth:`proximal_x0`).
            guidance_scale: Pi-GDM and DPS: multiplier of the reference step size ``ζ_t = √ᾱ_t`` (DPS: ``√ᾱ_t · T/N``;
                1 is the paper's step; default: the pipeline's ``config.guidance_scale``, or ``config.dps_guidance_scale``
                for DPS when set). DiffPIR: the weight ``s`` of its data step, ``ρ_t² = s(1 − ᾱ_t)/4`` (default:
                ``config.diffpir_guidance_scale``, else ``DIFFPIR_GUIDANCE_SCALE`` = 0.5). Readable during the call as
                ``pipe.guidance_scale``; a step-end callback may set ``pipe._guidance_scale``.
            kernel_size: size of the estimated kernel (default: the estimator's ``kernel_size``), or ``"auto"``
                to pick it from the extent of a sparse-prior kernel estimate (see :meth:`select_kernel_size`;
                about one or two CPU seconds more; never below the estimator's size).
            num_particles: ``n`` posterior samples per image, run as a batch sharing one kernel.
            em_iterations: if set, Diffusion EM (Alg. A.1): this many full runs, one M-step after each.
            num_scales: coarse-to-fine levels of the blind estimate (factor 2 each; 1 = single scale). Each
                coarser level runs the whole method on the 2×-downscaled image with a half-size kernel;
                its kernel and image seed the next finer level. Levels stop early when the kernel would
                fall below 9 px or the image below 32 px. Ignored with a known ``kernel`` or ``em_iterations``.
                2 takes about 0.55× the time of one level; its quality is mixed (better on the tuning crops,
                0.4–0.8 dB lower on the evaluation photographs; docs/scale.md), so it is not the default.
            refine_strength: with ``num_scales > 1``, the fraction of the schedule each finer level runs,
                starting from the upsampled coarser image noised to that level (img2img's ``strength``);
                1 starts from pure noise and keeps only the kernel (default ``DEFAULT_REFINE_STRENGTH`` = 0.3).
            strength: the fraction of the schedule that runs (img2img's ``strength``): ``x_t`` at
                ``t = timesteps[(1 − strength)·N]`` is the photo noised to that level (:meth:`initial_image`), and
                only the last ``strength·N`` steps run, so the time falls in proportion. 1 (default) starts from
                pure noise, the paper. With ``num_scales > 1`` it applies to the coarsest level. Not with
                ``em_iterations``.
            kernel_init: how a blind run starts its kernel: ``"sparse"`` (default) a coarse-to-fine estimate
                under an L0 gradient prior (:class:`~diffusers_blind.kernel_init.SparseKernelInitializer`,
                about a second at 256²), ``"dirac"`` the identity (the paper), or a ``(k, k)`` / ``(B, 1, k, k)``
                kernel to warm-start from. Ignored with a known ``kernel``.
            m_step_start: fraction of the schedule that keeps the initial kernel before the M-step runs at
                every step (default 0.8: the last 20 % refine it; 0: from the first step, the paper, where the
                early ``x̂0`` are smooth and a kernel fitted to them drifts back toward a Dirac; 1: never, the
                starting kernel is final).
            kernel_anchor: weight ``ρ`` of a term ``ρ·σ²·P·‖k − k_start‖²`` (``P`` the photograph's pixel count, so
                the pull keeps its weight against the data term at any size) in every M-step: it holds the kernel
                near an informative start (sparse, coarse-to-fine or a given kernel; a Dirac start is not held);
                frequencies ``x̂0`` hardly carries keep the start's value (default ``KERNEL_ANCHOR``; 0 = the paper's
                free M-step).
            r_schedule: ``"fastem"`` (``r_t² = β̃_t/(1+β̃_t)``, the reference code) or ``"pigdm"`` (``1 − ᾱ_t``).
            boundary_margin: pixels of reflection padding added around the image before the circular FFT
                model, removed at the end (default ``kernel_size``; use 0 for data blurred circularly).
                With a margin, the M-step also sees both images through a ``kernel_size``-wide edge taper.
            observe_margin: let the E-step fit the reflected margin as if it were data (the earlier
                behaviour). By default only the photograph's pixels are data: the margin is unknown scene
                the blur reaches into, so the model is a valid (not circular) convolution.
            guidance_iterations: with that valid model, Pi-GDM's ``(r²HHᵀ + σ²I)⁻¹`` has no Fourier closed
                form; this many preconditioned conjugate-gradient iterations solve it (stopping early once
                converged). 0 uses the circulant inverse alone, which rings and diverges at low noise
                (docs/conventions.md, "Boundary handling of the pipeline").
            kernel_cg_iterations: with that valid model, the M-step's kernel least squares counts only the
                photograph's pixels and is solved on the kernel's support by this many warm-started,
                preconditioned conjugate-gradient iterations per HQS step. 0 uses the earlier approximation
                (both images through an edge window, a full-grid Fourier solve), whose window edges bend
                the blind kernel into a cross on photos with few edges (docs/kernel_estimation.md).
            blind_sigma_floor: in blind runs, ``sigma`` below this many 8-bit levels is raised to it (default 5; at every
                scale of ``num_scales``):
                an estimated kernel is never exact, and at lower noise the guidance and the M-step trust the
                photo more than the kernel allows (ringing, a drifting kernel). ``output.sigma`` reports the
                value used; 0 turns it off. Known-kernel runs keep ``sigma``.
            guard: in blind runs, replace an image whose estimate explains the photo worse than the photo
                itself, or collapsed into saturated stripes (see :meth:`guard`), by the input, with a warning;
                ``out.fit`` and ``out.fallback`` report it.
            eta: DDIM's ``η`` (ignored by DDPM).
            tile_size: run the UNet on overlapping tiles of this size, blended at every step (bounded memory
                for any image size; docs/scale.md). ``None`` (default): chosen from ``max_memory``; small
                images run untiled.
            max_memory: memory budget for the automatic tile size, bytes or a string such as ``"8GiB"``
                (default: 60 % of the free RAM, or of the free GPU memory on CUDA).
            precision: ``"float32"``, ``"bfloat16"`` or ``"float16"``: the UNet's forward and backward under
                autocast in that dtype (guidance, M-step and scheduler stay float32). Default (``None``):
                ``"float32"``; ``"bfloat16"`` is 18 % faster on a CPU with native bfloat16 (docs/scale.md).
            generator: a ``torch.Generator``, or a list with one per image (or per particle) for reproducibility.
                With particles, a single generator and a one-element list draw the step noise differently (for
                the whole batch at once, or per image), so compare runs made with the same form.
            latents: the initial noise ``x_T``, ``(B·n, C, H', W')`` on the padded grid (with ``strength < 1``,
                the noise ``ε`` added to the photo at the start level).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            return_dict: return a [`FastEMDeblurPipelineOutput`] instead of a tuple.
            callback_on_step_end: called after each step as ``fn(pipe, step, timestep, tensors)``; may return
                replacements for ``latents`` and ``kernel``. ``step`` counts the steps that run, ``0`` to
                ``pipe.num_timesteps − 1`` (with ``strength < 1`` the skipped start of the schedule is not counted;
                with ``em_iterations`` the runs follow each other). With ``num_scales > 1`` it sees the full-size
                level only (the coarser levels run before it, without callback); setting ``pipe._interrupt``
                stops the call, and an interrupt during a coarser level returns that level's image and kernel,
                upsampled.
            callback_on_step_end_tensor_inputs: which of ``latents``, ``kernel``, ``x0`` the callback receives.

        Examples:

        Returns:
            [`FastEMDeblurPipelineOutput`] or ``(images, kernels, uncertainty)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 1. Check inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = []
        num_inference_steps, num_particles, kernel_size, em_iterations = (
            int(value) if isinstance(value, np.integer) else value
            for value in (num_inference_steps, num_particles, kernel_size, em_iterations))
        if kernel is not None and np.ndim(kernel) < 2:
            raise ValueError(f"kernel must be a (k, k), (B, k, k) or (B, 1, k, k) array or tensor, got {kernel!r}")
        measurement = self.image_processor.preprocess(image)
        auto_kernel_size = isinstance(kernel_size, str)
        if auto_kernel_size:
            if kernel_size != "auto":
                raise ValueError(f"kernel_size must be a positive int, None or 'auto', got {kernel_size!r}")
            if kernel is not None or em_iterations is not None:
                raise ValueError("kernel_size='auto' is for blind Fast EM: not with a known `kernel` or em_iterations")
            if not isinstance(kernel_init, str):
                raise ValueError("kernel_size='auto' chooses the size, a kernel_init kernel sets it: pass one of them")
            kernel_size = None
        if kernel is not None and kernel_size is not None and np.ndim(kernel) >= 2 \
                and tuple(np.shape(kernel)[-2:]) != (kernel_size, kernel_size):
            raise ValueError(f"kernel is {tuple(np.shape(kernel)[-2:])} but kernel_size is {kernel_size}: a known "
                             "kernel sets the size (leave kernel_size out)")
        if kernel_size is None:
            if kernel is not None:
                kernel_size = int(np.shape(kernel)[-1])
            elif not isinstance(kernel_init, str) and np.ndim(kernel_init) >= 2:
                kernel_size = int(np.shape(kernel_init)[-1])
            else:
                kernel_size = self.kernel_estimator.config.kernel_size if self.kernel_estimator is not None else 33
                fitting = [size for size in KERNEL_SIZE_CANDIDATES if size <= min(measurement.shape[-2:]) // 2]
                if auto_kernel_size and fitting:  # checked at the largest size "auto" may choose on this image
                    kernel_size = min(kernel_size, max(fitting))
        self.check_inputs(
            measurement, kernel, kernel_size, guidance, num_inference_steps, num_particles, em_iterations,
            output_type, r_schedule, callback_on_step_end_tensor_inputs, guidance_scale,
        )
        check_coarse_to_fine(num_scales, refine_strength, strength)
        if isinstance(guidance_iterations, bool) or not isinstance(guidance_iterations, (int, np.integer)) \
                or guidance_iterations < 0:
            raise ValueError(f"guidance_iterations must be an int >= 0, got {guidance_iterations!r}")
        if isinstance(kernel_cg_iterations, bool) or not isinstance(kernel_cg_iterations, (int, np.integer)) \
                or kernel_cg_iterations < 0:
            raise ValueError(f"kernel_cg_iterations must be an int >= 0, got {kernel_cg_iterations!r}")
        if isinstance(blind_sigma_floor, bool) or not isinstance(blind_sigma_floor, (int, float, np.number)) \
                or not math.isfinite(float(blind_sigma_floor)) or blind_sigma_floor < 0:
            raise ValueError(f"blind_sigma_floor must be a finite number >= 0 (8-bit levels), got {blind_sigma_floor!r}")
        if boundary_margin is not None and (isinstance(boundary_margin, (bool, np.bool_))
                                            or not isinstance(boundary_margin, (int, np.integer)) or boundary_margin < 0):
            raise ValueError(f"boundary_margin must be None or an int >= 0, got {boundary_margin!r}")
        if strength < 1 and em_iterations is not None:
            raise ValueError("strength < 1 is for Fast EM and the known-kernel baselines, not with em_iterations")
        kernel_anchor = KERNEL_ANCHOR if kernel_anchor is None else kernel_anchor
        self.check_kernel_init(kernel_init, m_step_start, num_scales, kernel_anchor)
        self._guidance_scale = float(self.default_guidance_scale(guidance) if guidance_scale is None else guidance_scale)
        self._interrupt = False

        # 2. Prepare the measurement and its noise level
        device = self._execution_device
        batch = measurement.shape[0]
        measurement = measurement.to(device)
        grayscale = measurement.shape[1] == 1 and self.unet.config.in_channels == 3
        if grayscale:
            measurement = measurement.expand(-1, 3, -1, -1)
        floored = kernel is None and blind_sigma_floor / 255 >= LOW_AUTO_SIGMA
        sigma = self.prepare_sigma(sigma, measurement, warn_low=not floored).to(device)
        if kernel is None and blind_sigma_floor > 0:
            sigma = sigma.clamp_min(float(blind_sigma_floor) / 255)
        probe = None
        if auto_kernel_size:
            kernel_size, extent, probe = self._kernel_size_and_probe(measurement, sigma)
            logger.info("kernel_size='auto': estimated blur extent %d px -> kernel_size %d", extent, kernel_size)
        if probe is not None and isinstance(kernel_init, str) and kernel_init == "sparse" \
                and probe.shape[-1] == kernel_size and num_scales == 1:
            kernel_init = probe  # the sparse start at this size: already computed by the probe

        # 3. Pad (reflect) so that FFT wrap-around falls in a margin that is cropped away, and to the UNet
        #    multiple. The M-step weighs its data term by a window that is zero on the invented margin
        #    and tapers inside the photograph (all ones when margin = 0).
        margin = kernel_size if boundary_margin is None else int(boundary_margin)
        multiple = 2 ** (len(self.unet.config.block_out_channels) - 1)
        padded, window = self.image_processor.pad(measurement, margin, multiple)
        taper_window = self.measurement_window(padded.shape[-2:], window, margin, kernel_size, device)

        # 4. Prepare the kernel: a Dirac to start the blind estimate (or the coarser scales' estimate,
        #    with their image as the starting point), or the given one
        blind = kernel is None
        init_image = None
        if blind and em_iterations is None and num_scales > 1 and self.can_go_coarser(measurement, kernel_size):
            coarse_kwargs = dict(
                num_inference_steps=num_inference_steps, guidance=guidance, guidance_scale=self._guidance_scale,
                num_particles=num_particles, refine_strength=refine_strength, strength=strength, r_schedule=r_schedule,
                eta=eta,
                observe_margin=observe_margin, guidance_iterations=guidance_iterations,
                kernel_cg_iterations=kernel_cg_iterations,
                blind_sigma_floor=blind_sigma_floor, tile_size=tile_size,
                max_memory=max_memory, precision=precision, boundary_margin=None if boundary_margin is None else int(boundary_margin) // 2, generator=generator,
                kernel_init=kernel_init, m_step_start=m_step_start, kernel_anchor=kernel_anchor,
            )
            init_image, kernel = self.coarse_estimate(measurement, sigma, kernel_size, num_scales, coarse_kwargs)
            init_image = self.image_processor.pad(init_image, margin, multiple)[0].repeat_interleave(num_particles, 0)
        elif blind:
            kernel = self.initial_kernel(kernel_init, measurement, kernel_size, sigma)
        else:
            kernel = self.prepare_kernel(kernel, batch, device)
            if kernel.shape[-1] > padded.shape[-1] or kernel.shape[-2] > padded.shape[-2]:
                raise ValueError(f"kernel {tuple(kernel.shape[-2:])} is larger than the image")
        anchored = blind and kernel_anchor > 0 and not (isinstance(kernel_init, str) and kernel_init == "dirac" and init_image is None)
        observed = None
        if margin > 0 and not observe_margin:
            observed = edge_taper_window(padded.shape[-2:], 0, device=device, region=window)
        problem = FastEMProblem(
            measurement=padded, sigma=sigma, taper_window=taper_window, num_particles=num_particles,
            guidance=guidance, r_schedule=r_schedule, estimate_kernel=blind and em_iterations is None,
            observed=observed, m_step_from=round(m_step_start * num_inference_steps),
            anchor=kernel if anchored else None, anchor_weight=float(kernel_anchor) * measurement[0, 0].numel(),
            dps_step_factor=self.scheduler.config.num_train_timesteps / num_inference_steps,
            guidance_iterations=guidance_iterations, kernel_cg_iterations=int(kernel_cg_iterations),
        )

        # 5. Prepare timesteps, the denoiser and the scheduler's extra step arguments
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        runs = em_iterations or 1
        start_index, fraction = 0, 1.0
        if init_image is not None:  # a finer level replays the last `refine_strength` of the schedule
            fraction = refine_strength
        elif strength < 1:  # img2img: start from the photo, noised to the start level
            init_image = self.initial_image(padded).repeat_interleave(num_particles, 0)
            fraction = strength
        if fraction < 1:
            start_index = min(len(self.scheduler.timesteps) - 1, round((1 - fraction) * len(self.scheduler.timesteps)))
        self._num_timesteps = (len(self.scheduler.timesteps) - start_index) * runs
        shape = (batch * num_particles, self.unet.config.in_channels, *padded.shape[-2:])
        # the tiling is planned for the sides before their FFT-friendly rounding, so that rounding never tips
        # an image into tiles (a 512² photo with its margin stays whole: 584 px, 600 after rounding)
        plan_sides = self.image_processor.pad(measurement[:1, :1], margin, multiple, fft_friendly=False)[0].shape[-2:]
        denoiser, self.tiling_plan = make_denoiser(self.unet, self.scheduler, shape, device, tile_size, max_memory,
                                                   multiple, resolve_precision(precision, device),
                                                   resolve_attention_window(self.config.attention_window, self.unet),
                                                   plan_sides=plan_sides)
        generator = self._expand_generator(generator, batch, num_particles)
        step_kwargs = denoiser.step_kwargs(generator, eta)

        # 6. Denoising loop: one run (Fast EM), or em_iterations runs each followed by an M-step (Diffusion EM)
        with self.progress_bar(total=self._num_timesteps) as progress_bar:
            for run in range(runs):
                noise = self.prepare_latents(shape, generator, device, self.unet.dtype, latents if run == 0 else None)
                if init_image is not None and self.interrupt:  # stopped in a coarser level: its image, no step here
                    noise = init_image.to(noise.dtype) * 2 - 1
                elif init_image is not None:
                    noise = self.refine_latents(init_image.to(noise.dtype), noise, start_index)
                state = FastEMState(latents=noise, kernel=kernel)
                state = self.reverse_diffusion(
                    denoiser, problem, state, step_kwargs=step_kwargs, progress_bar=progress_bar, start_index=start_index,
                    step_offset=run * (len(self.scheduler.timesteps) - start_index), callback_on_step_end=callback_on_step_end,
                    callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                )
                kernel = state.kernel
                if self.interrupt:  # keep the state where the callback stopped; no further run or M-step
                    break
                if em_iterations is not None:  # Diffusion EM: M-step on the final samples (Alg. A.1)
                    kernel = self.m_step(problem, to_unit_range(state.latents), kernel)
        self.maybe_free_model_hooks()

        # 7. Guard (blind): an estimate that explains y worse than y itself does is replaced by y
        latents, kernel, fit, fallback = state.latents, kernel, None, None
        if blind and guard and not self.interrupt:
            latents, kernel, fit, fallback = self.guard(measurement, latents, kernel, sigma, window, num_particles, padded)

        # 8. Post-process: crop the margin, average the particles, convert
        images, kernels, uncertainty, particles = self.postprocess(
            latents, kernel, window, batch, num_particles, grayscale, output_type
        )
        if not return_dict:
            return images, kernels, uncertainty
        return FastEMDeblurPipelineOutput(
            images=images, kernels=kernels, uncertainty=uncertainty, particles=particles,
            sigma=(sigma * 255).cpu().tolist(), fit=fit, fallback=fallback,
        )
