"""The shipped BlindDPS pipeline folder: loads offline, shares the Fast EM image prior, runs."""

import json
from pathlib import Path

import pytest
import torch

import diffusers_blind
from diffusers_blind import BlindDPSPipeline

FOLDER = Path(diffusers_blind.BLIND_DPS_DEFAULT_MODEL)
pytestmark = pytest.mark.slow


def test_folder_layout_and_card():
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["_class_name"] == "BlindDPSPipeline"
    assert {"unet", "kernel_unet", "scheduler"} <= set(index)
    card = (FOLDER / "README.md").read_text()
    assert "samples.png" in card and (FOLDER / "samples.png").is_file()
    # the image prior and the kernel M-step are the Fast EM default ones, linked rather than duplicated
    for name in ("unet", "kernel_estimator"):
        assert (FOLDER / name).resolve() == (Path(diffusers_blind.DEFAULT_MODEL) / name).resolve()


def test_the_shipped_pipeline_starts_the_kernel_from_the_sparse_estimate():
    """The shipped settings: a sparse start held for the first half of the steps (docs/blind_dps.md)."""
    pipe = BlindDPSPipeline.from_pretrained(FOLDER)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.kernel_init == "sparse" and pipe.config.kernel_strength == 0.5
    assert pipe.kernel_estimator is not None and pipe.kernel_estimator.config.regularization == "pnp"
    k = pipe.kernel_unet.config.sample_size
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 1, k, k, generator=torch.Generator().manual_seed(1))
    seen = []
    out = pipe(image, num_inference_steps=4, blur_model="reflect", sigma=10, output_type="np", kernel_latents=noise,
               generator=torch.Generator().manual_seed(0),
               callback_on_step_end=lambda p, i, t, d: seen.append(d["kernel_latents"].clone()) or {},
               callback_on_step_end_tensor_inputs=["kernel_latents"])
    assert out.sigma == [10.0] and len(seen) == 4
    start = pipe.start_kernel(image, "sparse", k, torch.full((1,), 10 / 255), pipe.measurement_operator("reflect"))
    assert start.shape == (1, 1, k, k) and abs(float(start.sum()) - 1) < 1e-5
    alpha_bar = float(pipe.scheduler.alphas_cumprod[int(pipe.scheduler.timesteps[2])])
    held = alpha_bar ** 0.5 * diffusers_blind.ops.kernel_to_model_range(start) + (1 - alpha_bar) ** 0.5 * noise
    torch.testing.assert_close(seen[1], held)  # after the second (last held) step


def test_loads_and_runs_a_few_steps():
    pipe = BlindDPSPipeline.from_pretrained(FOLDER)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.kernel_unet.dtype == torch.float32 and pipe.kernel_unet.config.in_channels == 1
    info = json.loads((FOLDER / "kernel_unet" / "training_info.json").read_text())
    assert info["kernel_size"] == pipe.kernel_unet.config.sample_size
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    out = pipe(image, num_inference_steps=2, blur_model="reflect", output_type="np",
               generator=torch.Generator().manual_seed(0))
    k = pipe.kernel_unet.config.sample_size
    assert out.images.shape == (1, 40, 40, 3) and out.kernels.shape == (1, k, k)
    assert abs(out.kernels.sum() - 1) < 1e-4 and (out.kernels >= 0).all()


def test_turbulence_pipeline_loads_from_the_same_folder_and_runs():
    from diffusers_blind import BlindDPSTurbulencePipeline

    pipe = BlindDPSTurbulencePipeline.from_pretrained(FOLDER)
    pipe.set_progress_bar_config(disable=True)
    info = json.loads((FOLDER / "tilt_unet" / "training_info.json").read_text())
    assert pipe.tilt_unet.dtype == torch.float32 and pipe.tilt_unet.config.in_channels == 2
    assert pipe.config.tilt_scale == info["tilt_scale"] == info["max_tilt"] == 2.5  # the generator's whole range
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(0))
    out = pipe(image, num_inference_steps=2, blur_model="reflect", output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 40, 40) and out.tilts.shape == (1, 2, 40, 40)
    assert out.tilts.abs().max() <= 2.5 and torch.isfinite(out.tilts).all()
    assert "tilt_samples_32.png" in (FOLDER / "README.md").read_text()


def test_the_64_px_kernel_prior_loads_as_a_replacement_kernel_unet():
    from diffusers import UNet2DModel

    kernel_unet = UNet2DModel.from_pretrained(FOLDER, subfolder="kernel_unet_64")
    info = json.loads((FOLDER / "kernel_unet_64" / "training_info.json").read_text())
    assert kernel_unet.config.sample_size == info["kernel_size"] == 64 and kernel_unet.dtype == torch.float32
    pipe = BlindDPSPipeline.from_pretrained(FOLDER, kernel_unet=kernel_unet)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 72, 72, generator=torch.Generator().manual_seed(0))
    out = pipe(image, num_inference_steps=2, blur_model="reflect", output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.kernels.shape == (1, 1, 64, 64) and abs(float(out.kernels.sum()) - 1) < 1e-4
    assert "samples_64.png" in (FOLDER / "README.md").read_text()
