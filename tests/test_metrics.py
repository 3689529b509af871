"""Known-value tests for diffusers_blind.metrics (CPU, offline)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffusers_blind import metrics
from diffusers_blind.ops import fft_blur, gaussian_kernel, motion_kernel, spatial_blur


def smooth_images(batch=2, channels=3, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, size // 4, size // 4, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


# ------------------------------------------------------------------------------------------ PSNR / SSIM
def test_psnr_identical_is_inf_and_per_image():
    x = smooth_images()
    values = metrics.psnr(x, x)
    assert values.shape == (2,)
    assert torch.isinf(values).all() and (values > 0).all()


def test_psnr_hand_computed():
    target = torch.full((1, 3, 8, 8), 0.5)
    target = target.double()
    assert metrics.psnr(target + 0.1, target).item() == pytest.approx(20.0, abs=1e-9)  # MSE 0.01
    # two images with different errors: per image, not pooled
    pair = torch.cat([target + 0.1, target + 0.01])
    assert metrics.psnr(pair, target).tolist() == pytest.approx([20.0, 40.0], abs=1e-9)
    # half the pixels off by 0.2: MSE = 0.02 -> 10 log10(50)
    half = target.clone()
    half[..., :4, :] += 0.2
    assert metrics.psnr(half, target).item() == pytest.approx(10 * math.log10(50), abs=1e-9)


def test_psnr_clamps_to_unit_range():
    target = torch.ones(1, 3, 4, 4, dtype=torch.float64)
    assert torch.isinf(metrics.psnr(target + 0.3, target)).all()  # 1.3 is clamped to 1
    assert metrics.psnr(torch.full_like(target, 0.9), target).item() == pytest.approx(20.0, abs=1e-9)


def test_ssim_identical_is_one_and_drops_with_noise():
    x = smooth_images()
    assert metrics.ssim(x, x).tolist() == pytest.approx([1.0, 1.0], abs=1e-12)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn(x.shape, generator=generator)
    low, high = metrics.ssim(x + 0.02 * noise, x), metrics.ssim(x + 0.1 * noise, x)
    assert (low < 1).all() and (high < low).all()


def test_ssim_matches_torchmetrics_on_the_valid_part():
    """Independent check of the convention: torchmetrics' SSIM map (Gaussian 11, sigma 1.5) with its 5-pixel
    reflect-padded border cropped, averaged, equals our valid-part SSIM."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    x = smooth_images(seed=2).double()
    y = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).clamp(0, 1)
    _, full_map = structural_similarity_index_measure(
        y, x, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0, reduction="none", return_full_image=True
    )
    expected = full_map[..., 5:-5, 5:-5].flatten(1).mean(1)
    assert metrics.ssim(y, x).tolist() == pytest.approx(expected.tolist(), abs=1e-10)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        metrics.psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


