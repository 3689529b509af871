"""BlindDPS (Chung, Kim, Kim, Ye, CVPR 2023): blind deblurring by parallel diffusion of image and kernel.

Algorithm 1 of the paper, as its public code runs it and with the corrections listed in
docs/blind_dps.md: each step, the image chain and the kernel chain take an (unguided) DDPM
step; the predicted clean kernel ``k̂0`` is mapped to a non-negative, sum-1 kernel per batch
element; both chains then move against the gradient of one joint data term
``‖y − A(x̂0, k̂0)‖₂ (+ λ‖u(k̂0)‖₁)`` (Eq. 10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import replace_example_docstring

from ...image_processor import ImageInput, crop_window, pad_to_multiple, tensor_to_output, to_tensor
from ...kernel_init import SparseKernelInitializer
from ...models.kernel_estimator import KernelEstimator
from ...models.windowed_attention import attention_window_setting, resolve_attention_window
from ...ops.blur import flip_kernel
from ...ops.guidance import dps_joint_gradient, kernel_l1
from ...ops.kernel_range import KERNEL_BACKGROUNDS, kernel_to_model_range, model_range_to_kernel, unnormalized_kernel
from ...ops.operators import BlurOperator, LinearOperator
from ..hub import HubPipelineMixin
from ..pipeline_utils import (DeblurPipelineOutput, callback_outputs, callback_replacement, check_scheduler,
                             expand_generator, prepare_kernel, prepare_noise, prepare_sigma, to_unit_range)
from ..tiling import TiledUNetDenoiser, resolve_precision


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> import diffusers_blind
        >>> from diffusers_blind import BlindDPSPipeline
        >>> from PIL import Image

        >>> pipe = BlindDPSPipeline.from_pretrained(diffusers_blind.BLIND_DPS_DEFAULT_MODEL)
        >>> blurry = Image.open("blurry.png")
        >>> out = pipe(blurry, num_inference_steps=250, blur_model="reflect", generator=torch.manual_seed(0))
        >>> out.images[0].save("restored.png")
        >>> out.kernels.shape  # (B, k, k), true-convolution convention, centre k // 2
        (1, 32, 32)
        ```
"""

BLUR_MODELS = ("correlation", "circular", "reflect")
STEP_SIZES = ("sqrt_alpha_bar", "constant")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
KERNEL_INITS = ("noise", "sparse")  # the kernel chain starts from pure noise (the paper) or a sparse-prior estimate


def blur_operator(blur_model: str) -> BlurOperator:
    """The measurement model of a ``blur_model`` name.

    ``"correlation"``: the paper's zero-padded cross-correlation (``F.conv2d(padding="same")``); the
    kernel chain then holds the 180°-rotated (correlation) kernel. ``"circular"`` / ``"reflect"``:
    the package's true convolution with periodic / mirrored boundaries.
    """
    if blur_model == "correlation":
        return BlurOperator("zeros", kernel_convention="correlation")
    if blur_model in ("circular", "reflect"):
        return BlurOperator(blur_model)
    raise ValueError(f"blur_model must be one of {BLUR_MODELS}, got {blur_model!r}")


class MaskedOperator(LinearOperator):
    """``M ⊙ A(x, θ)``: an operator whose output is seen only on a window ``M`` (the image inside a padded canvas)."""

    def __init__(self, operator: LinearOperator, mask: torch.Tensor):
        self.operator = operator
        self.mask = mask
        self.param_names = operator.param_names

    def A(self, x, *params):
        return self.mask * self.operator.A(x, *params)

    def A_adjoint(self, y, *params):
        return self.operator.A_adjoint(self.mask * y, *params)


def check_finite(*tensors: torch.Tensor) -> None:
    """A diverged chain (huge or non-finite values) stops with a clear error, not deep inside the kernel projection."""
    if not all(bool(torch.isfinite(tensor).all()) for tensor in tensors):
        raise RuntimeError("The sampler diverged (non-finite values): lower guidance_scale.")


@dataclass
class BlindDPSProblem:
    """Per-call constants: the measurement in the model range on the padded canvas, and the guidance settings."""

    measurement: torch.Tensor  # (B·n, C, H', W') in [-1, 1], zero outside the image window
    operator: LinearOperator
    step_size: str
    sparsity_weight: float
    start_kernel: torch.Tensor | None = None  # (B·n, 1, k, k) sum-1, operator convention; None: the paper's start
    hold_steps: int = 0  # the first steps, which keep the kernel at start_kernel
    start_state: torch.Tensor | None = None  # start_kernel in the kernel prior's range, 2k/max(k) − 1


