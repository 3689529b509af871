"""Windowed self-attention: equal to global attention in one window, to per-window attention otherwise."""

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from conftest import smooth_images, tiny_ddpm, tiny_unet
from diffusers_blind import FastEMDeblurPipeline
from diffusers_blind.models.windowed_attention import (
    WindowedAttnProcessor,
    resolve_attention_window,
    windowed_attention,
    windows_per_axis,
)
from diffusers_blind.pipelines.tiling import TiledUNetDenoiser


def attention(group_norm: bool = True, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    return Attention(16, heads=4, dim_head=4, norm_num_groups=4 if group_norm else None, residual_connection=True,
                     bias=True, upcast_softmax=True, _from_deprecated_attn_block=True).eval()


def test_one_window_is_the_global_attention():
    attn = attention()
    x = torch.randn(2, 16, 7, 9)
    expected = attn(x)
    attn.set_processor(WindowedAttnProcessor(1, 1, AttnProcessor2_0()))
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=0)


def test_windows_attend_only_within_themselves_with_gradients():
    """Without a group norm (which sees the whole map) the windowed result is the global attention run on each
    window's crop; so is its gradient."""
    attn = attention(group_norm=False)
    x = torch.randn(1, 16, 7, 9, requires_grad=True)
    attn.set_processor(WindowedAttnProcessor(2, 3, AttnProcessor2_0()))
    windowed = attn(x)
    (grad,) = torch.autograd.grad(windowed.square().sum(), x)
    attn.set_processor(AttnProcessor2_0())
    x2 = x.detach().clone().requires_grad_(True)
    rows = [range(0, 4), range(4, 7)]  # tensor_split of 7 into 2: 4 + 3; of 9 into 3: 3 + 3 + 3
    cols = [range(0, 3), range(3, 6), range(6, 9)]
    pieces = [[attn(x2[..., r.start:r.stop, c.start:c.stop].contiguous()) for c in cols] for r in rows]
    expected = torch.cat([torch.cat(row, 3) for row in pieces], 2)
    torch.testing.assert_close(windowed, expected, atol=1e-5, rtol=1e-5)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x2)
    torch.testing.assert_close(grad, expected_grad, atol=1e-5, rtol=1e-5)
    # and a window changes the result: the attention is no longer global
    assert (windowed - attn(x.detach())).abs().max() > 1e-3


def test_the_context_restores_the_processors_also_after_an_error():
    unet = tiny_unet()
    before = [m.processor for m in unet.modules() if isinstance(m, Attention)]
    assert before, "the tiny UNet has a mid-block attention"
    with pytest.raises(RuntimeError, match="inside"):
        with windowed_attention(unet, 8, 32, 32):
            assert all(isinstance(m.processor, WindowedAttnProcessor) for m in unet.modules() if isinstance(m, Attention))
            raise RuntimeError("inside")
    assert [m.processor for m in unet.modules() if isinstance(m, Attention)] == before


def test_a_unet_windowed_over_an_input_of_one_window_is_unchanged_and_over_more_is_changed():
    unet = tiny_unet().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = unet(x, 10).sample
        with windowed_attention(unet, 32, 32, 32):
            one = unet(x, 10).sample
        with windowed_attention(unet, None, 32, 32):
            none = unet(x, 10).sample
        with windowed_attention(unet, 16, 32, 32):
            four = unet(x, 10).sample
    assert torch.equal(one, plain) and torch.equal(none, plain)
    assert (four - plain).abs().max() > 1e-6


def test_windows_per_axis_and_the_setting():
    assert windows_per_axis(336, 64) == 5 and windows_per_axis(200, 64) == 3 and windows_per_axis(40, 64) == 1
    unet = tiny_unet(sample_size=16)
    assert resolve_attention_window("auto", unet) == 16
    assert resolve_attention_window(None, unet) is None and resolve_attention_window(24, unet) == 24
    for bad in ("big", 0, -3, 2.5, True):
        with pytest.raises(ValueError, match="attention_window"):
            resolve_attention_window(bad, unet)
    with pytest.raises(ValueError, match="attention_window"):
        FastEMDeblurPipeline(unet=unet, scheduler=tiny_ddpm(), attention_window="global")


def test_denoiser_uses_windows():
    unet = tiny_unet(sample_size=16).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        windowed = TiledUNetDenoiser(unet, tiny_ddpm(), attention_window=16)(x, 500).epsilon
        with windowed_attention(unet, 16, 32, 32):
            expected = unet(x, 500).sample
    torch.testing.assert_close(windowed, expected, rtol=0, atol=0)


def test_pipeline_setting_is_saved_and_none_is_global_attention(tmp_path):
    unet = tiny_unet(sample_size=16)
    image = smooth_images(1, height=24, width=24)
    kernel = torch.zeros(1, 1, 5, 5)
    kernel[..., 2, 1:4] = 1 / 3

    def run(pipe):
        return pipe(image, kernel=kernel, sigma=5, num_inference_steps=3, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    pipe = FastEMDeblurPipeline(unet=unet, scheduler=tiny_ddpm())
    assert pipe.config.attention_window == "auto"
    windowed = run(pipe)
    pipe.register_to_config(attention_window=None)
    global_ = run(pipe)
    pipe.register_to_config(attention_window=64)  # one window over the padded 24 + 2·5 -> 40 px image
    torch.testing.assert_close(run(pipe), global_, rtol=0, atol=0)
    assert (windowed - global_).abs().max() > 1e-6
    pipe.register_to_config(attention_window=8)
    pipe.save_pretrained(tmp_path / "pipe")
    assert FastEMDeblurPipeline.from_pretrained(tmp_path / "pipe").config.attention_window == 8


def test_windows_are_at_least_the_window_and_numpy_integers_are_stored_as_ints(tmp_path):
    assert [windows_per_axis(side, 64) for side in (64, 127, 128, 383, 384)] == [1, 1, 2, 5, 6]
    import numpy as np

    pipe = FastEMDeblurPipeline(unet=tiny_unet(), scheduler=tiny_ddpm(), attention_window=np.int64(24))
    assert type(pipe.config.attention_window) is int
    pipe.save_pretrained(tmp_path / "pipe")  # JSON: a numpy integer would not serialise
    assert FastEMDeblurPipeline.from_pretrained(tmp_path / "pipe").config.attention_window == 24
