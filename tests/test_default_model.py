"""End-to-end tests on the shipped default pipeline (real weights, small images, few steps)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_blind
from diffusers_blind import FastEMDeblurPipeline, KernelEstimator
from diffusers_blind.image_processor import to_tensor
from diffusers_blind.metrics import mnc, psnr
from diffusers_blind.ops import fft_blur, motion_kernel


ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the shipped weights


@pytest.fixture(scope="module")
def pipe():
    pipe = FastEMDeblurPipeline.from_pretrained(diffusers_blind.DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def problem():
    sharp = to_tensor(Image.open(ROOT / "examples" / "sharp.png"))[..., 96:160, 96:160]
    kernel = motion_kernel(9, 0.5, 7)
    noise = torch.randn(sharp.shape, generator=torch.Generator().manual_seed(0)) * 5 / 255
    return sharp, kernel, fft_blur(sharp, kernel) + noise


def test_default_model_folder_is_complete_and_small():
    folder = Path(diffusers_blind.DEFAULT_MODEL)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FastEMDeblurPipeline"
    for name in ("unet", "scheduler", "kernel_estimator"):
        assert (folder / name).is_dir()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 30 * 2**20
    assert (folder / "README.md").exists()


def test_default_model_components(pipe):
    assert isinstance(pipe.kernel_estimator, KernelEstimator)
    assert pipe.kernel_estimator.config.kernel_size == 33
    assert pipe.scheduler.config.timestep_spacing == "linspace"
    assert pipe.scheduler.config.variance_type == "fixed_small"
    assert pipe.config.guidance_scale > 0


@pytest.mark.parametrize("guidance", ["pigdm", "diffpir"])
def test_default_model_non_blind_improves_on_the_blurry_input(pipe, problem, guidance):
    sharp, kernel, blurry = problem
    out = pipe(blurry, sigma=5, kernel=kernel, num_inference_steps=20, boundary_margin=0, guidance=guidance,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert psnr(out.images, sharp).item() > psnr(blurry.clamp(0, 1), sharp).item() + 0.2


@pytest.mark.parametrize("guidance", ["pigdm", "diffpir"])
def test_default_model_blind_estimates_a_kernel(pipe, problem, guidance):
    sharp, kernel, blurry = problem
    out = pipe(blurry, sigma=5, kernel_size=9, num_inference_steps=20, boundary_margin=0, guidance=guidance,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert torch.isfinite(out.images).all()
    torch.testing.assert_close(out.kernels.sum(), torch.tensor(1.0))
    dirac = torch.zeros(1, 1, 9, 9)
    dirac[..., 4, 4] = 1
    assert mnc(out.kernels, kernel).item() > mnc(dirac, kernel).item() + 0.1
