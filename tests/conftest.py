"""Shared fixtures: device tests run on CPU always, and on CUDA when it is available."""

import pytest
import torch


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def tol(dtype):
    """``allclose`` tolerances for two computations carried out in ``dtype``."""
    return {"atol": 2e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-11, "rtol": 1e-9}


# ----------------------------------------------------------------------------- tiny diffusion components
def tiny_unet(out_channels: int = 3, in_channels: int = 3, sample_size: int = 16, seed: int = 0):
    """A two-level ``UNet2DModel`` with 8/16 channels (about 30k parameters): fast enough for every pipeline test.

    ``out_channels=6`` gives a guided-diffusion style learned-variance output (ε then the variance channels).
    """
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def tiny_ddpm(**kwargs):
    """A 1000-step linear-β ``DDPMScheduler`` with ``timestep_spacing="linspace"`` (the reference respacing)."""
    from diffusers import DDPMScheduler

    config = dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, variance_type="fixed_small")
    config.update(kwargs)
    return DDPMScheduler(timestep_spacing="linspace", **config)


def smooth_images(batch: int = 2, channels: int = 3, height: int = 20, width: int = 24, seed: int = 0):
    """Smooth random test images ``(B, C, H, W)`` in ``[0, 1]`` (bicubic upsampling of coarse noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, height // 4 + 1, width // 4 + 1, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic").clamp(0, 1)
