"""BlindDPS for atmospheric turbulence: image, kernel and tilt-field chains run in parallel (BlindDPS §4)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from ...image_processor import ImageInput, crop_window
from ...models.windowed_attention import attention_window_setting
from ...ops.operators import LinearOperator, TiltBlurOperator, TiltOperator
from ..pipeline_utils import DeblurPipelineOutput
from .pipeline_blind_dps_deblur import BlindDPSPipeline, blur_operator


@dataclass
class BlindDPSTurbulencePipelineOutput(DeblurPipelineOutput):
    """A [`DeblurPipelineOutput`] with the estimated tilt fields.

    Args:
        tilts: the tilt field per image in pixels (channel 0 horizontal, 1 vertical), averaged over particles:
            ``(B, 2, H, W)`` tensor for ``"pt"``, else a numpy array of that shape; for ``"latent"`` a
            ``(B, 2, H', W')`` tensor on the padded canvas.
    """

    tilts: np.ndarray | torch.Tensor | None = None


class BlindDPSTurbulencePipeline(BlindDPSPipeline):
    r"""Restoration through turbulence with BlindDPS: ``y = k ⊛ T_d(x) + n`` with unknown image, kernel and tilt.

    Three chains step in parallel (Algorithm 1 with a third prior): the image ``x_t``, the kernel ``k_t`` and the
    tilt field ``d_t``. Each step all three move against the gradient of one data term
    ``‖y − k̂0 ⊛ T_{d̂0}(x̂0)‖₂`` (no sparsity prior, as in the paper's turbulence experiments), with
    ``ζ_t = guidance_scale·√ᾱ_t`` or the constant ``guidance_scale``.

    The tilt prior works on fields scaled to ``[−1, 1]``: ``d = tilt_scale · d̃`` pixels. The public code
    clips ``d̃`` to ``[−1, 1]`` and uses it in pixels, so its estimate cannot exceed 1 px while its simulated
    tilts reach 2.5 px; ``tilt_scale = 2.5`` covers the whole simulated range (train the tilt prior on
    ``d / tilt_scale``, as ``scripts/train_tilt_prior.py`` does).

    Args:
        unet ([`UNet2DModel`]): image prior (ε-prediction, ``[−1, 1]``).
        kernel_unet ([`UNet2DModel`]): 1-channel kernel prior (see [`BlindDPSPipeline`]).
        tilt_unet ([`UNet2DModel`]): 2-channel tilt-field prior (2 or 4 output channels); fully convolutional
            UNets run at any canvas size that is a multiple of their down-sampling factor.
        scheduler ([`DDPMScheduler`] or [`DDIMScheduler`]): drives the three chains.
        guidance_scale (`float`): default step-size multiplier.
        tilt_scale (`float`): pixels per unit of the tilt prior's range.
        kernel_background (`str`): as in [`BlindDPSPipeline`].
        attention_window (`int`, `"auto"` or `None`): as in [`BlindDPSPipeline`] (the image and tilt chains).
    """

    model_cpu_offload_seq = "unet->kernel_unet->tilt_unet"
    _callback_tensor_inputs = ["latents", "kernel_latents", "kernel", "tilt_latents", "tilt"]

    def __init__(
        self,
        unet: UNet2DModel,
        kernel_unet: UNet2DModel,
        tilt_unet: UNet2DModel,
        scheduler: DDPMScheduler | DDIMScheduler,
        guidance_scale: float = 1.0,
        tilt_scale: float = 2.5,
        kernel_background: str = "median",
        attention_window: int | str | None = "auto",
    ):
        DiffusionPipeline.__init__(self)
        attention_window = attention_window_setting(attention_window)
        self.register_modules(unet=unet, kernel_unet=kernel_unet, tilt_unet=tilt_unet, scheduler=scheduler)
        self.register_to_config(guidance_scale=guidance_scale, tilt_scale=tilt_scale,
                                kernel_background=kernel_background, attention_window=attention_window)
        self._guidance_scale = None
        self._num_timesteps = 0
        self._interrupt = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As ``DiffusionPipeline.from_pretrained``; a ``BlindDPSPipeline`` folder (local or on the Hub) that holds a
        ``tilt_unet/`` subfolder (the package's default BlindDPS folder does) also loads as a turbulence pipeline:
        the tilt UNet comes from that subfolder (with the same dtype, variant, safetensors and device choices as
        the other UNets) and ``tilt_scale`` from its ``training_info.json``. ``BlindDPSPipeline.save_pretrained``
        writes no tilt prior (it has none): save a turbulence pipeline to keep one."""
        folder = Path(str(cls.local_folder(pretrained_model_name_or_path, kwargs)))
        index = folder / "model_index.json"
        loaded_here = False
        if "tilt_unet" not in kwargs and index.is_file() and "tilt_unet" not in json.loads(index.read_text()):
            if not (folder / "tilt_unet" / "config.json").is_file():
                raise ValueError(f"{folder} has no tilt prior (neither a tilt_unet entry in model_index.json nor a "
                                 "tilt_unet/ folder): pass tilt_unet=UNet2DModel.from_pretrained(...)")
            kwargs["tilt_unet"] = UNet2DModel.from_pretrained(folder / "tilt_unet", **_tilt_loading_arguments(kwargs))
            loaded_here = True
            info = folder / "tilt_unet" / "training_info.json"
            if "tilt_scale" not in kwargs and info.is_file():
                scale = json.loads(info.read_text()).get("tilt_scale")
                if scale is not None:
                    kwargs["tilt_scale"] = float(scale)
        pipe = super().from_pretrained(folder, **kwargs)
        if loaded_here and kwargs.get("device_map") is not None:
            pipe.tilt_unet.to(pipe.kernel_unet.device)  # placed beside the chains diffusers placed
        return pipe

    # a BlindDPSPipeline folder's entries with no meaning here (no sparsity term; the kernel chain starts from
    # noise): dropped without a warning
    _blind_dps_only = ("sparsity_weight", "kernel_estimator", "kernel_init", "kernel_strength")

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k not in cls._blind_dps_only}, **kwargs)

    # ------------------------------------------------------------------ chains and operator
    def chains(self) -> dict[str, UNet2DModel]:
        return {"latents": self.unet, "kernel": self.kernel_unet, "tilt": self.tilt_unet}

    def measurement_operator(self, blur_model: str) -> LinearOperator:
        """Tilt (bilinear, edge pixels repeated past the border) then blur by ``blur_model``."""
        return TiltBlurOperator(blur=blur_operator(blur_model), tilt=TiltOperator("border"))

    def operator_params(self, predictions: dict) -> tuple[torch.Tensor, ...]:
        """``(k̂0, d̂0)``: the per-element sum-1 kernel and the tilt field in pixels, ``tilt_scale · d̃0``."""
        (kernel,) = super().operator_params(predictions)
        return kernel, float(self.config.tilt_scale) * predictions["tilt"].x0

    def sparsity_term(self, predictions: dict, sparsity_weight: float):
        return None

    @staticmethod
    def callback_latent_names() -> dict[str, str]:
        return {"latents": "latents", "kernel_latents": "kernel", "tilt_latents": "tilt"}

    def callback_tensors(self, states: dict, problem) -> dict:
        tensors = super().callback_tensors(states, problem)
        tensors["tilt"] = self.tilt_field(states["tilt"])
        return tensors

    def tilt_field(self, tilt_state: torch.Tensor) -> torch.Tensor:
        """A tilt-chain state as a field in pixels: ``tilt_scale · clip(d̃, −1, 1)``."""
        return float(self.config.tilt_scale) * tilt_state.clamp(-1, 1)

    # ------------------------------------------------------------------ inputs and outputs
    def check_inputs(self, measurement, *args, **kwargs):
        super().check_inputs(measurement, *args, **kwargs)
        self._check_number("tilt_scale", self.config.tilt_scale, minimum=1e-6)
        if self.tilt_unet.config.in_channels != 2:
            raise ValueError(f"tilt_unet must take 2 channels (a tilt field), it takes {self.tilt_unet.config.in_channels}")
        self._check_variance(self.tilt_unet, "tilt_unet", 4)
        multiple = self._unet_multiple(self.tilt_unet)
        if self._unet_multiple(self.unet) % multiple:
            raise ValueError(f"the tilt UNet needs canvas sizes divisible by {multiple}, the image UNet pads to "
                             f"multiples of {self._unet_multiple(self.unet)}")

    def initial_states(self, n, canvas, kernel_size, generator, device, given) -> dict:
        states = super().initial_states(n, canvas, kernel_size, generator, device, given)
        states["tilt"] = self.prepare_latents((n, 2, *canvas), generator, device, self.tilt_unet.dtype,
                                              given.get("tilt"), "tilt_latents")
        return states

    def build_output(self, states, operator, window, batch, num_particles, grayscale, output_type, return_dict):
        images, kernels = super().build_output(states, operator, window, batch, num_particles, grayscale, output_type,
                                               return_dict=False)
        tilts = self.tilt_field(states["tilt"]) if output_type == "latent" else crop_window(
            self.tilt_field(states["tilt"]), window)
        tilts = tilts.reshape(batch, num_particles, *tilts.shape[1:]).mean(1).detach().float().cpu()
        if output_type not in ("pt", "latent"):
            tilts = tilts.numpy()
        if not return_dict:
            return images, kernels, tilts
        out = super().build_output(states, operator, window, batch, num_particles, grayscale, output_type, True)
        return BlindDPSTurbulencePipelineOutput(images=out.images, kernels=out.kernels, uncertainty=out.uncertainty,
                                                particles=out.particles, tilts=tilts)

    # ------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: int = 250,
        blur_model: str = "correlation",
        step_size: str = "sqrt_alpha_bar",
        guidance_scale: float | None = None,
        kernel_size: int | None = None,
        num_particles: int = 1,
        boundary_margin: int = 0,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        kernel_latents: torch.Tensor | None = None,
        tilt_latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        precision: str | None = None,
    ):
        r"""Restore ``image`` degraded by turbulence (tilt then blur) and estimate its kernel and tilt field.

        Arguments as [`BlindDPSPipeline.__call__`] (no sparsity prior), plus ``tilt_latents``: the tilt chain's
        initial noise ``(B·n, 2, H', W')`` on the padded canvas. Callbacks may also read ``tilt_latents`` (and
        replace it) and ``tilt`` (the current field in pixels, read-only).

        Returns:
            [`BlindDPSTurbulencePipelineOutput`] (``images``, ``kernels``, ``tilts``, ...) or
            ``(images, kernels, tilts)``.
        """
        return self._sample(
            image, num_inference_steps, blur_model, step_size, guidance_scale, 0.0, kernel_size, num_particles,
            boundary_margin, eta, generator, {"latents": latents, "kernel": kernel_latents, "tilt": tilt_latents},
            output_type, return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs, precision=precision,
        )


def _tilt_loading_arguments(kwargs: dict) -> dict:
    """The ``UNet2DModel.from_pretrained`` arguments for the tilt UNet out of a pipeline's loading arguments: its
    dtype (a per-component dict is read at ``"tilt_unet"``, then ``"default"``), variant, safetensors choice and
    ``low_cpu_mem_usage``."""
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))  # diffusers 0.42 reads either name
    if isinstance(dtype, dict):
        dtype = dtype.get("tilt_unet", dtype.get("default"))
    chosen = {name: kwargs[name] for name in ("variant", "use_safetensors", "low_cpu_mem_usage") if name in kwargs}
    return {"dtype": dtype, **chosen}
