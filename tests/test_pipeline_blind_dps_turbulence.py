"""BlindDPSTurbulencePipeline (image, kernel and tilt chains) end to end on tiny components."""

import numpy as np
import pytest
import torch
from conftest import smooth_images, tiny_ddpm, tiny_unet
from pipeline_mixin import PipelineTesterMixin

from diffusers_blind import BlindDPSTurbulencePipeline, BlindDPSTurbulencePipelineOutput
from diffusers_blind.ops import TiltBlurOperator, TiltOperator, BlurOperator, gaussian_kernel, tilt_map


def components():
    return {"unet": tiny_unet(), "kernel_unet": tiny_unet(out_channels=1, in_channels=1, sample_size=8, seed=1),
            "tilt_unet": tiny_unet(out_channels=2, in_channels=2, seed=2), "scheduler": tiny_ddpm()}


class TestBlindDPSTurbulenceContract(PipelineTesterMixin):
    pipeline_class = BlindDPSTurbulencePipeline
    round_trip_tolerance = 1e-4  # three chains, each step a gradient through the bilinear warp (3.6e-5 seen)
    extra_bad_inputs = [
        (dict(tilt_latents=torch.zeros(1, 2, 8, 8)), ValueError, "tilt_latents must"),
        (dict(blur_model="gaussian"), ValueError, "blur_model"),
    ]

    def get_dummy_components(self):
        return components()

    def get_dummy_inputs(self, seed=0, batch=1):
        generator = [torch.Generator().manual_seed(seed + i) for i in range(batch)] if batch > 1 else (
            torch.Generator().manual_seed(seed))
        return {"image": smooth_images(batch, 3, 16, 16, seed=seed), "num_inference_steps": 3, "kernel_size": 8,
                "generator": generator, "output_type": "np"}


def make_pipe():
    pipe = BlindDPSTurbulencePipeline(**components())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_end_to_end_on_a_tilted_and_blurred_image():
    x = smooth_images(1, 3, 18, 20, seed=5)
    operator = TiltBlurOperator(BlurOperator("reflect"), TiltOperator())
    y = operator(x, gaussian_kernel(7, 1.0), tilt_map(18, 20, generator=0)).clamp(0, 1)
    pipe = make_pipe()
    seen = {}

    def keep(p, i, t, tensors):
        seen.update(tensors)
        return tensors

    out = pipe(y, num_inference_steps=3, kernel_size=8, blur_model="reflect", output_type="pt",
               callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["tilt_latents", "tilt", "kernel"],
               generator=torch.Generator().manual_seed(0))
    assert isinstance(out, BlindDPSTurbulencePipelineOutput)
    assert out.images.shape == (1, 3, 18, 20) and out.kernels.shape == (1, 1, 8, 8) and out.tilts.shape == (1, 2, 18, 20)
    assert seen["tilt_latents"].shape == (1, 2, 18, 20) and seen["tilt"].abs().max() <= pipe.config.tilt_scale
    torch.testing.assert_close(out.kernels.sum(dim=(-2, -1)), torch.ones(1, 1))
    images, kernels, tilts = pipe(y, num_inference_steps=2, kernel_size=8, return_dict=False, output_type="np")
    assert tilts.shape == (1, 2, 18, 20) and np.isfinite(tilts).all()


def test_tilt_prior_range_is_scaled_to_pixels_and_the_gradient_reaches_the_tilt_chain():
    pipe = make_pipe()
    pipe.register_to_config(tilt_scale=2.5)

    class Prediction:
        def __init__(self, x0):
            self.x0 = x0

    raw_kernel = -torch.ones(1, 1, 8, 8)
    raw_kernel[..., 4, 4] = 1
    kernel, field = pipe.operator_params({"kernel": Prediction(raw_kernel), "tilt": Prediction(torch.ones(1, 2, 4, 4))})
    assert field.max() == 2.5 and kernel.sum() == 1  # the public code is limited to ±1 px here

    # one guided step moves the tilt chain differently from the unguided step
    from diffusers_blind.pipelines.blind_dps.pipeline_blind_dps_deblur import BlindDPSProblem
    from diffusers_blind.pipelines.pipeline_utils import UNetDenoiser

    x = smooth_images(1, 3, 16, 16, seed=1) * 2 - 1
    operator = pipe.measurement_operator("circular")
    y = operator(x, gaussian_kernel(8, 1.0), tilt_map(16, 16, generator=1))
    g = torch.Generator().manual_seed(0)
    states = {"latents": torch.randn(1, 3, 16, 16, generator=g), "kernel": torch.randn(1, 1, 8, 8, generator=g),
              "tilt": torch.randn(1, 2, 16, 16, generator=g)}
    denoisers = {n: UNetDenoiser(u, pipe.scheduler) for n, u in pipe.chains().items()}
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[8]  # late step: x̂0 of the tilt chain is not clipped everywhere
    results = []
    for scale in (0.0, 1.0):
        pipe._guidance_scale = scale
        problem = BlindDPSProblem(y, operator, "constant", 0.0)
        results.append(pipe.denoising_step(problem, denoisers, dict(states), t, {"generator": torch.Generator().manual_seed(0)})[0])
    assert (results[1]["tilt"] - results[0]["tilt"]).abs().max() > 0