def _levels(seed=0):
    """Two 8-bit images (uint8, (2, 3, 24, 24)) that differ by noise, and the same as floats in [0, 1]."""
    x = smooth_images(size=24, seed=seed).double()
    noise = 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    a, b = (x * 255).round().to(torch.uint8), ((x + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return a, b


@pytest.mark.parametrize("metric", [metrics.psnr, metrics.ssim])
def test_integer_images_are_rescaled_by_their_full_scale(metric):
    a, b = _levels()
    expected = metric(a.double() / 255, b.double() / 255)
    assert metric(a, b).tolist() == pytest.approx(expected.tolist(), abs=1e-9)  # was clamped to {0, 1}
    assert metric(a, b, data_range=255).tolist() == pytest.approx(expected.tolist(), abs=1e-9)
    assert metric(a.double(), b.double(), data_range=255).tolist() == pytest.approx(expected.tolist(), abs=1e-9)
    if hasattr(torch, "uint16"):
        wide = [torch.from_numpy((t.numpy().astype(np.uint16) * 257)) for t in (a, b)]  # 255 * 257 = 65535
        assert metric(*wide).tolist() == pytest.approx(expected.tolist(), abs=1e-9)
    with pytest.raises(TypeError, match="uint8 or uint16"):
        metric(a.long(), b.long())


@pytest.mark.parametrize("metric", [metrics.psnr, metrics.ssim])
def test_integer_images_beyond_an_explicit_data_range_are_refused(metric):
    a, b = _levels()
    with pytest.raises(ValueError, match="far outside"):
        metric(a, b, data_range=1)  # 8-bit levels read as [0, 1]: was 18.5 dB instead of an error
    if hasattr(torch, "uint16"):
        wide = [torch.from_numpy(t.numpy().astype(np.uint16) * 16) for t in (a, b)]  # 12-bit levels, up to 4080
        with pytest.raises(ValueError, match="far outside"):
            metric(*wide, data_range=255)


def test_a_torch_grayscale_batch_without_channel_axis_is_refused():
    x, y = smooth_images(batch=5, channels=1, size=16, seed=1), smooth_images(batch=5, channels=1, size=16, seed=2)
    with pytest.raises(ValueError, match=r"images\[:, None\]"):
        metrics.psnr(x[:, 0], y[:, 0])  # (5, 16, 16) was read as one image with 5 channels
    assert metrics.psnr(x, y).shape == (5,)
    with pytest.raises(ValueError, match="empty"):
        metrics.psnr(torch.rand(1, 3, 0, 0), torch.rand(1, 3, 0, 0))


def test_reblur_loss_and_sharpness_follow_the_metric_input_conventions():
    x = smooth_images(size=24, seed=5).double()
    kernel = gaussian_kernel(5, 1.0).double()
    y = fft_blur(x, kernel)
    levels = (x * 255).round().to(torch.uint8)
    expected = metrics.reblur_loss(levels.double() / 255, kernel, y, 0.0).per_element
    assert metrics.reblur_loss(levels, kernel, y, 0.0).per_element.tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    with pytest.raises(ValueError, match="far outside"):
        metrics.reblur_loss(x * 255, kernel, y * 255, 10.0)
    noisy = y + 0.4 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert noisy.min() < -0.5 or noisy.max() > 1.5  # a measurement at σ = 100 levels: noisy, not another range
    assert torch.isfinite(metrics.reblur_loss(x, kernel, noisy, 0.4).total).all()
    with pytest.raises(ValueError, match="beyond what noise"):
        metrics.reblur_loss(x, kernel, y * 255, 0.04)  # 8-bit levels as floats: another scale, not noise
    with pytest.raises(ValueError, match="beyond what noise"):
        metrics.reblur_loss(x, kernel, y * 4 - 2, 0.0)
    sharp = metrics.laplacian_sharpness(levels.double() / 255)
    assert metrics.laplacian_sharpness(levels).tolist() == pytest.approx(sharp.tolist(), rel=1e-12)
    with pytest.raises(ValueError, match="far outside"):
        metrics.laplacian_sharpness(x * 255)  # was clamped to [0, 1] and scored as a near-flat image


def test_psnr_uint8_matches_the_textbook_value():
    a = torch.full((1, 1, 4, 4), 100, dtype=torch.uint8)
    b = a.clone()
    b[..., 0, 0] = 110  # MSE = 100 / 16 levels²
    assert metrics.psnr(a, b).item() == pytest.approx(10 * math.log10(255**2 / (100 / 16)), abs=1e-9)


@pytest.mark.parametrize("metric", [metrics.psnr, metrics.ssim, metrics.gmsd])
def test_float_images_far_outside_unit_range_and_nan_are_refused(metric):
    x = smooth_images(size=16)
    with pytest.raises(ValueError, match="data_range=255"):
        metric(x * 255, x)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        metric(x, x * 2 - 1)
    nan = x.clone()
    nan[0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        metric(x, nan)
    metric(x + 0.2, x)  # a small overshoot is clamped, not refused


@pytest.mark.parametrize("metric", [metrics.psnr, metrics.ssim, metrics.gmsd])
def test_numpy_images_are_channels_last_and_batch_one_broadcasts_both_ways(metric):
    x, y = smooth_images(size=16, seed=3).double(), smooth_images(size=16, seed=4).double()
    expected = metric(x, y)
    as_numpy = [t.permute(0, 2, 3, 1).numpy() for t in (x, y)]
    assert metric(*as_numpy).tolist() == pytest.approx(expected.tolist(), abs=1e-12)
    assert metric(as_numpy[0][0], y[:1]).item() == pytest.approx(expected[0].item(), abs=1e-12)
    with pytest.raises(ValueError, match="channels-last"):
        metric(x.numpy(), y.numpy())
    assert metric(x[:1], y).tolist() == pytest.approx(metric(x[:1].expand_as(y), y).tolist(), abs=1e-12)
    assert metric(y, x[:1]).tolist() == pytest.approx(metric(y, x[:1].expand_as(y)).tolist(), abs=1e-12)


# ------------------------------------------------------------------------------------------ kernels
def _embed_at(kernel, size, top, left):
    canvas = torch.zeros(1, 1, size, size)
    kh, kw = kernel.shape[-2:]
    canvas[..., top : top + kh, left : left + kw] = kernel
    return canvas


def test_mnc_shift_invariant_and_scale_invariant():
    k = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    shifted = _embed_at(k, 9, 1, 3)  # an off-centre copy in a larger support
    assert metrics.mnc(k, shifted).item() == pytest.approx(1.0, abs=1e-12)
    assert metrics.mnc(3.0 * shifted, k).item() == pytest.approx(1.0, abs=1e-12)
    other = gaussian_kernel(5, 1.0)
    assert metrics.mnc(other, k).item() < 0.999


def test_mnc_hand_computed():
    dirac = torch.zeros(3, 3)
    dirac[1, 1] = 1
    line = torch.zeros(3, 3)
    line[1, 1] = line[1, 2] = 0.5
    # best overlap 0.5, norms 1 and sqrt(0.5)
    assert metrics.mnc(line, dirac).item() == pytest.approx(0.5 / math.sqrt(0.5), abs=1e-12)


def test_kernel_mse_zero_for_shifted_copy_and_hand_value():
    k = motion_kernel(7, 0.5, generator=0)
    # shift by one pixel inside a zero border: no mass leaves the 9x9 support
    a, b = _embed_at(k, 9, 1, 1), _embed_at(k, 9, 2, 0)
    assert metrics.kernel_mse(a, b).item() == pytest.approx(0.0, abs=1e-15)
    assert metrics.kernel_mse(a, b, align="none").item() > 1e-5
    assert metrics.kernel_mse(a, b, align="center_of_mass").item() == pytest.approx(0.0, abs=1e-15)

    dirac = torch.zeros(3, 3)
    dirac[1, 1] = 1
    line = torch.zeros(3, 3)
    line[1, 1] = line[1, 2] = 0.5
    # aligned on one of the two pixels: errors 0.5 and -0.5 over 9 pixels
    assert metrics.kernel_mse(line, dirac).item() == pytest.approx(0.5 / 9, abs=1e-12)
    # normalisation to sum 1: the scale of the estimate does not matter
    assert metrics.kernel_mse(4 * line, dirac).item() == pytest.approx(0.5 / 9, abs=1e-12)


def test_kernel_mse_shift_is_min_over_all_translations_counting_all_mass():
    """Brute force: translate the estimate on a canvas that holds it whole, MSE normalised by the 5x5 support."""
    generator = torch.Generator().manual_seed(5)
    est = torch.rand(2, 1, 5, 5, generator=generator, dtype=torch.float64)
    true = torch.rand(2, 1, 5, 5, generator=generator, dtype=torch.float64)
    est, true = est / est.sum((-2, -1), keepdim=True), true / true.sum((-2, -1), keepdim=True)
    expected = []
    for i in range(2):
        best = math.inf
        for dr in range(-4, 5):
            for dc in range(-4, 5):
                canvas = torch.zeros(13, 13, dtype=torch.float64)
                canvas[4:9, 4:9] -= true[i, 0]
                canvas[4 + dr : 9 + dr, 4 + dc : 9 + dc] += est[i, 0]
                best = min(best, canvas.pow(2).sum().item() / 25)
        expected.append(best)
    assert metrics.kernel_mse(est, true).tolist() == pytest.approx(expected, rel=1e-9)
    assert metrics.kernel_mse(true, est).tolist() == pytest.approx(expected, rel=1e-9)  # symmetric


def test_kernel_mse_cannot_be_lowered_by_shifting_mass_out_of_the_support():
    true = gaussian_kernel(15, 3.0).double()
    dirac = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
    dirac[..., 7, 7] = 1
    line = torch.zeros(1, 1, 15, 15, dtype=torch.float64)
    line[..., 7, :] = 1
    near = torch.roll(true, (1, -1), (-2, -1))  # the truth one pixel off (a sliver wraps around)
    bad = [metrics.kernel_mse(k, true).item() for k in (dirac, line)]
    # both used to score ‖k‖²/225 (all mass shifted out of the support)
    floor = true.pow(2).sum().item() / 225
    assert metrics.kernel_mse(near, true).item() < 1e-6
    assert min(bad) > 5 * floor and abs(bad[0] - bad[1]) > floor
    # the Dirac at the Gaussian's peak: (1 + ‖k‖² − 2 max k) / 225
    assert bad[0] == pytest.approx((1 + true.pow(2).sum().item() - 2 * true.max().item()) / 225, rel=1e-12)


def test_kernel_metrics_accept_different_sizes():
    small = gaussian_kernel(5, 1.0)
    large = F.pad(small, (2, 2, 2, 2))  # the same PSF on a 9x9 support
    assert metrics.kernel_mse(small, large).item() == pytest.approx(0.0, abs=1e-15)
    assert metrics.kernel_mse(small, large, align="none").item() == pytest.approx(0.0, abs=1e-15)
    assert metrics.mnc(large, small).item() == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------------------------------ reblur loss
@pytest.mark.parametrize("mode", ["circular", "reflect", "zeros"])
def test_reblur_loss_near_zero_for_truth(mode):
    x = smooth_images(batch=1, size=64, seed=4)
    kernel = motion_kernel(9, 0.5, generator=1)
    sigma = 0.05
    noise = sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    clean = fft_blur(x, kernel) if mode == "circular" else spatial_blur(x, kernel.flip(-2, -1), padding=mode)
    y = clean + noise
    loss = metrics.reblur_loss(x, kernel, y, sigma, blur_mode=mode)
    m = x[0].numel()
    # per element: mean(n^2) - sigma^2 has std sigma^2 sqrt(2 / M)
    assert abs(loss.per_element.item()) < 5 * sigma**2 * math.sqrt(2 / m)
    assert loss.total.item() == pytest.approx(loss.per_element.item() * m, rel=1e-12)
    # the exact value: ||n||^2 - sigma^2 M
    assert loss.total.item() == pytest.approx(noise.double().pow(2).sum().item() - sigma**2 * m, abs=1e-4)
    # a wrong kernel (no blur) explains y worse
    dirac = torch.zeros(1, 1, 9, 9)
    dirac[..., 4, 4] = 1
    assert metrics.reblur_loss(x, dirac, y, sigma, blur_mode=mode).per_element.item() > 10 * abs(loss.per_element.item())


def test_reblur_loss_rejects_unknown_blur_mode():
    x = smooth_images(batch=1, size=16)
    with pytest.raises(ValueError, match="blur_mode"):
        metrics.reblur_loss(x, gaussian_kernel(3, 0.8), x, 0.0, blur_mode="valid")


def test_reblur_loss_per_image_sigma():
    x = smooth_images(batch=2, size=16)
    kernel = gaussian_kernel(3, 0.8)
    y = fft_blur(x, kernel)
    loss = metrics.reblur_loss(x, kernel, y, torch.tensor([0.0, 0.1]))
    assert loss.per_element.tolist() == pytest.approx([0.0, -0.01], abs=1e-9)


# ------------------------------------------------------------------------------------------ analytic perceptual
def test_gmsd_and_sharpness():
    x = smooth_images(size=48, seed=6)
    assert metrics.gmsd(x, x).tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    blurred = fft_blur(x, gaussian_kernel(7, 1.5))
    assert (metrics.gmsd(blurred, x) > 0.01).all()
    assert (metrics.laplacian_sharpness(blurred) < metrics.laplacian_sharpness(x)).all()


# ------------------------------------------------------------------------------------------ optional metrics
def test_available_metrics_and_clear_errors():
    names = metrics.available_metrics()
    for builtin in ("psnr", "ssim", "kernel_mse", "mnc", "reblur_loss"):
        assert builtin in names
    x = smooth_images(size=32)
    for name, call in (("lpips", lambda: metrics.lpips(x, x)), ("niqe", lambda: metrics.niqe(x)),
                       ("brisque", lambda: metrics.brisque(x))):
        reason = metrics.metric_status(name)
        if reason is None:
            assert name in names
            values = call()
            assert values.shape == (2,) and torch.isfinite(values).all()
            if name == "lpips":
                assert values.abs().max().item() < 1e-6
        else:
            assert name not in names
            assert "install" in reason or "weights" in reason or "needs" in reason
            with pytest.raises(metrics.MetricUnavailableError):
                call()
    if metrics.metric_status("fid") is not None:
        with pytest.raises(metrics.MetricUnavailableError):
            metrics.fid(x, x)


def test_read_only_numpy_images_give_no_warning():
    import warnings

    import PIL.Image

    array = np.asarray(PIL.Image.fromarray((np.arange(64 * 64 * 3) % 251).astype(np.uint8).reshape(64, 64, 3)))
    assert not array.flags.writeable  # what np.asarray of a PIL image gives
    from diffusers_blind.metrics.image import _numpy_image

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns (once per process) on a non-writable array
        assert metrics.psnr(array, array.copy()).item() == float("inf")
    assert not np.shares_memory(_numpy_image(array, "x").numpy(), array)  # copied, not wrapped read-only
