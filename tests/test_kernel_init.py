"""The sparse-prior kernel initialiser: finite differences, L0 deconvolution, pyramid, estimate."""

import numpy as np
import pytest
import torch

import diffusers_blind
from diffusers_blind import KernelEstimator
from diffusers_blind.kernel_init import (
    SparseKernelInitializer,
    _difference_otfs,
    detailed_crop,
    finite_differences,
    l0_gradient_deconvolution,
    pyramid_kernel_sizes,
)
from diffusers_blind.metrics.kernel import mnc
from diffusers_blind.ops import dirac_kernel, fft_blur, motion_kernel, spatial_blur


def blocks(size=64, seed=0, count=12):
    """A piecewise-constant grey image of random discs: all its gradient is in edges of every orientation."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    image = np.full((size, size), 0.5, dtype=np.float32)
    for _ in range(count):
        centre = rng.uniform(0, size, 2)
        radius = rng.uniform(4, size / 4)
        inside = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 < radius ** 2
        image[inside] = rng.uniform(0.1, 0.9)
    return torch.from_numpy(image)[None, None]


def test_finite_differences_match_their_fourier_multipliers():
    image = torch.rand(1, 2, 12, 10, dtype=torch.float64)
    dx, dy = _difference_otfs((12, 10), image.device, image.dtype)
    grads = finite_differences(image)
    assert grads.shape == (1, 4, 12, 10)
    np.testing.assert_allclose(grads[:, :2], torch.fft.ifft2(dx * torch.fft.fft2(image)).real, atol=1e-12)
    np.testing.assert_allclose(grads[:, 2:], torch.fft.ifft2(dy * torch.fft.fft2(image)).real, atol=1e-12)
    assert float(grads[0, 0, 3, 4]) == pytest.approx(float(image[0, 0, 3, 4] - image[0, 0, 3, 5]))


def test_l0_deconvolution_restores_a_piecewise_constant_image():
    sharp = blocks().double()
    kernel = motion_kernel(9, 0.5, generator=1).double()
    blurry = fft_blur(sharp, kernel) + 0.005 * torch.randn(sharp.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    restored = l0_gradient_deconvolution(blurry, kernel, weight=5e-4)
    assert (restored - sharp).abs().mean() < 0.5 * (blurry - sharp).abs().mean()
    # the L0 prior leaves few non-zero gradients: far fewer than the noisy input has
    assert (finite_differences(restored).abs() > 1e-2).float().mean() < 0.5 * (finite_differences(blurry).abs() > 1e-2).float().mean()


def test_l0_deconvolution_with_a_zero_weight_budget_is_rejected_by_the_initializer():
    with pytest.raises(ValueError, match="l0"):
        SparseKernelInitializer(KernelEstimator(kernel_size=5, regularization="none"), l0_weight=0)


def test_pyramid_sizes_are_odd_increasing_and_stop_at_the_image():
    assert pyramid_kernel_sizes(33, 256) == [5, 7, 9, 13, 17, 23, 33]
    sizes = pyramid_kernel_sizes(33, 40)
    assert sizes[-1] == 33 and all(40 * s / 33 >= 16 for s in sizes)
    assert pyramid_kernel_sizes(5, 100) == [5]
    assert all(s % 2 == 1 for s in pyramid_kernel_sizes(64, 512)[:-1])


@pytest.mark.parametrize("protocol", ["valid", "circular"])
def test_initializer_finds_a_motion_kernel_on_a_sharp_edged_image(protocol):
    torch.manual_seed(0)
    big = blocks(112, seed=3, count=30)
    true = motion_kernel(15, 0.5, generator=4)
    if protocol == "valid":
        blurry = spatial_blur(big, true.flip(-2, -1), padding="zeros")[..., 16:-16, 16:-16]
    else:
        blurry = fft_blur(big[..., 16:-16, 16:-16], true)
    blurry = blurry.clamp(0, 1).expand(-1, 3, -1, -1)
    estimator = KernelEstimator.from_pretrained(diffusers_blind.DEFAULT_MODEL, subfolder="kernel_estimator")
    kernel = SparseKernelInitializer(estimator)(blurry, 15, 1 / 255)
    assert kernel.shape == (1, 1, 15, 15)
    assert torch.allclose(kernel.sum((-2, -1)), torch.ones(1)) and (kernel >= 0).all()
    assert float(mnc(kernel, true)) > 0.8  # a Dirac scores far lower
    assert float(mnc(dirac_kernel(15), true)) < 0.5


def test_initializer_checks_its_inputs():
    init = SparseKernelInitializer(KernelEstimator(kernel_size=5, regularization="none"))
    with pytest.raises(ValueError, match="B, C, H, W"):
        init(torch.rand(3, 16, 16), 5, 0.01)
    with pytest.raises(ValueError, match="kernel_size"):
        init(torch.rand(1, 3, 16, 16), 17, 0.01)


def test_detailed_crop_picks_the_window_with_edges_and_keeps_small_images():
    image = torch.full((2, 3, 40, 60), 0.5)
    image[0, :, 25:35, 45:55] = 1.0  # detail in the bottom right of the first image
    image[1, :, 2:8, 2:8] = 0.0  # and in the top left of the second
    crops = detailed_crop(image, 20)
    assert crops.shape == (2, 3, 20, 20)
    assert crops[0].min() == 0.5 and crops[0].max() == 1.0
    assert crops[1].min() == 0.0
    assert detailed_crop(image, 64) is image


def test_kernel_step_solves_both_differences_jointly_and_restores_the_estimator():
    estimator = KernelEstimator(kernel_size=9, regularization="none", channel_mode="mean", beta=1e5)
    init = SparseKernelInitializer(estimator, beta=1e3)
    seen = []
    original = KernelEstimator.forward

    def spy(self, *args, **kwargs):
        seen.append((self.config.channel_mode, self.config.beta))
        return original(self, *args, **kwargs)

    KernelEstimator.forward = spy
    try:
        init(torch.rand(1, 3, 40, 40), 9, 0.01)
    finally:
        KernelEstimator.forward = original
    assert seen and all(mode == "joint" and beta == 1e3 for mode, beta in seen)
    assert estimator.config.channel_mode == "mean" and estimator.config.beta == 1e5


def test_a_batch_gives_exactly_the_kernels_of_its_images_alone():
    """On a textured photo crop (and its mirror), batched float32 rounding, amplified by the L0 threshold,
    moved the batched kernels by up to 6e-4 from the single-image ones; image by image they are equal."""
    from pathlib import Path

    import PIL.Image

    path = Path(__file__).resolve().parents[1] / "examples" / "blurry.png"
    photo = np.asarray(PIL.Image.open(path), dtype=np.float32)[64:128, 100:164] / 255
    crop = torch.from_numpy(photo).permute(2, 0, 1)[None]
    batch = torch.cat([crop, crop.flip(-1)])
    estimator = KernelEstimator.from_pretrained(diffusers_blind.DEFAULT_MODEL, subfolder="kernel_estimator")
    initializer = SparseKernelInitializer(estimator)
    sigma = torch.tensor([10 / 255, 6 / 255])
    batched = initializer(batch, 9, sigma)
    for i in range(2):
        single = initializer(batch[i : i + 1], 9, sigma[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-7, rtol=0)


def test_the_start_kernel_refuses_images_out_of_range_and_bad_settings():
    estimator = KernelEstimator(kernel_size=7, regularization="none")
    start = SparseKernelInitializer(estimator, iterations=1)
    image = torch.rand(1, 3, 40, 40)
    with pytest.raises(ValueError, match=r"expected \[0, 1\]"):
        start(image * 255, 7, 0.02)
    with pytest.raises(TypeError, match="float image"):
        start((image * 255).to(torch.uint8), 7, 0.02)
    with pytest.raises(ValueError, match="sigma must be finite and >= 0"):
        start(image, 7, -0.01)
    with pytest.raises(ValueError, match="kernel_size must be an integer"):
        start(image, 7.0, 0.02)
    assert start(image, np.int64(7), 0.02).shape == (1, 1, 7, 7)
    for kwargs, match in ((dict(iterations=2.5), "iterations"), (dict(l0_weight=float("nan")), "l0_weight"),
                          (dict(beta=float("inf")), "beta"), (dict(l0_decay=0), "l0_decay")):
        with pytest.raises(ValueError, match=match):
            SparseKernelInitializer(estimator, **kwargs)