def test_save_load_with_three_unets(tmp_path):
    pipe = make_pipe()
    pipe.register_to_config(tilt_scale=2.0)
    pipe.save_pretrained(tmp_path)
    loaded = BlindDPSTurbulencePipeline.from_pretrained(tmp_path)
    assert loaded.config.tilt_scale == 2.0 and loaded.tilt_unet.config.in_channels == 2


def test_loads_from_a_blind_dps_folder_with_a_tilt_unet_subfolder(tmp_path):
    """The package's default layout: a BlindDPSPipeline folder plus tilt_unet/ loads as either pipeline."""
    import json

    from diffusers_blind import BlindDPSPipeline

    parts = components()
    tilt_unet = parts.pop("tilt_unet")
    BlindDPSPipeline(**parts, guidance_scale=3.0).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no tilt prior"):
        BlindDPSTurbulencePipeline.from_pretrained(tmp_path)
    tilt_unet.save_pretrained(tmp_path / "tilt_unet")
    (tmp_path / "tilt_unet" / "training_info.json").write_text(json.dumps({"tilt_scale": 2.0}))
    pipe = BlindDPSTurbulencePipeline.from_pretrained(tmp_path)
    assert type(pipe) is BlindDPSTurbulencePipeline
    assert pipe.config.tilt_scale == 2.0 and pipe.config.guidance_scale == 3.0
    for name, param in tilt_unet.state_dict().items():
        torch.testing.assert_close(pipe.tilt_unet.state_dict()[name], param)
    assert BlindDPSTurbulencePipeline.from_pretrained(tmp_path, tilt_scale=1.0).config.tilt_scale == 1.0
    assert type(BlindDPSPipeline.from_pretrained(tmp_path)) is BlindDPSPipeline


def test_latent_output_gives_kernels_and_tilts_as_tensors():
    pipe = make_pipe()
    kwargs = dict(num_inference_steps=2, kernel_size=8, boundary_margin=1)
    latent = pipe(smooth_images(1, 3, 16, 16), output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs)
    pt = pipe(smooth_images(1, 3, 16, 16), output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs)
    assert latent.kernels.shape == (1, 1, 8, 8) and torch.is_tensor(latent.kernels)
    torch.testing.assert_close(latent.kernels, pt.kernels)
    assert torch.is_tensor(latent.tilts) and latent.tilts.shape == (1, 2, *latent.images.shape[-2:])
    torch.testing.assert_close(latent.tilts[..., 1:17, 1:17], pt.tilts)


def test_the_tilt_prior_loads_in_the_asked_dtype_from_the_shipped_folder():
    import diffusers_blind
    from diffusers_blind import BlindDPSTurbulencePipeline

    for key in ("dtype", "torch_dtype"):
        pipe = BlindDPSTurbulencePipeline.from_pretrained(diffusers_blind.BLIND_DPS_DEFAULT_MODEL, **{key: torch.bfloat16})
        assert {pipe.unet.dtype, pipe.kernel_unet.dtype, pipe.tilt_unet.dtype} == {torch.bfloat16}, key


def test_the_tilt_prior_reads_a_per_component_dtype_and_the_variant(tmp_path):
    import diffusers_blind
    from diffusers_blind import BlindDPSTurbulencePipeline

    folder = diffusers_blind.BLIND_DPS_DEFAULT_MODEL
    pipe = BlindDPSTurbulencePipeline.from_pretrained(folder, torch_dtype={"tilt_unet": torch.bfloat16, "default": torch.float32})
    assert (pipe.unet.dtype, pipe.tilt_unet.dtype) == (torch.float32, torch.bfloat16)
    with pytest.raises((ValueError, OSError), match="fp16"):  # no such variant of the tilt prior is shipped
        BlindDPSTurbulencePipeline.from_pretrained(folder, variant="fp16")
