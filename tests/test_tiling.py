"""Tiled UNet evaluation (pipelines/tiling.py): layout, exactness on a local network, the memory-bounded
backward, the memory planner, and the Fast EM pipeline and command line with tiles."""

import json

import numpy as np
import pytest
import torch
from conftest import smooth_images, tiny_ddpm, tiny_unet

from diffusers_blind import FastEMDeblurPipeline, KernelEstimator
from diffusers_blind.cli import main
from diffusers_blind.ops import fft_blur, gaussian_kernel
from diffusers_blind.pipelines import tiling
from diffusers_blind.pipelines.tiling import (
    auto_precision,
    TiledApply,
    TiledUNetDenoiser,
    TileLayout,
    parse_memory,
    plan_tiling,
    tile_starts,
    tiled_apply,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def local_net(seed=0):
    """A purely convolutional network (receptive radius 2) in float64."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Tanh(),
                               torch.nn.Conv2d(8, 3, 3, padding=1)).double()


# ---------------------------------------------------------------------------- layout
@pytest.mark.parametrize("length,tile,overlap", [(72, 32, 16), (100, 40, 8), (64, 64, 16), (30, 64, 16), (200, 48, 24)])
def test_tile_starts_cover_the_axis_on_the_grid(length, tile, overlap):
    starts = tile_starts(length, tile, overlap, multiple=8 if length % 8 == 0 and tile % 8 == 0 else 1)
    tile = min(tile, length)
    assert starts[0] == 0 and starts[-1] == length - tile
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # at least `overlap` shared
    if length % 8 == 0 and tile % 8 == 0:
        assert all(s % 8 == 0 for s in starts)


def test_weights_are_a_partition_of_unity_and_vanish_near_inner_tile_edges():
    layout = TileLayout.create(72, 56, 32, 16, multiple=8)
    rows, cols = layout.weights("cpu")
    total = torch.zeros(72, 56, dtype=torch.float64)
    for r, c, top, left in layout.tiles:
        weight = rows[r][:, None] * cols[c][None, :]
        assert (weight >= 0).all()
        total[top:top + 32, left:left + 32] += weight
        if top > 0:  # an inner edge: zero weight on a quarter of the overlap (16 / 4 = 4 pixels)
            assert weight[:4].abs().max() == 0
        if left + 32 < 56:
            assert weight[:, -4:].abs().max() == 0
        if top == 0:  # the image border keeps full weight
            assert weight[0, 8:24].min() > 0
    torch.testing.assert_close(total, torch.ones_like(total))


def test_layout_rejects_bad_sizes():
    with pytest.raises(ValueError, match="overlap"):
        TileLayout.create(64, 64, 32, 20, multiple=8)
    with pytest.raises(ValueError, match="tile_size"):
        TileLayout.create(64, 64, 4, 0, multiple=8)


# ---------------------------------------------------------------------------- exactness and gradients
@pytest.mark.parametrize("checkpoint", [True, False])
def test_local_network_tiled_equals_untiled_output_and_gradient(checkpoint):
    """With a receptive field inside the zero-weight band, tiling is exact everywhere (borders included)."""
    net = local_net()
    x = torch.randn(2, 3, 72, 56, dtype=torch.float64, requires_grad=True)
    layout = TileLayout.create(72, 56, 32, 16, multiple=8, batch_size=3, checkpoint=checkpoint)
    assert layout.num_tiles > 4
    full, tiled = net(x), tiled_apply(net, x, layout)
    torch.testing.assert_close(tiled, full, atol=1e-12, rtol=0)
    g = torch.randn_like(full)
    (grad_full,) = torch.autograd.grad((full * g).sum(), x)
    (grad_tiled,) = torch.autograd.grad((tiled * g).sum(), x)
    torch.testing.assert_close(grad_tiled, grad_full, atol=1e-12, rtol=0)


def test_checkpointed_backward_equals_autograd_through_the_blend_for_a_global_network():
    """GroupNorm makes every output depend on the whole tile: the recomputed VJPs must still be exact."""
    unet = tiny_unet().double()
    x = torch.randn(1, 3, 48, 40, dtype=torch.float64, requires_grad=True)
    layout = TileLayout.create(48, 40, 32, 16, multiple=2, batch_size=2)

    def fn(z):
        return unet(z, 500).sample

    reference = layout.blend(fn, x)  # plain autograd through every tile
    checkpointed = TiledApply.apply(x, fn, layout)
    torch.testing.assert_close(checkpointed, reference.detach(), atol=1e-12, rtol=0)
    g = torch.randn_like(reference)
    (expected,) = torch.autograd.grad((reference * g).sum(), x)
    (got,) = torch.autograd.grad((checkpointed * g).sum(), x)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-8)
    assert expected.abs().max() > 0


def test_checkpointed_backward_keeps_the_forward_autocast():
    net = local_net().float()
    x = torch.randn(1, 3, 48, 48, requires_grad=True)
    layout = TileLayout.create(48, 48, 32, 16, multiple=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = TiledApply.apply(x, net, layout)
    assert y.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(y.float().sum(), x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (expected,) = torch.autograd.grad(net(x).float().sum(), x)
    torch.testing.assert_close(grad, expected, atol=0.05, rtol=0.05)


def test_tiled_denoiser_without_layout_is_the_plain_denoiser():
    unet, scheduler = tiny_unet(), tiny_ddpm()
    x = torch.randn(1, 3, 32, 32)
    plain = TiledUNetDenoiser(unet, scheduler, None)(x, 999).epsilon
    torch.testing.assert_close(plain, unet(x, 999).sample)


# ---------------------------------------------------------------------------- planning
@pytest.mark.parametrize("text,expected", [("8GiB", 8 * 2**30), ("8GB", 8 * 10**9), ("512 MiB", 512 * 2**20),
                                           (2e9, 2 * 10**9), ("1024", 1024)])
def test_parse_memory(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1GB", "8 parsecs", 0, True, None])
def test_parse_memory_rejects(bad):
    with pytest.raises(ValueError, match="max_memory"):
        parse_memory(bad)


def test_plan_untiled_when_small_and_tiled_when_large_or_short_of_memory(monkeypatch):
    unet = tiny_unet()
    monkeypatch.setattr(tiling, "available_memory", lambda device: 64 * 2**30)
    assert plan_tiling(unet, (1, 3, 256, 256), "cpu").tile_size is None
    large = plan_tiling(unet, (1, 3, 4096, 3072), "cpu")
    assert large.tile_size == tiling.AUTO_MAX_TILE and large.overlap > 0
    monkeypatch.setattr(tiling, "available_memory", lambda device: 2**20)  # automatic: small tiles, no error
    assert plan_tiling(unet, (1, 3, 256, 256), "cpu").tile_size == tiling.MIN_TILE
    budgeted = plan_tiling(unet, (1, 3, 256, 256), "cpu", max_memory="100MB")
    assert budgeted.tile_size is not None and budgeted.tile_size < 256 and budgeted.checkpoint
    with pytest.raises(ValueError, match="max_memory"):
        plan_tiling(unet, (1, 3, 4096, 4096), "cpu", max_memory="10MB")
    assert plan_tiling(unet, (1, 3, 96, 96), "cpu", tile_size=64).tile_size == 64
    assert plan_tiling(unet, (1, 3, 96, 96), "cpu", tile_size=128).tile_size is None
    with pytest.raises(ValueError, match="tile_size"):
        plan_tiling(unet, (1, 3, 96, 96), "cpu", tile_size=3)


def test_automatic_plan_runs_whole_while_one_call_is_cheaper_than_tiles(monkeypatch):
    """A photo a little over 384 px padded by its margin (352² → 424²) ran as four overlapping 384² tiles."""
    monkeypatch.setattr(tiling, "available_memory", lambda device: 64 * 2**30)
    unet = tiny_unet()
    assert plan_tiling(unet, (1, 3, 424, 424), "cpu").tile_size is None
    assert plan_tiling(unet, (1, 3, 584, 584), "cpu").tile_size is None
    assert plan_tiling(unet, (1, 3, 640, 640), "cpu").tile_size == tiling.AUTO_MAX_TILE
    assert tiling.relative_unet_cost(384 * 384) == 384 * 384  # flat up to the largest tile
    assert tiling.relative_unet_cost(512 * 512) / (512 * 512) == pytest.approx(59 / 42, rel=0.01)  # measured ratio
    monkeypatch.setattr(tiling, "available_memory", lambda device: 2**28)  # cheaper whole, but it does not fit
    assert plan_tiling(unet, (1, 3, 424, 424), "cpu").tile_size is not None


def test_automatic_budget_is_shared_by_the_processes_of_a_launch(monkeypatch):
    monkeypatch.setattr(tiling, "available_memory", lambda device: 10 * 2**30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    alone = tiling.automatic_budget("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert tiling.automatic_budget("cpu") == alone // 4
    assert plan_tiling(tiny_unet(), (1, 3, 256, 256), "cpu").budget == alone // 4


def test_plan_keeps_the_tile_graphs_when_they_all_fit():
    unet = tiny_unet()
    assert not plan_tiling(unet, (1, 3, 96, 96), "cpu", tile_size=64, max_memory="8GiB").checkpoint
    assert plan_tiling(unet, (1, 3, 2048, 2048), "cpu", tile_size=256, max_memory="1GiB").checkpoint


# ---------------------------------------------------------------------------- pipeline and command line
def blurry(height=44, width=52, seed=0):
    sharp = smooth_images(1, height=height, width=width, seed=seed)
    return (fft_blur(sharp, gaussian_kernel(5, 1.0)) + 0.02 * torch.randn_like(sharp)).clamp(0, 1), sharp


def make_pipe():
    torch.manual_seed(0)
    pipe = FastEMDeblurPipeline(tiny_unet(), tiny_ddpm(), KernelEstimator(kernel_size=5, num_iterations=2))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("guidance", ["pigdm", "diffpir"])
def test_pipeline_tiled_matches_untiled_within_seed_noise(guidance):
    """Tiles change the UNet's input statistics only: tiled vs untiled differ less than two seeds do."""
    pipe = make_pipe()
    y, _ = blurry()

    def run(seed, **kwargs):
        return pipe(y, sigma=5, num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
                    output_type="pt", guard=False, guidance=guidance, **kwargs)  # a tiny random UNet explains nothing

    untiled = run(0)
    assert pipe.tiling_plan.tile_size is None
    tiled = run(0, tile_size=32)
    assert pipe.tiling_plan.tile_size == 32
    other_seed = run(1)
    assert tiled.images.shape == untiled.images.shape
    tiling_change = (tiled.images - untiled.images).abs().mean()
    seed_change = (other_seed.images - untiled.images).abs().mean()
    assert 0 < tiling_change < 0.5 * seed_change
    torch.testing.assert_close(tiled.kernels.sum((-2, -1)), torch.ones(1, 1))


def test_pipeline_tiles_from_a_memory_budget_and_refuses_an_impossible_one():
    pipe = make_pipe()
    y, _ = blurry()
    out = pipe(y, sigma=5, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
               max_memory="6MB")
    assert pipe.tiling_plan.tile_size is not None and out.images.shape == (1, 44, 52, 3)
    with pytest.raises(ValueError, match="max_memory"):
        pipe(y, sigma=5, num_inference_steps=2, max_memory="1kB")
    with pytest.raises(ValueError, match="tile_size"):
        pipe(y, sigma=5, num_inference_steps=2, tile_size=0)


def test_cli_tile_flags_reach_the_pipeline_and_the_record(tmp_path):
    import PIL.Image

    pipe = make_pipe()
    pipe.save_pretrained(tmp_path / "model")
    y, _ = blurry(40, 48)
    PIL.Image.fromarray((y[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    args = ["deblur", str(tmp_path / "photo.png"), "-o", str(tmp_path / "out"), "--model", str(tmp_path / "model"),
            "--steps", "2", "--kernel-size", "5", "--seed", "0", "-q"]
    assert main(args + ["--tile-size", "32", "--max-memory", "1GiB"]) == 0
    settings = json.loads((tmp_path / "out" / "photo.json").read_text())["settings"]
    assert settings["tile_size"] == 32 and settings["max_memory"] == "1GiB"
    assert settings["precision"] == auto_precision("cpu")  # the default "auto", recorded as what ran
    assert main(args + ["--tile-size", "auto", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "photo.json").read_text())["settings"]["tile_size"] is None
    assert main(args + ["--max-memory", "lots", "--overwrite"]) == 2
    assert main(args + ["--tile-size", "4", "--overwrite"]) == 2
    assert main(args + ["--precision", "bfloat16", "--overwrite"]) == 0
    assert json.loads((tmp_path / "out" / "photo.json").read_text())["settings"]["precision"] == "bfloat16"
    assert main(args + ["--precision", "fp8", "--overwrite"]) == 2


def test_auto_precision_is_bfloat16_only_where_the_device_has_it(monkeypatch):
    monkeypatch.setattr(tiling, "cpu_has_fast_bfloat16", lambda: True)
    assert tiling.auto_precision("cpu") == "bfloat16" and tiling.resolve_precision("auto", "cpu") is torch.bfloat16
    monkeypatch.setattr(tiling, "cpu_has_fast_bfloat16", lambda: False)
    assert tiling.auto_precision("cpu") == "float32" and tiling.resolve_precision("auto", "cpu") is None
    assert tiling.auto_precision("meta") == "float32"
    assert tiling.resolve_precision(None, "cpu") is None  # the pipeline's own default stays float32
    with pytest.raises(ValueError, match="auto"):
        tiling.resolve_precision("fast", "cpu")
    for alias, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32"), ("no", "float32")):
        assert tiling.resolve_precision(alias, "cpu") is tiling.resolve_precision(name, "cpu")
    for wrong in (3, ["bf16"], torch.bfloat16):
        with pytest.raises(ValueError, match="precision must be one of"):
            tiling.resolve_precision(wrong, "cpu")


def test_pipeline_bfloat16_unet_stays_close_to_float32_and_bad_precision_is_refused():
    pipe = make_pipe()
    y, _ = blurry()

    def run(**kwargs):
        return pipe(y, sigma=5, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="pt", guard=False, **kwargs)  # a tiny random UNet explains nothing

    full, half = run(precision="float32"), run(precision="bfloat16", tile_size=32)
    assert full.images.dtype == half.images.dtype == torch.float32
    assert 0 < (full.images - half.images).abs().mean() < 0.05
    with pytest.raises(ValueError, match="precision"):
        run(precision="int8")