class BlindDPSPipeline(HubPipelineMixin, DiffusionPipeline):
    r"""Blind deblurring by BlindDPS: an image diffusion prior and a kernel diffusion prior run in parallel.

    Each step (Algorithm 1, Eq. 10): ``x'_{t−1}, x̂0 = step(unet, x_t)``, ``k'_{t−1}, k̃0 = step(kernel_unet, k_t)``,
    ``k̂0 = u/Σu`` with ``u = (k̃0 + 1)/2`` per batch element, ``L = ‖y − A(x̂0, k̂0)‖₂ + λ‖u‖₁``, then
    ``x_{t−1} = x'_{t−1} − ζ_t ∇_{x_t} L`` and ``k_{t−1} = k'_{t−1} − ζ_t ∇_{k_t} L`` with
    ``ζ_t = guidance_scale · √ᾱ_t`` (the public code) or ``ζ_t = guidance_scale`` (the paper's constant).
    The data term is computed in the models' ``[−1, 1]`` range, as in the paper. Differences from the
    public code are listed in docs/blind_dps.md.

    **A start kernel (beyond the paper).** With ``kernel_init="sparse"`` (or a given kernel ``k_s``) and
    ``kernel_strength = s < 1``, the kernel is held at ``k_s`` for the first ``(1 − s)·N`` steps: the joint step
    uses ``k̂0 = k_s`` and moves the image chain only, and the kernel chain's state is ``k_s`` diffused to the next
    timestep, ``√ᾱ·k̃_s + √(1 − ᾱ)·ε`` (``k̃_s = 2k_s/max(k_s) − 1``, ``ε`` the chain's initial noise). Over the last
    ``s·N`` steps both chains run Algorithm 1 from there. ``"sparse"`` is the package's coarse-to-fine estimate
    under an L0 gradient prior (:class:`~diffusers_blind.kernel_init.SparseKernelInitializer`, the start of Fast
    EM), which needs the ``kernel_estimator`` component.

    Args:
        unet ([`UNet2DModel`]): ε-prediction image prior on ``[−1, 1]`` (3 or 6 output channels).
        kernel_unet ([`UNet2DModel`]): ε-prediction kernel prior, 1 input channel (1 or 2 output channels), on
            kernels mapped with ``2k/max(k) − 1`` (:func:`~diffusers_blind.ops.kernel_to_model_range`); its
            ``sample_size`` is the default kernel size.
        scheduler ([`DDPMScheduler`] or [`DDIMScheduler`]): drives both chains (the same schedule).
        guidance_scale (`float`): default multiplier of the step size (see above).
        sparsity_weight (`float`): default ``λ`` of the ℓ1 sparsity prior on the unnormalised kernel ``u``.
        kernel_background (`str`): ``"median"`` (default) removes each kernel image's median before normalising
            (robust to a prior whose background drifts from ``−1``); ``"none"`` is the public code's ``u/Σu``.
            Both agree when the background is at ``−1`` (docs/conventions.md, "Kernel diffusion prior").
        kernel_estimator ([`KernelEstimator`], *optional*): the plug-and-play kernel M-step whose prior the
            ``"sparse"`` start kernel uses (the Fast EM default model's ``kernel_estimator/``).
        kernel_init (`str`): default start of the kernel chain, ``"noise"`` (the paper) or ``"sparse"``.
        kernel_strength (`float`): default fraction ``s`` of the steps the kernel chain runs after a start kernel.
        attention_window (`int`, `"auto"` or `None`): the image chain's UNet attends within windows of about this
            many pixels; ``"auto"`` is its training size ``sample_size`` (see [`FastEMDeblurPipeline`]). The kernel
            chain always attends globally: a kernel is one object, not a texture.
    """

    model_cpu_offload_seq = "unet->kernel_unet"
    _optional_components = ["kernel_estimator"]
    _callback_tensor_inputs = ["latents", "kernel_latents", "kernel"]

    def __init__(
        self,
        unet: UNet2DModel,
        kernel_unet: UNet2DModel,
        scheduler: DDPMScheduler | DDIMScheduler,
        kernel_estimator: KernelEstimator | None = None,
        guidance_scale: float = 1.0,
        sparsity_weight: float = 0.0,
        kernel_background: str = "median",
        kernel_init: str = "noise",
        kernel_strength: float = 1.0,
        attention_window: int | str | None = "auto",
    ):
        super().__init__()
        attention_window = attention_window_setting(attention_window)
        self.register_modules(unet=unet, kernel_unet=kernel_unet, scheduler=scheduler,
                              kernel_estimator=kernel_estimator)
        self.register_to_config(guidance_scale=guidance_scale, sparsity_weight=sparsity_weight,
                                kernel_background=kernel_background, kernel_init=kernel_init,
                                kernel_strength=kernel_strength, attention_window=attention_window)
        self._guidance_scale = None
        self._num_timesteps = 0
        self._interrupt = False

    @property
    def guidance_scale(self) -> float:
        """The step-size multiplier of the current (or last) call; the saved default before any call."""
        return float(self.config.guidance_scale) if self._guidance_scale is None else self._guidance_scale

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # ------------------------------------------------------------------ inputs
    @staticmethod
    def _check_number(name: str, value, minimum: float = 0.0) -> None:
        try:
            ok = math.isfinite(float(value)) and float(value) >= minimum
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")

    def _unet_multiple(self, unet: UNet2DModel) -> int:
        return 2 ** (len(unet.config.block_out_channels) - 1)

    def check_inputs(self, measurement, kernel_size, blur_model, step_size, num_inference_steps, num_particles,
                     output_type, guidance_scale, sparsity_weight, boundary_margin, callback_on_step_end_tensor_inputs):
        check_scheduler(self.scheduler)
        if blur_model not in BLUR_MODELS:
            raise ValueError(f"blur_model must be one of {BLUR_MODELS}, got {blur_model!r}")
        if step_size not in STEP_SIZES:
            raise ValueError(f"step_size must be one of {STEP_SIZES}, got {step_size!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        if num_inference_steps > self.scheduler.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps {num_inference_steps} exceeds the scheduler's "
                             f"{self.scheduler.config.num_train_timesteps} training steps")
        if not isinstance(num_particles, int) or isinstance(num_particles, bool) or num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        self._check_number("guidance_scale", guidance_scale)
        self._check_number("sparsity_weight", sparsity_weight)
        background = getattr(self.config, "kernel_background", "median")
        if background not in KERNEL_BACKGROUNDS:
            raise ValueError(f"kernel_background must be one of {KERNEL_BACKGROUNDS}, got {background!r}")
        if isinstance(boundary_margin, (bool, np.bool_)) or not isinstance(boundary_margin, (int, np.integer)) \
                or boundary_margin < 0:
            raise ValueError(f"boundary_margin must be an int >= 0, got {boundary_margin!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} not in {self._callback_tensor_inputs}")
        unet_channels = self.unet.config.in_channels
        if measurement.shape[1] != unet_channels and not (measurement.shape[1] == 1 and unet_channels == 3):
            raise ValueError(f"image has {measurement.shape[1]} channels but the UNet expects {unet_channels}")
        if self.kernel_unet.config.in_channels != 1:
            raise ValueError(f"kernel_unet must take 1 channel, it takes {self.kernel_unet.config.in_channels}")
        multiple = self._unet_multiple(self.kernel_unet)
        if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 1 or kernel_size % multiple:
            raise ValueError(f"kernel_size must be a positive multiple of {multiple} (the kernel UNet's levels), "
                             f"got {kernel_size!r}")
        height, width = measurement.shape[-2:]
        if kernel_size > height or kernel_size > width:
            largest = min(height, width) // multiple * multiple
            remedy = (f"pass a kernel_size that is a multiple of {multiple} and at most {min(height, width)} (e.g. "
                      f"{largest})" if largest else f"the image must be at least {multiple} px a side")
            raise ValueError(f"kernel_size {kernel_size} is larger than the image ({height}x{width}); {remedy}")
        self._check_variance(self.unet, "unet", 2 * unet_channels)
        self._check_variance(self.kernel_unet, "kernel_unet", 2)

    def _check_variance(self, unet: UNet2DModel, name: str, learned_channels: int) -> None:
        learned = getattr(self.scheduler.config, "variance_type", None) in ("learned", "learned_range")
        if learned and unet.config.out_channels != learned_channels:
            raise ValueError(f"the scheduler learns the variance but {name} has {unet.config.out_channels} output "
                             f"channels (needs {learned_channels}); use a fixed-variance scheduler")

    def prepare_latents(self, shape, generator, device, dtype, latents=None, name: str = "latents") -> torch.Tensor:
        """``N(0, I)`` noise of ``shape``, or the given ``latents`` (checked)."""
        return prepare_noise(shape, generator, device, dtype, latents, name)

    _expand_generator = staticmethod(expand_generator)

    # ------------------------------------------------------------------ one step of Algorithm 1
    def step_size_at(self, t, step_size: str) -> float:
        """``ζ_t``: ``guidance_scale · √ᾱ_t`` (public code) or the constant ``guidance_scale`` (paper)."""
        if step_size == "constant":
            return self.guidance_scale
        return self.guidance_scale * float(self.scheduler.alphas_cumprod[int(t)]) ** 0.5

    def sparsity_term(self, predictions: dict, sparsity_weight: float):
        """The ℓ1 prior ``λ‖u‖₁`` on the unnormalised kernel ``u = (k̃0 + 1)/2`` as a regulariser, or ``None``.

        The public code puts ``‖k̂0‖₁`` on the sum-1 kernel, where it is identically 1 (zero gradient);
        ``u`` keeps its scale, so the prior does push towards sparse kernels.
        """
        if sparsity_weight <= 0:
            return None
        unnormalized = unnormalized_kernel(predictions["kernel"].x0)
        return lambda kernel: sparsity_weight * kernel_l1(unnormalized)

    def operator_params(self, predictions: dict) -> tuple[torch.Tensor, ...]:
        """The operator's parameters from the chains' x̂0: the sum-1 kernel ``k̂0``, normalised per batch element."""
        return (self.kernel_from_model_range(predictions["kernel"].x0),)

    def kernel_from_model_range(self, image: torch.Tensor) -> torch.Tensor:
        """Sum-1 kernels of kernel-chain images, per batch element, with the configured background handling."""
        return model_range_to_kernel(image, getattr(self.config, "kernel_background", "median"))

    def chains(self) -> dict[str, UNet2DModel]:
        """The diffusion chains run in parallel, by name: image and kernel."""
        return {"latents": self.unet, "kernel": self.kernel_unet}

    def attention_window(self, chain: str) -> int | None:
        """The attention window (pixels) of a chain: ``config.attention_window`` resolved for its UNet (a folder
        saved before the setting existed gets the default, ``"auto"``); ``None`` (global) for the kernel chain."""
        if chain == "kernel":
            return None
        return resolve_attention_window(self.config.attention_window, self.chains()[chain])

    def denoising_step(self, problem: BlindDPSProblem, denoisers: dict, states: dict, t, step_kwargs: dict):
        """Algorithm 1, one step: unguided DDPM step of every chain, then one joint gradient step (Eq. 10).

        Returns the new states and the per-element kernel estimate ``k̂0`` (operator convention), detached.
        """
        with torch.enable_grad():
            x_t = {name: state.detach().requires_grad_(True) for name, state in states.items()}
            predictions = {name: denoisers[name](x_t[name], t, step=True, **step_kwargs) for name in x_t}
            check_finite(*(prediction.x0 for prediction in predictions.values()))
            params = self.operator_params(predictions)
            names = list(x_t)
            result = dps_joint_gradient(
                problem.measurement, predictions["latents"].x0, params, [x_t[n] for n in names],
                operator=problem.operator, kernel_regularizer=self.sparsity_term(predictions, problem.sparsity_weight),
            )
        zeta = self.step_size_at(t, problem.step_size)
        new_states = {n: (predictions[n].prev_sample - zeta * g).detach() for n, g in zip(names, result.gradients)}
        return new_states, tuple(p.detach() for p in params)

    def held_kernel_step(self, problem: BlindDPSProblem, denoisers: dict, states: dict, t, t_next, kernel_noise,
                         step_kwargs: dict):
        """A step with the kernel held at the start kernel ``k_s``: Eq. 10 for the image chain with ``k̂0 = k_s``;
        the kernel chain's state becomes ``k_s`` diffused to ``t_next``, ``√ᾱ·k̃_s + √(1 − ᾱ)·ε``."""
        with torch.enable_grad():
            x_t = states["latents"].detach().requires_grad_(True)
            prediction = denoisers["latents"](x_t, t, step=True, **step_kwargs)
            result = dps_joint_gradient(problem.measurement, prediction.x0, (problem.start_kernel,), [x_t],
                                        operator=problem.operator)
        zeta = self.step_size_at(t, problem.step_size)
        alpha_bar = float(self.scheduler.alphas_cumprod[int(t_next)])
        return {"latents": (prediction.prev_sample - zeta * result.gradients[0]).detach(),
                "kernel": alpha_bar ** 0.5 * problem.start_state + (1 - alpha_bar) ** 0.5 * kernel_noise}

    @staticmethod
    def is_correlation(operator: LinearOperator) -> bool:
        """Whether ``operator`` (possibly masked or composed) blurs by correlation, i.e. holds flipped kernels."""
        inner = getattr(operator, "operator", operator)
        blur = getattr(inner, "blur", inner)
        return getattr(blur, "kernel_convention", "convolution") == "correlation"

    def output_kernel(self, kernel_state: torch.Tensor, operator: LinearOperator) -> torch.Tensor:
        """The sum-1 kernel of a kernel-chain state in the package convention (true convolution, centre ``k // 2``)."""
        kernel = self.kernel_from_model_range(kernel_state.float())
        return flip_kernel(kernel) if self.is_correlation(operator) else kernel

    # ------------------------------------------------------------------ a start kernel (beyond the paper)
    def resolve_kernel_start(self, kernel_init, kernel_strength) -> tuple[Any, float]:
        """``(kernel_init, kernel_strength)`` with the config's defaults, checked; a ``"noise"`` start runs the kernel
        chain at every step (a configured ``kernel_strength`` is then ignored, a passed one below 1 is an error)."""
        strength = getattr(self.config, "kernel_strength", 1.0) if kernel_strength is None else kernel_strength
        kernel_init = getattr(self.config, "kernel_init", "noise") if kernel_init is None else kernel_init
        if isinstance(kernel_init, str):
            if kernel_init not in KERNEL_INITS:
                raise ValueError(f"kernel_init must be one of {KERNEL_INITS} or a kernel, got {kernel_init!r}")
            if kernel_init == "noise":
                if kernel_strength is not None and kernel_strength != 1:
                    raise ValueError(f"kernel_strength={kernel_strength!r} holds a start kernel for the first steps, but "
                                     "kernel_init='noise' has none: pass kernel_init='sparse' or a kernel")
                return "noise", 1.0
            if self.kernel_estimator is None:
                raise ValueError("kernel_init='sparse' needs the kernel_estimator component, e.g. "
                                 "KernelEstimator.from_pretrained(diffusers_blind.DEFAULT_MODEL, subfolder='kernel_estimator')")
        try:
            ok = not isinstance(strength, bool) and 0 < float(strength) <= 1
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"kernel_strength must be a number in (0, 1], got {strength!r}")
        return kernel_init, float(strength)

    def start_kernel(self, measurement: torch.Tensor, kernel_init, kernel_size: int, noise: torch.Tensor,
                     operator) -> torch.Tensor:
        """The start kernel of every image, ``(B, 1, k, k)``, sum 1, in the operator's convention (``noise``: the
        noise std per image in ``[0, 1]`` units, for the sparse start)."""
        if isinstance(kernel_init, str):
            kernel = self.sparse_start_kernel(measurement, kernel_size, noise)
        else:
            kernel = prepare_kernel(kernel_init, measurement.shape[0], measurement.device, warn_sum=False)
            if tuple(kernel.shape[-2:]) != (kernel_size, kernel_size):
                raise ValueError(f"kernel_init is {tuple(kernel.shape[-2:])} but kernel_size is {kernel_size}")
            kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True)
        return flip_kernel(kernel) if self.is_correlation(operator) else kernel

    def sparse_start_kernel(self, measurement: torch.Tensor, kernel_size: int, noise: torch.Tensor) -> torch.Tensor:
        """:class:`SparseKernelInitializer` with this pipeline's ``kernel_estimator`` on the unpadded photo.

        The initializer works at odd sizes; an even ``k`` is estimated at ``k + 1`` and its last row and column
        dropped (or at ``k − 1`` and zero-padded before its first, on an image too small for ``k + 1``), so the
        centre stays at ``k // 2``.
        """
        initializer = SparseKernelInitializer(self.kernel_estimator)
        if kernel_size % 2:
            return initializer(measurement.float(), kernel_size, noise)
        if kernel_size + 1 <= min(measurement.shape[-2:]):
            kernel = initializer(measurement.float(), kernel_size + 1, noise)[..., :kernel_size, :kernel_size]
        else:
            kernel = F.pad(initializer(measurement.float(), kernel_size - 1, noise), (1, 0, 1, 0))
        return kernel / kernel.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)

    # ------------------------------------------------------------------ outputs
    def postprocess_images(self, latents, window, batch: int, num_particles: int, grayscale: bool, output_type: str):
        """Crop, average the particles, convert: ``(images, uncertainty, particles)``."""
        samples = crop_window(to_unit_range(latents), window)
        if not torch.isfinite(samples).all():
            raise RuntimeError("The sampler diverged (non-finite values): lower guidance_scale.")
        if grayscale:
            samples = samples.mean(1, keepdim=True)
        samples = samples.reshape(batch, num_particles, *samples.shape[1:])
        std = samples.std(1, unbiased=False).mean(1, keepdim=True) if num_particles > 1 else None
        images = tensor_to_output(samples.mean(1), output_type)
        if output_type == "pt":
            return images, std.cpu() if std is not None else None, samples.cpu()
        uncertainty = std[:, 0].cpu().numpy() if std is not None else None
        return images, uncertainty, samples.permute(0, 1, 3, 4, 2).cpu().numpy()

    @staticmethod
    def postprocess_kernel(kernel: torch.Tensor, batch: int, num_particles: int, output_type: str):
        """Average the particles' sum-1 kernels: ``(B, 1, k, k)`` tensor for ``"pt"`` and ``"latent"``, else a
        ``(B, k, k)`` array."""
        kernel = kernel.reshape(batch, num_particles, *kernel.shape[1:]).mean(1).detach().float().cpu()
        return kernel if output_type in ("pt", "latent") else kernel[:, 0].numpy()

    # ------------------------------------------------------------------ shared call machinery
    def _prepare(self, image, kernel_size, blur_model, step_size, num_inference_steps, num_particles, output_type,
                 guidance_scale, sparsity_weight, boundary_margin, callback_on_step_end_tensor_inputs):
        measurement = to_tensor(image)
        kernel_size = self.default_kernel_size() if kernel_size is None else kernel_size
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        sparsity_weight = self.config.sparsity_weight if sparsity_weight is None else sparsity_weight
        self.check_inputs(measurement, kernel_size, blur_model, step_size, num_inference_steps, num_particles,
                          output_type, guidance_scale, sparsity_weight, boundary_margin,
                          callback_on_step_end_tensor_inputs)
        self._guidance_scale = float(guidance_scale)
        self._interrupt = False
        return measurement, kernel_size, float(sparsity_weight)

    def default_kernel_size(self) -> int:
        """The kernel prior's training size, ``kernel_unet.config.sample_size`` (an int or a square pair)."""
        size = self.kernel_unet.config.sample_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2 or size[0] != size[1]:
                raise ValueError(f"kernel_unet.config.sample_size {tuple(size)} is not square: pass kernel_size")
            size = size[0]
        return int(size)

    def _canvas(self, measurement, num_particles: int, boundary_margin: int, operator: LinearOperator):
        """Pad to the UNet multiple (plus a margin), go to ``[−1, 1]``, repeat per particle; mask the data term to the image."""
        grayscale = measurement.shape[1] == 1 and self.unet.config.in_channels == 3
        if grayscale:
            measurement = measurement.expand(-1, 3, -1, -1)
        padded, window = pad_to_multiple(measurement, self._unet_multiple(self.unet), boundary_margin)
        y = (2 * padded - 1).repeat_interleave(num_particles, dim=0)
        if padded.shape[-2:] != measurement.shape[-2:]:
            mask = torch.zeros_like(padded[:1, :1])
            top, left, height, width = window
            mask[..., top: top + height, left: left + width] = 1
            operator, y = MaskedOperator(operator, mask), y * mask
        return y, operator, window, grayscale

    def _run(self, problem, denoisers, states, step_kwargs, callback_on_step_end, tensor_inputs, progress_bar):
        """The denoising loop with callbacks; returns the final states and the last ``k̂0`` params."""
        params = None
        timesteps = self.scheduler.timesteps
        kernel_noise = states["kernel"] if problem.hold_steps else None  # ε of the held kernel chain
        for i, t in enumerate(timesteps):
            if self.interrupt:
                continue
            if i < problem.hold_steps:
                states = {**states, **self.held_kernel_step(problem, denoisers, states, t, timesteps[i + 1], kernel_noise,
                                                            step_kwargs)}
            else:
                states, params = self.denoising_step(problem, denoisers, states, t, step_kwargs)
            if callback_on_step_end is not None:
                available = self.callback_tensors(states, problem)
                outputs = callback_outputs(callback_on_step_end(self, i, t, {name: available[name] for name in tensor_inputs}))
                for name, chain in self.callback_latent_names().items():
                    states[chain] = callback_replacement(outputs, name, states[chain])
            progress_bar.update()
        return states, params

    @staticmethod
    def callback_latent_names() -> dict[str, str]:
        """Callback tensor name → chain name, for the states a callback may replace."""
        return {"latents": "latents", "kernel_latents": "kernel"}

    def callback_tensors(self, states: dict, problem: BlindDPSProblem) -> dict:
        """Every tensor a step-end callback may ask for (``kernel`` is the current sum-1 estimate, read-only)."""
        tensors = {name: states[chain] for name, chain in self.callback_latent_names().items()}
        tensors["kernel"] = self.output_kernel(states["kernel"], problem.operator)
        return tensors

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: int = 250,
        blur_model: str = "correlation",
        step_size: str = "sqrt_alpha_bar",
        guidance_scale: float | None = None,
        sparsity_weight: float | None = None,
        kernel_size: int | None = None,
        num_particles: int = 1,
        boundary_margin: int = 0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        kernel_latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        kernel_init: str | torch.Tensor | np.ndarray | None = None,
        kernel_strength: float | None = None,
        sigma: float | str = "auto",
        precision: str | None = None,
    ):
        r"""Deblur ``image`` and estimate its blur kernel with BlindDPS.

        Args:
            image: blurry image(s): PIL, numpy ``(H, W[, C])``/``(B, H, W, C)`` or torch ``(C, H, W)``/``(B, C, H, W)``,
                values in ``[0, 1]`` (uint8 is rescaled); RGB or grayscale; any ``H × W``.
            num_inference_steps: diffusion steps; below the scheduler's 1000 the schedule is respaced. The paper runs
                1000; the default 250 is what a CPU affords. ``guidance_scale`` has to be tuned with the step count
                (the shipped folder's 5 was chosen for 250 steps with its image prior; docs/blind_dps.md).
            blur_model: the measurement model ``A``: ``"correlation"`` (the paper: zero-padded correlation in ``[−1, 1]``,
                i.e. a mid-grey border), ``"circular"`` or ``"reflect"`` (true convolution, periodic / mirrored border).
            step_size: ``"sqrt_alpha_bar"`` (``ζ_t = guidance_scale·√ᾱ_t``, the public code) or ``"constant"``
                (``ζ_t = guidance_scale``, the paper's ζ).
            guidance_scale: multiplier of the step size (default: ``config.guidance_scale``).
            sparsity_weight: ``λ`` of the ℓ1 prior on the unnormalised kernel (default: ``config.sparsity_weight``; 0 = off).
            kernel_size: size of the estimated kernel, a multiple of the kernel UNet's down-sampling factor
                (default: ``kernel_unet.config.sample_size``, the size the prior was trained at).
            num_particles: ``n`` posterior samples per image (each with its own kernel); the outputs average them.
            boundary_margin: pixels of mirrored canvas around the image; the data term is measured on the image only,
                so a margin of ``kernel_size // 2`` makes the result independent of the boundary model.
            eta: DDIM's ``η`` (ignored by DDPM).
            generator: a ``torch.Generator``, or a list with one per image (or per particle).
            latents: the image chain's initial noise, ``(B·n, C, H', W')`` on the padded canvas.
            kernel_latents: the kernel chain's initial noise, ``(B·n, 1, k, k)``.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (raw image-chain state in ``[−1, 1]``; the
                kernels then come as a ``(B, 1, k, k)`` tensor, as for ``"pt"``).
            return_dict: return a [`DeblurPipelineOutput`] instead of a tuple ``(images, kernels)``.
            callback_on_step_end: ``fn(pipe, step, timestep, tensors)`` after each step; may return new ``latents`` and
                ``kernel_latents`` (``kernel``, the current sum-1 estimate, is read-only).
            callback_on_step_end_tensor_inputs: which of ``latents``, ``kernel_latents``, ``kernel`` the callback gets.
            kernel_init: how the kernel chain starts (default: ``config.kernel_init``): ``"noise"`` (the paper: pure
                noise, the chain runs every step), ``"sparse"`` (the package's sparse-prior estimate, as Fast EM starts;
                needs the ``kernel_estimator`` component) or a kernel (``(k, k)`` or ``(1|B, 1, k, k)``, true
                convolution, centre ``k // 2``). A start kernel is held for the first ``1 − kernel_strength`` of the
                steps (the kernel chain then follows it, whatever a callback returns for it).
            kernel_strength: fraction of the steps, in ``(0, 1]``, that the kernel chain runs after a start kernel
                (default: ``config.kernel_strength``).
            sigma: the noise std in 8-bit levels, or ``"auto"`` (estimated from the image); only the ``"sparse"``
                start uses it (BlindDPS's own step needs no noise level).
            precision: the UNets' arithmetic: ``None`` / ``"float32"`` (default), ``"bfloat16"`` or ``"float16"``
                autocast of their forward and backward passes (accelerate's ``"bf16"`` / ``"fp16"`` / ``"no"`` too), or
                ``"auto"``: bfloat16 where the device computes it natively. The chains, the measurement model and
                the step stay in the pipeline's dtype.

        Examples:

        Returns:
            [`DeblurPipelineOutput`] with ``images`` and ``kernels`` (sum 1, true convolution, centre ``k // 2``),
            or the tuple ``(images, kernels)``.
        """
        return self._sample(
            image, num_inference_steps, blur_model, step_size, guidance_scale, sparsity_weight, kernel_size,
            num_particles, boundary_margin, eta, generator, {"latents": latents, "kernel": kernel_latents},
            output_type, return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs,
            kernel_init=kernel_init, kernel_strength=kernel_strength, sigma=sigma, precision=precision,
        )

    def measurement_operator(self, blur_model: str) -> LinearOperator:
        """The forward model ``A`` of this pipeline (before masking to the image window)."""
        return blur_operator(blur_model)

    def initial_states(self, n: int, canvas: tuple[int, int], kernel_size: int, generator, device, given: dict) -> dict:
        """``x_T`` of every chain: the given tensors (shape-checked) or ``N(0, I)`` noise, drawn chain by chain."""
        shapes = {"latents": (n, self.unet.config.in_channels, *canvas), "kernel": (n, 1, kernel_size, kernel_size)}
        dtypes = {"latents": self.unet.dtype, "kernel": self.kernel_unet.dtype}
        return {name: self.prepare_latents(shapes[name], generator, device, dtypes[name], given.get(name),
                                           self.latents_argument(name)) for name in shapes}

    def latents_argument(self, chain: str) -> str:
        """The ``__call__`` argument that sets a chain's initial noise."""
        return {chain_name: arg for arg, chain_name in self.callback_latent_names().items()}[chain]

    def build_output(self, states, operator, window, batch, num_particles, grayscale, output_type, return_dict):
        """Step 5: the final image chain and the sum-1 kernel of the final kernel chain."""
        kernels = self.postprocess_kernel(self.output_kernel(states["kernel"], operator), batch, num_particles,
                                          output_type)
        if output_type == "latent":
            images, uncertainty, particles = states["latents"], None, None
        else:
            images, uncertainty, particles = self.postprocess_images(states["latents"], window, batch, num_particles,
                                                                     grayscale, output_type)
        if not return_dict:
            return images, kernels
        return DeblurPipelineOutput(images=images, kernels=kernels, uncertainty=uncertainty, particles=particles)

    def _sample(self, image, num_inference_steps, blur_model, step_size, guidance_scale, sparsity_weight, kernel_size,
                num_particles, boundary_margin, eta, generator, given_latents, output_type, return_dict,
                callback_on_step_end, callback_on_step_end_tensor_inputs, kernel_init=None, kernel_strength=None,
                sigma="auto", precision=None):
        """The body of ``__call__`` shared by the deblurring and turbulence pipelines."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        if callback_on_step_end_tensor_inputs is None:
            callback_on_step_end_tensor_inputs = []

        # 1. Check inputs (numpy integers are read as ints, as everywhere in diffusers)
        num_inference_steps, num_particles, kernel_size, boundary_margin = (
            int(v) if isinstance(v, np.integer) else v
            for v in (num_inference_steps, num_particles, kernel_size, boundary_margin))
        measurement, kernel_size, sparsity_weight = self._prepare(
            image, kernel_size, blur_model, step_size, num_inference_steps, num_particles, output_type,
            guidance_scale, sparsity_weight, boundary_margin, callback_on_step_end_tensor_inputs)
        requested_init = kernel_init
        kernel_init, kernel_strength = self.resolve_kernel_start(kernel_init, kernel_strength)
        noise = prepare_sigma(sigma, measurement, warn_low=False)  # checked even when the start does not use it
        autocast_dtype = resolve_precision(precision, self._execution_device)

        # 2. The measurement on the padded canvas in [-1, 1], and the (masked) measurement model
        boundary_margin = int(boundary_margin)
        device = self._execution_device
        batch = measurement.shape[0]
        y, operator, window, grayscale = self._canvas(measurement.to(device), num_particles, boundary_margin,
                                                      self.measurement_operator(blur_model))

        # 3. Timesteps, the start kernel (if any), denoisers, initial noise of every chain
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        start, hold = None, 0
        if not (isinstance(kernel_init, str) and kernel_init == "noise"):
            hold = min(round((1 - kernel_strength) * self._num_timesteps), self._num_timesteps - 1)
            given = None if isinstance(kernel_init, str) else self.start_kernel(
                measurement.to(device), kernel_init, kernel_size, noise.to(device), operator)  # checked first
            if hold == 0 and requested_init is not None:
                raise ValueError(
                    f"kernel_strength={kernel_strength:g} over {self._num_timesteps} steps holds the start kernel for no "
                    "step, so kernel_init would be ignored: pass a kernel_strength below 1 (e.g. 0.5) or more steps")
            if hold:  # the sparse estimate only runs when a step uses it
                start = given if given is not None else self.start_kernel(
                    measurement.to(device), kernel_init, kernel_size, noise.to(device), operator)
                start = start.repeat_interleave(num_particles, dim=0)
        start_state = None if start is None else kernel_to_model_range(start).to(self.kernel_unet.dtype)
        problem = BlindDPSProblem(y, operator, step_size, sparsity_weight, start, hold, start_state)
        generator = self._expand_generator(generator, batch, num_particles)
        denoisers = {name: TiledUNetDenoiser(unet, self.scheduler, None, autocast_dtype, self.attention_window(name))
                     for name, unet in self.chains().items()}
        step_kwargs = denoisers["latents"].step_kwargs(generator, eta)
        states = self.initial_states(batch * num_particles, tuple(y.shape[-2:]), kernel_size, generator, device,
                                     given_latents)

        # 4. Denoising loop (Algorithm 1)
        with self.progress_bar(total=self._num_timesteps) as progress_bar:
            states, _ = self._run(problem, denoisers, states, step_kwargs, callback_on_step_end,
                                  callback_on_step_end_tensor_inputs, progress_bar)
        self.maybe_free_model_hooks()

        # 5. Outputs (with the noise level the sparse start read)
        output = self.build_output(states, operator, window, batch, num_particles, grayscale, output_type, return_dict)
        if return_dict and start is not None and isinstance(kernel_init, str) and kernel_init == "sparse":
            output.sigma = [round(float(v) * 255, 4) for v in noise]
        return output
