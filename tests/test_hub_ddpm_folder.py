"""Use an image prior stored like the Hub `google/ddpm-ema-*-256` repos with FastEMDeblurPipeline.

The Hub cannot be reached offline, so the test writes a local folder with the same layout::

    model_index.json                  {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
    unet/config.json + weights        UNet2DModel (3 -> 3 channels, fixed-variance DDPM)
    scheduler/scheduler_config.json   DDPMScheduler (linear betas, no timestep_spacing key)

from a tiny random UNet2DModel, then runs the documented recipe (docs/converting_checkpoints.md)::

    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", timestep_spacing="linspace")
    pipe = FastEMDeblurPipeline(unet=unet, scheduler=scheduler, kernel_estimator=estimator)
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import diffusers_blind
from diffusers_blind import FastEMDeblurPipeline, KernelEstimator


def tiny_hub_like_unet() -> UNet2DModel:
    """The google/ddpm-ema-*-256 architecture family (DownBlock2D/AttnDownBlock2D, conv up/down), tiny."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=None,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm-ema-tiny-256")
    # The Hub DDPM scheduler configs predate `timestep_spacing` (so it defaults to "leading").
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
        variance_type="fixed_small", clip_sample=True,
    )
    DDPMPipeline(unet=tiny_hub_like_unet(), scheduler=scheduler).save_pretrained(folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config.pop("timestep_spacing", None)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    return folder


def test_folder_has_hub_layout(hub_folder):
    index = json.loads((hub_folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert (hub_folder / "unet" / "config.json").is_file()
    assert any(p.name.startswith("diffusion_pytorch_model") for p in (hub_folder / "unet").iterdir())
    assert (hub_folder / "scheduler" / "scheduler_config.json").is_file()


def test_recipe_loads_components(hub_folder):
    unet = UNet2DModel.from_pretrained(hub_folder, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(hub_folder, subfolder="scheduler")
    assert scheduler.config.timestep_spacing == "leading"  # the Hub default: a different respacing
    scheduler = DDPMScheduler.from_pretrained(hub_folder, subfolder="scheduler", timestep_spacing="linspace")
    assert scheduler.config.timestep_spacing == "linspace" and scheduler.config.variance_type == "fixed_small"
    scheduler.set_timesteps(100)
    assert scheduler.timesteps[0] == 999 and scheduler.timesteps[1] == 989  # guided-diffusion's respacing
    reference = tiny_hub_like_unet()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(unet.state_dict()[name], tensor)


def test_fast_em_pipeline_from_hub_folder(hub_folder, tmp_path):
    unet = UNet2DModel.from_pretrained(hub_folder, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(hub_folder, subfolder="scheduler", timestep_spacing="linspace")
    torch.manual_seed(0)
    estimator = KernelEstimator(kernel_size=5)  # random PnP denoiser; use the shipped one for real images
    pipe = FastEMDeblurPipeline(unet=unet, scheduler=scheduler, kernel_estimator=estimator)
    pipe.set_progress_bar_config(disable=True)

    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 16, 16, generator=g)
    out = pipe(image, sigma=10, num_inference_steps=2, kernel_size=5, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 16, 16, 3)
    assert np.isfinite(out.images).all() and out.images.min() >= 0 and out.images.max() <= 1
    assert out.kernels.shape == (1, 5, 5)
    assert np.isfinite(out.kernels).all() and out.kernels.min() >= 0
    np.testing.assert_allclose(out.kernels.sum(axis=(-2, -1)), 1.0, atol=1e-5)

    # The combined pipeline saves and reloads as one folder.
    pipe.save_pretrained(tmp_path / "fast_em_from_hub")
    reloaded = FastEMDeblurPipeline.from_pretrained(tmp_path / "fast_em_from_hub")
    reloaded.set_progress_bar_config(disable=True)
    assert reloaded.scheduler.config.timestep_spacing == "linspace"
    again = reloaded(image, sigma=10, num_inference_steps=2, kernel_size=5, output_type="np",
                     generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(again.images, out.images, atol=1e-5)
    np.testing.assert_allclose(again.kernels, out.kernels, atol=1e-6)


def test_default_model_constant_is_exported():
    # Users combine a Hub / converted prior with the shipped kernel estimator:
    # KernelEstimator.from_pretrained(diffusers_blind.DEFAULT_MODEL, subfolder="kernel_estimator")
    assert isinstance(diffusers_blind.DEFAULT_MODEL, str)


def _converter_test_helpers():
    """The synthetic guided-diffusion checkpoint builder of tests/test_convert_guided_diffusion.py."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "test_convert_guided_diffusion"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def test_fast_em_pipeline_from_converted_guided_diffusion_folder(tmp_path):
    """A folder written by scripts/convert_guided_diffusion_to_diffusers.py (learned sigma: 6 channels)."""
    helpers = _converter_test_helpers()
    conv = helpers.conv
    args = dict(
        image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
        num_head_channels=32, learn_sigma=True, in_channels=3, resblock_updown=True,
    )
    shapes, _ = helpers.gd_architecture(conv.guided_diffusion_config(**args))
    state_dict = {k: 0.5 * v for k, v in helpers.random_state_dict(shapes, seed=0, dtype=torch.float32).items()}
    ckpt = tmp_path / "model.pt"
    torch.save(state_dict, ckpt)
    folder = tmp_path / "converted"
    argv = ["--checkpoint", str(ckpt), "--output_dir", str(folder)]
    for key, value in args.items():
        argv += [f"--{key}", str(value)]
    conv.main(argv)

    unet = UNet2DModel.from_pretrained(folder, subfolder="unet")
    assert unet.config.out_channels == 6
    torch.manual_seed(0)
    estimator = KernelEstimator(kernel_size=5)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for variance_type in ("learned_range", "fixed_small"):  # DPS/BlindDPS vs Fast EM (ignores the sigma channels)
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler", variance_type=variance_type)
        assert scheduler.config.timestep_spacing == "linspace"
        pipe = FastEMDeblurPipeline(unet=unet, scheduler=scheduler, kernel_estimator=estimator)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(image, sigma=10, num_inference_steps=2, kernel_size=5, output_type="np",
                   generator=torch.Generator().manual_seed(0))
        assert out.images.shape == (1, 16, 16, 3) and np.isfinite(out.images).all()
        assert out.kernels.shape == (1, 5, 5) and np.isfinite(out.kernels).all()
