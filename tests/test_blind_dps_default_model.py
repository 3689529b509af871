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
    # the image prior is the Fast EM default one, linked rather than duplicated
    assert (FOLDER / "unet").resolve() == (Path(diffusers_blind.DEFAULT_MODEL) / "unet").resolve()


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
