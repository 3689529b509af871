"""End-to-end tests on the shipped fast model (the distilled UNet; real weights, small images, few steps)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

import diffusers_blind
from diffusers_blind import FastEMDeblurPipeline
from diffusers_blind.image_processor import to_tensor
from diffusers_blind.metrics import psnr
from diffusers_blind.ops import fft_blur, motion_kernel

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the shipped weights


@pytest.fixture(scope="module")
def pipe():
    pipe = FastEMDeblurPipeline.from_pretrained(diffusers_blind.FAST_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_fast_model_shares_the_default_scheduler_and_kernel_estimator_with_a_narrower_unet(pipe):
    default = Path(diffusers_blind.DEFAULT_MODEL)
    for part in ("scheduler", "kernel_estimator"):
        shipped = json.loads((default / part / "scheduler_config.json" if part == "scheduler" else
                              default / part / "config.json").read_text())
        assert {k: v for k, v in getattr(pipe, part).config.items() if not k.startswith("_")} == \
            {k: v for k, v in shipped.items() if not k.startswith("_")}
    assert tuple(pipe.unet.config.block_out_channels) == (16, 32, 64, 128)
    teacher = UNet2DModel.from_pretrained(default / "unet")
    assert sum(p.numel() for p in pipe.unet.parameters()) < 0.7 * sum(p.numel() for p in teacher.parameters())
    assert (Path(diffusers_blind.FAST_MODEL) / "README.md").is_file()


def test_fast_unet_denoises_like_the_default_one(pipe):
    """One call at t = 150 on a crop of the example: the distilled x̂0 is within 1.5 dB of the default UNet's
    (an untrained or wrongly loaded network is 10 dB or more away)."""
    teacher = UNet2DModel.from_pretrained(Path(diffusers_blind.DEFAULT_MODEL) / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(Path(diffusers_blind.DEFAULT_MODEL) / "scheduler")
    sharp = to_tensor(Image.open(ROOT / "examples" / "sharp.png"))[..., 64:192, 64:192] * 2 - 1
    t = torch.tensor([150])
    noise = torch.randn(sharp.shape, generator=torch.Generator().manual_seed(0))
    noisy = scheduler.add_noise(sharp, noise, t)
    alpha_bar = scheduler.alphas_cumprod[150]
    scores = {}
    for name, unet in (("fast", pipe.unet), ("default", teacher)):
        with torch.no_grad():
            eps = unet(noisy, t).sample
        x0 = ((noisy - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()).clamp(-1, 1)
        scores[name] = psnr((x0 + 1) / 2, (sharp + 1) / 2).item()
    assert scores["fast"] > scores["default"] - 1.5, scores


def test_fast_model_deblurs_with_a_known_kernel(pipe):
    sharp = to_tensor(Image.open(ROOT / "examples" / "sharp.png"))[..., 96:160, 96:160]
    kernel = motion_kernel(9, 0.5, 7)
    blurry = fft_blur(sharp, kernel) + torch.randn(sharp.shape, generator=torch.Generator().manual_seed(0)) * 5 / 255
    out = pipe(blurry, sigma=5, kernel=kernel, num_inference_steps=20, boundary_margin=0,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert psnr(out.images, sharp).item() > psnr(blurry.clamp(0, 1), sharp).item() + 0.2
